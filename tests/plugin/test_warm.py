"""--sandbox-keep-warm's pure parts (``plugin/_warm.py``): the slot lock, its
record, what changed in the project since the VM's copy, the option's values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.plugin import _warm
from pytest_microsandbox.plugin._warm import (
    MAX_RECORD_BYTES,
    WarmRecord,
    WarmVM,
    claim_slot,
    file_changes,
    project_files,
    sweep_stale,
    warm_sandbox_name,
)
from pytest_microsandbox.runtime import GuestTimeoutError


def test_a_slot_is_claimed_by_one_run_at_a_time(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    first = claim_slot(tmp_path, project, 0)
    assert first is not None and first.held
    # Another process (a concurrent run) finds it taken and goes the usual way...
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from pytest_microsandbox.plugin._warm import claim_slot
        print(claim_slot(Path({str(tmp_path)!r}), Path({str(project)!r}), 0) is None,
              claim_slot(Path({str(tmp_path)!r}), Path({str(project)!r}), 1) is not None)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
    # ...and so does another claim in this process (an xdist worker's own slot is another).
    assert claim_slot(tmp_path, project, 0) is None
    first.release()
    again = claim_slot(tmp_path, project, 0)
    assert again is not None
    again.release()


def test_the_record_round_trips_and_bad_ones_are_ignored(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    slot = claim_slot(tmp_path, project, 0)
    assert slot is not None
    assert slot.record() is None
    record = WarmRecord(sandbox="msb-warm-x-0", base="zygote-base-y", files={"a.py": (3, 7)})
    slot.write(record)
    assert slot.record() == record
    with_go = WarmRecord(sandbox="s", base="b", files={}, go='{"cwd": "/p", "args": []}')
    slot.write(with_go)
    assert slot.record() == with_go
    slot.write(record)
    path = slot.directory / "0.json"
    for bad in ("{", "[]", '{"sandbox": 1, "base": "b", "files": {}}',
                '{"sandbox": "s", "base": "b", "files": {"a": [1]}}',
                '{"sandbox": "s", "base": "b", "files": {}, "go": 1}'):  # fmt: skip
        path.write_text(bad)
        assert slot.record() is None
    path.write_text(" " * (MAX_RECORD_BYTES + 1))
    assert slot.record() is None
    slot.write(record)
    slot.release()  # a VM waits: its lock file stays
    assert sorted(p.name for p in slot.directory.iterdir()) == ["0.json", "0.lock"]
    slot = claim_slot(tmp_path, project, 0)
    assert slot is not None
    slot.forget()
    slot.release()  # none waits: nothing is left, not even the project's directory
    assert not slot.directory.exists()


def test_changed_new_and_removed_files_are_found(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "test_a.py").write_text("def test(): pass\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_bytes(b"\0")
    before = project_files(tmp_path, [tmp_path / ".venv"], ["__pycache__"])
    assert before is not None and sorted(before) == ["pkg/mod.py", "test_a.py"]
    (tmp_path / "test_a.py").write_text("def test(): assert 0\n")
    (tmp_path / "pkg" / "new.py").write_text("")
    (tmp_path / "pkg" / "mod.py").unlink()
    now = project_files(tmp_path, [tmp_path / ".venv"], ["__pycache__"])
    assert now is not None
    assert file_changes(before, now) == (["pkg/new.py", "test_a.py"], ["pkg/mod.py"])
    assert file_changes(now, now) == ([], [])
    os.symlink("test_a.py", tmp_path / "link.py")
    assert project_files(tmp_path) is None  # copied whole instead


def test_the_sandbox_name_fits_the_store(tmp_path: Path) -> None:
    name = warm_sandbox_name(tmp_path, 3)
    assert name.startswith("msb-warm-") and name.endswith("-3") and len(name) < 40
    assert name != warm_sandbox_name(tmp_path / "other", 3)


def test_stale_slots_are_swept_and_held_ones_left_alone(tmp_path: Path) -> None:
    projects = [tmp_path / name for name in ("gone", "alive", "held")]
    for project in projects:
        project.mkdir()
        slot = claim_slot(tmp_path, project, 0)
        assert slot is not None
        slot.write(WarmRecord(sandbox=project.name, base="b", files={}))
        slot.release()
    held = claim_slot(tmp_path, projects[2], 0)  # a run uses it now
    assert held is not None
    try:
        # "gone" and "held" name no running sandbox; only "gone" can be swept.
        assert sweep_stale(tmp_path, lambda name: name == "alive") == 1
        assert held.record() is not None
    finally:
        held.release()
    left = sorted(p.parent.name for p in (tmp_path / "warm").glob("*/0.json"))
    assert len(left) == 2
    assert len(list((tmp_path / "warm").iterdir())) == 2  # the swept one's directory went


class _Remote:
    """What WarmVM._watched uses of a RemoteSandbox: its name and metrics."""

    name = "msb-warm-stub-0"
    config = None

    def __init__(self, answers: bool) -> None:
        self.answers = answers

    async def metrics(self) -> None:
        if not self.answers:
            await anyio.sleep(3600)  # a hung guest


def _vm(answers: bool) -> WarmVM:
    return WarmVM(_Remote(answers), None, "b", {})  # type: ignore[arg-type]


def test_a_hung_kept_vm_fails_the_call_and_a_live_one_returns(monkeypatch) -> None:
    monkeypatch.setattr(_warm, "HEARTBEAT_S", 0.05)

    async def slow() -> int:
        await anyio.sleep(0.5)
        return 7

    async def broken() -> int:
        raise ValueError("the call's own error")

    async def main() -> None:
        assert await _vm(True)._watched("running a test", slow) == 7
        with pytest.raises(GuestTimeoutError, match="stopped answering while running a test"):
            await _vm(False)._watched("running a test", slow)
        with pytest.raises(ValueError, match="the call's own error"):
            await _vm(True)._watched("running a test", broken)

    anyio.run(main)
