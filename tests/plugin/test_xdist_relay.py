"""The relay from xdist workers to the controller's terminal, without xdist:
a worker's writer and the controller's reader on one directory.
"""

from __future__ import annotations

import time

from pytest_microsandbox.plugin._xdist import ControllerRelay, WorkerRelay, sandboxed_line
from pytest_microsandbox.runtime.progress import BuildEvent


def _wait_for(events: list[BuildEvent], n: int) -> None:
    deadline = time.monotonic() + 10
    while len(events) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_worker_events_reach_the_controller_with_ids_unique_per_worker():
    seen: list[BuildEvent] = []
    relay = ControllerRelay(seen.append)
    try:
        gw0 = WorkerRelay(str(relay.directory), "gw0")
        gw1 = WorkerRelay(str(relay.directory), "gw1")
        gw0(BuildEvent(id=1, kind="template", what="template t", state="start"))
        gw0(BuildEvent(id=2, kind="layer", what="layer l", state="start", parent=1))
        gw1(BuildEvent(id=1, kind="template", what="template t", state="start"))
        _wait_for(seen, 3)
        by_what = {(e.what, e.id) for e in seen}
        assert len(by_what) == 3, seen
        layer = next(e for e in seen if e.kind == "layer")
        template0 = next(e for e in seen if e.id == layer.parent)
        assert template0.what == "template t"
        assert all(e.parent == 0 for e in seen if e.kind == "template")
    finally:
        relay.close()
    assert not relay.directory.exists()


def test_a_partial_or_broken_line_is_never_an_event(tmp_path):
    seen: list[BuildEvent] = []
    relay = ControllerRelay(seen.append)
    try:
        events = relay.directory / "events-gw0.jsonl"
        events.write_bytes(b'{"not": "an event"}\n{"id": 1, "kind": "pull"')  # no newline yet
        time.sleep(0.5)
        assert seen == []
        with open(events, "ab") as out:
            out.write(b', "what": "x", "state": "start", "parent": 0}\n')
        _wait_for(seen, 1)
        assert [e.what for e in seen] == ["x"]
    finally:
        relay.close()


def test_counts_come_from_the_first_worker_that_wrote_them():
    relay = ControllerRelay(lambda event: None)
    try:
        assert relay.counts() is None
        (relay.directory / "counts-gw0.json").write_text("garbage")
        WorkerRelay(str(relay.directory), "gw1").write_counts({"process": 3}, 1, 4)
        assert relay.counts() == ({"process": 3}, 1, 4)
    finally:
        relay.close()
    line = sandboxed_line({"process": 3}, 1, 4)
    assert line == "microsandbox: 3 of 4 tests sandboxed (isolation: 3 process); 1 on the host"
