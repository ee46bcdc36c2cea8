"""Progress events of long work (runtime/progress.py): what a listener sees."""

from __future__ import annotations

import anyio
import pytest

from pytest_microsandbox.runtime import progress
from pytest_microsandbox.runtime.progress import BuildEvent, stage, step, subscribe


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch):
    # Only this test's listeners: the plugin running these tests listens too.
    monkeypatch.setattr(progress, "_listeners", [])
    seen: list[BuildEvent] = []
    unsubscribe = subscribe(seen.append)
    yield seen
    unsubscribe()


def test_a_stage_reports_start_steps_and_done_with_its_size(events):
    with stage("template", "template abc") as st:
        st.step("booting")
        step("saving")  # the innermost stage, from code that has no handle on it
        st.size = 1234
    assert [(e.state, e.step) for e in events] == [
        ("start", ""), ("step", "booting"), ("step", "saving"), ("done", "")
    ]  # fmt: skip
    assert {e.id for e in events} == {st.id}
    assert events[-1].size == 1234 and events[-1].elapsed >= 0
    step("nothing under way")  # outside a stage: no event
    assert len(events) == 4


def test_a_failed_stage_says_why_and_the_error_propagates(events):
    with pytest.raises(OSError, match="disk full"), stage("layer", "/usr"):
        raise OSError("disk full")
    assert events[-1].state == "failed" and "disk full" in events[-1].error


def test_nested_stages_name_their_parent_across_worker_threads(events):
    def build_layer() -> None:
        with stage("layer", "/usr"):
            pass

    async def build() -> None:
        with stage("zygote", "z") as outer:
            await anyio.to_thread.run_sync(build_layer)
        assert outer.parent == 0

    anyio.run(build)
    layer = next(e for e in events if e.kind == "layer")
    zygote = next(e for e in events if e.kind == "zygote")
    assert layer.parent == zygote.id and zygote.parent == 0


def test_a_failing_listener_breaks_nothing(events):
    def broken(event: BuildEvent) -> None:
        raise RuntimeError("listener bug")

    unsubscribe = subscribe(broken)
    try:
        with stage("pull", "image"):
            pass
    finally:
        unsubscribe()
    assert [e.state for e in events] == ["start", "done"]
    unsubscribe()  # twice is harmless
