"""--sandbox-keep-warm with real VMs: a run leaves its VM to its supervisor, the
run after an edit is served by that VM with the edited outcome, a run that
finds the slot taken goes the usual way, and the idle timeout stops the VM.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import anyio
import pytest
from test_marker_vm import run

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.plugin._warm import claim_slot, sweep_stale, warm_sandbox_name
from pytest_microsandbox.runtime import Sandbox, SandboxNotFoundError
from pytest_microsandbox.runtime._state import StateStore

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

TEST = """
import pytest

@pytest.mark.sandbox
def test_edited():
    assert {value}, "edited to {value}"
"""


def _warm_pid(root: Path) -> int | None:
    """The VM pid of the project's kept-warm sandbox, None if there is none."""
    row = StateStore.default().get(warm_sandbox_name(root, 0))
    return None if row is None else row.vm_pid


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _run(root: Path, value: str, seconds: int) -> pytest.RunResult:
    (root / "test_edit.py").write_text(TEST.format(value=value))
    return run(root, "--sandbox-require", f"--sandbox-keep-warm={seconds}")


def test_the_next_run_is_served_by_the_kept_vm(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    name = warm_sandbox_name(tmp_path, 0)
    try:
        first = _run(tmp_path, "True", 300)
        first.assert_outcomes(passed=1)
        pid = _warm_pid(tmp_path)
        assert pid is not None and _alive(pid)

        edited = _run(tmp_path, "False", 300)
        edited.assert_outcomes(failed=1)
        edited.stdout.fnmatch_lines(["*AssertionError: edited to False*"])
        assert _warm_pid(tmp_path) == pid  # the same VM served it

        # Another run holds the slot: this one goes the usual way, the VM untouched.
        slot = claim_slot(None, tmp_path, 0)
        assert slot is not None
        try:
            _run(tmp_path, "True", 300).assert_outcomes(passed=1)
        finally:
            slot.release()
        assert _warm_pid(tmp_path) == pid

        # Another idle time: a VM of its own, which stops once idle that long
        # (long enough to outlast this run's exit on a loaded machine: at 3 s
        # the VM could be gone before its pid was read).
        _run(tmp_path, "1 == 1", 10).assert_outcomes(passed=1)
        short = _warm_pid(tmp_path)
        assert short is not None and short != pid and not _alive(pid)
        deadline = time.monotonic() + 120
        while _warm_pid(tmp_path) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _warm_pid(tmp_path) is None
        assert not _alive(short)
    finally:
        anyio.run(_remove, name)
        sweep_stale(None, lambda n: n != name and StateStore.default().get(n) is not None)


async def _remove(name: str) -> None:
    with contextlib.suppress(SandboxNotFoundError):
        await Sandbox.remove(name)
