"""Inter-process build locks whose lock files can be deleted safely.

``flock(2)`` locks an open file, that is an inode, not a path. Deleting a lock
file that another process holds or waits on breaks mutual exclusion: the waiter
goes on to lock the old, unlinked inode while a newcomer creates a new file at
the same path and locks that one, and both believe they hold the lock. So:

* a lock file is deleted only by a process that holds it
  (:meth:`EntryLock.release` with ``delete=True``, :func:`remove_lock_file`);
* every acquirer, once ``flock`` succeeds, checks that the path still names
  the inode it locked (``os.fstat`` of its descriptor against ``os.stat`` of
  the path) and starts over on the current file otherwise.

The snapshot store keys one such lock per entry (``<entry>.lock`` next to the
entry's directory) and deletes it with the entry, after a failed build, or as
an orphan in a prune.
The image store keys one per image family and deletes it after every build.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio

from ._exceptions import SnapshotError, SnapshotLockTimeoutError

__all__ = [
    "LOCK_TIMEOUT_ENV",
    "EntryLock",
    "hold",
    "lock_timeout",
    "remove_idle_lock_files",
    "remove_lock_file",
]

#: Seconds a process waits for another one building the same template or zygote.
LOCK_TIMEOUT_ENV = "MICROSANDBOX_TEMPLATE_LOCK_TIMEOUT"
_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.05


def lock_timeout(default: float) -> float:
    """``$MICROSANDBOX_TEMPLATE_LOCK_TIMEOUT`` if set, else ``default``.

    :raises SnapshotError: the variable is set but is not a number.
    """
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SnapshotError(f"${LOCK_TIMEOUT_ENV}={raw!r} is not a number") from None


def _names(fd: int, path: Path) -> bool:
    """Whether ``path`` currently names the file open as ``fd``."""
    st = os.fstat(fd)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino)


class EntryLock:
    """An exclusive lock between processes (and threads) on the file at ``path``.

    Not reentrant: a second :class:`EntryLock` on the same path in the same
    process waits like any other process. Acquire and release may happen on
    different threads.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what  # for the timeout message, e.g. "template 1a2b..."
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float) -> None:
        """Block until this process holds the lock (creating the file if needed).

        :raises SnapshotLockTimeoutError: another process held it for ``timeout`` s.
        :raises OSError: the lock file cannot be created or opened.
        :raises RuntimeError: this object holds the lock already.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this EntryLock")
        deadline = time.monotonic() + timeout
        delay = _POLL_MIN_S
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                while not _try_flock(fd):
                    if time.monotonic() >= deadline:
                        raise SnapshotLockTimeoutError(
                            f"another process has been building {self.what} for over "
                            f"{timeout:g} s (lock {self.path}); raise ${LOCK_TIMEOUT_ENV} or "
                            "check that process"
                        )
                    time.sleep(delay)
                    delay = min(delay * 2, _POLL_MAX_S)
                if _names(fd, self.path):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            # Its holder deleted the file while we waited: lock the current one.
            os.close(fd)

    def try_acquire(self, *, create: bool = True) -> bool:
        """Take the lock if nobody holds it, without waiting. With ``create=False``
        a missing lock file is left missing (and the lock is not taken).

        :raises OSError: the lock file cannot be created or opened.
        :raises RuntimeError: this object holds the lock already.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this EntryLock")
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = os.open(self.path, flags, 0o666)
            except FileNotFoundError:
                if create:
                    raise
                return False
            try:
                locked = _try_flock(fd)
                if locked and _names(fd, self.path):
                    self._fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked:
                return False
            # Deleted by its holder between our open and flock: look again.

    def release(self, *, delete: bool = False) -> None:
        """Release the lock; with ``delete`` also remove the lock file first (safe
        only because we hold it: waiters notice and move to a new file).
        Does nothing if the lock is not held.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if delete and _names(fd, self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    async def acquire_async(self, timeout: float) -> None:
        """:meth:`acquire` in a worker thread (the event loop keeps running).

        :raises SnapshotLockTimeoutError: another process held it for ``timeout`` s.
        """
        await anyio.to_thread.run_sync(self.acquire, timeout)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextlib.asynccontextmanager
async def hold(path: Path, what: str, timeout: float) -> AsyncIterator[EntryLock]:
    """``async with hold(path, what, timeout) as lock:`` the lock is held inside.

    A body that raises (a failed build: no entry for the lock to guard) deletes
    the lock file on the way out, so failures leave no lock file behind.

    :raises SnapshotLockTimeoutError: another process held it for ``timeout`` s.
    """
    lock = EntryLock(path, what)
    await lock.acquire_async(timeout)
    try:
        yield lock
    except BaseException:
        lock.release(delete=True)
        raise
    finally:
        lock.release()


def remove_lock_file(path: Path) -> bool:
    """Delete the lock file at ``path`` if nobody holds it; True if it was deleted.

    A lock file that is held (a build in progress) is left alone. Never creates
    the file. Safe against waiters: see the module docstring.

    :raises OSError: the file exists but cannot be opened or deleted.
    """
    lock = EntryLock(path, "a lock file being removed")
    if not lock.try_acquire(create=False):
        return False
    lock.release(delete=True)
    return True


def remove_idle_lock_files(paths: Iterable[Path]) -> None:
    """:func:`remove_lock_file` for each of ``paths``; held ones (builds in
    progress) and ones that cannot be removed are left alone.
    """
    for path in paths:
        try:
            remove_lock_file(path)
        except OSError:
            continue
