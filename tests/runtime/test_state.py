"""The state store of named sandboxes (runtime/_state.py): no VM.

Concurrency is tested with real processes racing on one database, staleness
with a real process killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from pytest_microsandbox.runtime._state import (
    SandboxStatus,
    StateStore,
    new_record,
    process_alive,
    process_start,
)

_CLAIM = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytest_microsandbox.runtime._state import StateStore, new_record
    store = StateStore(Path(sys.argv[1]))
    go = float(sys.argv[3])
    while time.time() < go:
        time.sleep(0.001)
    won = store.claim(new_record(sys.argv[2], "{}")) is None
    print("won" if won else "lost", flush=True)
    if len(sys.argv) > 4:
        time.sleep(float(sys.argv[4]))
    """
)


def _claimers(store: StateStore, names: list[str], hold: float | None = None) -> list[str]:
    import time

    go = str(time.time() + 1.0)  # all start at once, after their imports
    extra = [] if hold is None else [str(hold)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM, str(store.directory), name, go, *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    return [p.communicate(timeout=60)[0].strip() for p in procs]


def test_a_claimed_name_is_found_listed_and_released(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    record = new_record("web", '{"name": "web"}')
    assert store.claim(record) is None
    found = store.get("web")
    assert found == record and found.alive and found.owned_here
    assert found.status is SandboxStatus.STARTING
    store.update(record, status=SandboxStatus.RUNNING, vm_pid=123)
    [listed] = store.list()
    assert (listed.status, listed.vm_pid) == (SandboxStatus.RUNNING, 123)
    assert store.claim(new_record("web", "{}")) == listed  # taken: the holder is returned
    store.release(record)
    assert store.get("web") is None and store.list() == []
    assert oct(store.path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(store.directory.stat().st_mode & 0o777) == oct(0o700)


def test_racing_processes_get_a_name_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    results = _claimers(store, ["same"] * 6, hold=3.0)
    assert sorted(results) == ["lost"] * 5 + ["won"]
    # The winner exited since: its row is stale now, and dropped when read.
    assert store.list() == []


def test_racing_processes_all_register_distinct_names(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    names = [f"sb{i}" for i in range(6)]
    assert _claimers(store, names, hold=3.0) == ["won"] * 6


def test_a_killed_owners_row_and_files_are_dropped(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _CLAIM, str(store.directory), "orphan", "0", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "won"
    sock, token, log = store.files_of("orphan")
    for path in (sock, token, log):
        path.write_text("x")
    [row] = store.list()
    assert row.owner_pid == proc.pid and row.alive
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while store.list() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.list() == []
    assert not sock.exists() and not token.exists() and not log.exists()
    assert store.claim(new_record("orphan", "{}")) is None  # the name is free again


def test_a_recycled_pid_does_not_keep_a_row_alive(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    record = new_record("recycled", "{}")
    store.claim(record)
    # Same pid, another start time: the process that owned the row is gone.
    store.release(record)
    from dataclasses import replace

    ghost = replace(record, owner_start=record.owner_start - 1)
    store.claim(ghost)
    assert not ghost.alive
    assert store.get("recycled") is None
    assert store.claim(record) is None


def test_process_identity() -> None:
    start = process_start(os.getpid())
    assert start is not None and process_alive(os.getpid(), start)
    assert not process_alive(os.getpid(), start + 1)
    assert process_start(2**22 + 12345) is None
