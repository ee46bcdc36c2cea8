"""EntryLock: flock-based build locks whose files can be deleted, against real processes.

The processes are forked (``multiprocessing`` "fork" context) so that a child
inherits a monkeypatched module, which the control case of the race uses.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import warnings
from collections.abc import Sequence
from multiprocessing.synchronize import Event
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    LockTimeoutError,
    SnapshotError,
    SnapshotLockTimeoutError,
    _locks,
)
from pytest_microsandbox.runtime._locks import (
    LOCK_TIMEOUT_ENV,
    EntryLock,
    hold,
    lock_timeout,
    remove_lock_file,
)

CTX = multiprocessing.get_context("fork")


def _log(path: Path, line: str) -> None:
    # O_APPEND writes of one short line are atomic between processes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _worker(lock_path: Path, log: Path, rounds: int) -> None:
    for i in range(rounds):
        lock = EntryLock(lock_path, "test")
        lock.acquire(timeout=60)
        _log(log, f"in {os.getpid()}")
        time.sleep(0.005)
        _log(log, f"out {os.getpid()}")
        lock.release(delete=i % 2 == 0)  # every other holder deletes the file


def _join(procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def test_processes_exclude_each_other_while_holders_delete_the_file(tmp_path: Path) -> None:
    lock_path, log = tmp_path / "k.lock", tmp_path / "log"
    procs = [CTX.Process(target=_worker, args=(lock_path, log, 8)) for _ in range(4)]
    for p in procs:
        p.start()
    _join(procs)
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * 8 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        # Strict in/out pairs of one process: never two holders at once.
        assert enter.startswith("in ") and leave == "out " + enter[3:], lines


def _waiter(lock_path: Path, log: Path, started: Event, entered: Event) -> None:
    started.set()
    lock = EntryLock(lock_path, "test")
    lock.acquire(timeout=30)
    entered.set()
    _log(log, "B in")
    time.sleep(0.1)
    _log(log, "B out")
    lock.release()


def _newcomer(lock_path: Path, log: Path, entered: Event, leave: Event) -> None:
    lock = EntryLock(lock_path, "test")
    lock.acquire(timeout=30)
    _log(log, "C in")
    entered.set()
    leave.wait(30)
    _log(log, "C out")
    lock.release()


def _deleting_holder(lock_path: Path, held: Event, unlink: Event, unlinked: Event,
                     release: Event) -> None:  # fmt: skip
    lock = EntryLock(lock_path, "test")
    lock.acquire(timeout=30)
    held.set()
    unlink.wait(30)
    os.unlink(lock_path)  # what release(delete=True) does, split to let C in before the release
    unlinked.set()
    release.wait(30)
    lock.release()


@pytest.mark.parametrize("inode_check", [True, False], ids=["checked", "control-unchecked"])
def test_deleting_the_file_under_a_waiter_keeps_mutual_exclusion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inode_check: bool
) -> None:
    """A holds; B waits on A's file; A deletes it; C creates a new file and
    locks it; A releases, which wakes B on the deleted inode. B must notice and
    wait for C. The control run disables the inode check to show the race is real.
    (Every lock lives in a child: a forked child would inherit the parent's lock.)
    """
    if not inode_check:
        monkeypatch.setattr(_locks, "_names", lambda fd, path: True)
    lock_path, log = tmp_path / "k.lock", tmp_path / "log"
    a_held, a_unlink, a_unlinked, a_release = (CTX.Event() for _ in range(4))
    b_started, b_in, c_in, c_leave = (CTX.Event() for _ in range(4))
    a = CTX.Process(
        target=_deleting_holder, args=(lock_path, a_held, a_unlink, a_unlinked, a_release)
    )
    b = CTX.Process(target=_waiter, args=(lock_path, log, b_started, b_in))
    c = CTX.Process(target=_newcomer, args=(lock_path, log, c_in, c_leave))
    started = [a]
    try:
        a.start()
        assert a_held.wait(30)
        b.start()
        started.append(b)
        assert b_started.wait(30)
        time.sleep(0.3)  # B has opened A's file and polls flock on it
        a_unlink.set()
        assert a_unlinked.wait(30)
        c.start()
        started.append(c)
        assert c_in.wait(30), "C should lock the new file at once"
        a_release.set()  # B's flock on the deleted inode now succeeds
        b_entered_while_c_held = b_in.wait(1.0)
    finally:
        a_unlink.set()
        a_release.set()
        c_leave.set()
        _join(started)
    if inode_check:
        assert not b_entered_while_c_held
        assert log.read_text().splitlines() == ["C in", "C out", "B in", "B out"]
    else:
        assert b_entered_while_c_held, "without the inode check B and C hold it together"


def _hold_until(lock_path: Path, held: Event, leave: Event) -> None:
    lock = EntryLock(lock_path, "test")
    lock.acquire(timeout=30)
    held.set()
    leave.wait(30)
    lock.release()


def test_timeout_names_the_lock_and_the_variable(tmp_path: Path) -> None:
    lock_path = tmp_path / "key.lock"
    held, leave = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold_until, args=(lock_path, held, leave))
    p.start()
    try:
        assert held.wait(30)
        start = time.monotonic()
        with pytest.raises(SnapshotLockTimeoutError) as info:
            EntryLock(lock_path, "template key").acquire(timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 5
        message = str(info.value)
        assert "after 0.3 s waiting for the lock on template key" in message
        assert str(lock_path) in message and f"${LOCK_TIMEOUT_ENV}" in message
        assert info.value.lock_path == str(lock_path) and info.value.what == "template key"
        assert not remove_lock_file(lock_path), "a held lock file must stay"
        assert lock_path.exists()
    finally:
        leave.set()
        _join([p])
    assert remove_lock_file(lock_path)
    assert not lock_path.exists()


def test_remove_lock_file_never_creates_and_try_acquire(tmp_path: Path) -> None:
    lock_path = tmp_path / "sub" / "x.lock"
    assert not remove_lock_file(lock_path)
    assert not lock_path.exists()
    lock = EntryLock(lock_path, "test")
    lock.acquire(timeout=1)
    assert lock.held
    other = EntryLock(lock_path, "test")
    assert not other.try_acquire()  # same process, another open file: excluded too
    lock.release(delete=True)
    assert not lock_path.exists() and not lock.held
    assert not other.try_acquire(create=False)
    assert other.try_acquire()
    other.release()
    assert lock_path.exists()


def test_lock_timeout_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    assert lock_timeout(12.0) == 12.0
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "3.5")
    assert lock_timeout(12.0) == 3.5
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(SnapshotError, match="is not a number"):
        lock_timeout(12.0)


def test_hold_deletes_the_lock_file_when_its_body_fails(tmp_path: Path) -> None:
    path = tmp_path / "entry.lock"

    async def built() -> None:
        async with hold(path, "test", 5):
            pass

    async def failed() -> None:
        async with hold(path, "test", 5):
            raise ValueError("the build failed")

    anyio.run(built)
    assert path.exists()  # kept with its entry
    with pytest.raises(ValueError, match="build failed"):
        anyio.run(failed)
    assert not path.exists()
    anyio.run(built)  # and the next build locks a new file
    assert path.exists()


def _open_fds() -> int:
    gc.collect()  # earlier tests' garbage (pipes, semaphores) closes on collection
    return len(os.listdir("/proc/self/fd"))


def test_acquire_async_lets_the_loop_run_and_cancels_cleanly(tmp_path: Path) -> None:
    """A task waiting for a lock another task of the same process holds neither
    blocks the loop nor takes a worker thread, and its cancellation leaks nothing."""
    path = tmp_path / "k.lock"
    ticks: list[int] = []

    async def main() -> None:
        fds_before = _open_fds()
        release = anyio.Event()

        async def holder() -> None:
            async with hold(path, "the holder's build", 30):
                await release.wait()

        async def ticker() -> None:
            for i in range(5):
                await anyio.sleep(0.01)
                ticks.append(i)
            release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await anyio.sleep(0.05)
            with anyio.CancelScope() as scope:
                scope.cancel()  # cancelled while it waits: returns at once, holds nothing
                await EntryLock(path, "test").acquire_async(30)
            waiter = EntryLock(path, "test")
            tg.start_soon(ticker)
            await waiter.acquire_async(30)  # the ticker releases the holder meanwhile
            assert ticks == [0, 1, 2, 3, 4] and waiter.held
            waiter.release()
        assert _open_fds() == fds_before

    anyio.run(main)
    assert remove_lock_file(path)


def test_blocking_acquire_warns_on_an_event_loop_thread(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"

    async def main() -> None:
        lock = EntryLock(path, "test")
        with pytest.warns(RuntimeWarning, match="blocks the event loop"):
            lock.acquire(timeout=1)
        lock.release()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            await anyio.to_thread.run_sync(lock.acquire, 1)  # a worker thread may block
        assert lock.held
        lock.release()

    anyio.run(main)


def test_tasks_and_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    """The in-process gate: a thread waits for a task's lock and times out with
    the error the lock was made with, naming its variable."""
    path = tmp_path / "k.lock"

    async def main() -> None:
        async with hold(path, "the task's build", 30):
            other = _locks.cache_lock(path, "the initramfs x")
            with pytest.raises(LockTimeoutError) as info:
                await anyio.to_thread.run_sync(other.acquire, 0.2)
            assert not isinstance(info.value, SnapshotLockTimeoutError)
            assert f"${_locks.CACHE_LOCK_TIMEOUT_ENV}" in str(info.value)
            assert not other.held and not EntryLock(path, "test").try_acquire()

    anyio.run(main)
    lock = EntryLock(path, "test")
    assert lock.try_acquire()
    lock.release(delete=True)
