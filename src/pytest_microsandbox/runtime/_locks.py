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
The image store keys one per image family and deletes it after every build;
the initramfs, the compiled helpers, the kernel and the KVM probe verdict have
one each (:func:`cache_lock`).

Waiting never blocks an event loop: :meth:`EntryLock.acquire_async` polls
with non-blocking ``flock`` and ``anyio.sleep`` (no worker thread, cancellable
at once), and the blocking :meth:`EntryLock.acquire` warns when it runs on an
event loop's thread. Within one process a lock on a path is also a
``threading.Lock`` (the *gate*), taken before the file: of the tasks and
threads of one process only the gate's holder opens and polls the file
(blocking threads sleep on the gate), and a timeout counts the wait for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio

from ._envvars import env_number
from ._exceptions import ConfigError, LockTimeoutError, SnapshotError, SnapshotLockTimeoutError

__all__ = [
    "CACHE_LOCK_TIMEOUT_ENV",
    "LOCK_TIMEOUT_ENV",
    "EntryLock",
    "cache_lock",
    "cache_lock_timeout",
    "hold",
    "lock_timeout",
    "remove_idle_lock_files",
    "remove_lock_file",
]

#: Seconds a process waits for another one building the same template or zygote.
LOCK_TIMEOUT_ENV = "MICROSANDBOX_TEMPLATE_LOCK_TIMEOUT"
#: Seconds a process waits for another one building any other cache entry: the
#: KVM probe verdict, the guest agent, the initramfs, a root image, the kernel.
CACHE_LOCK_TIMEOUT_ENV = "MICROSANDBOX_CACHE_LOCK_TIMEOUT"
_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.05


def lock_timeout(default: float) -> float:
    """``$MICROSANDBOX_TEMPLATE_LOCK_TIMEOUT`` if set, else ``default``.

    :raises SnapshotError: the variable is set but is not a finite number >= 0.
    """
    return env_number(LOCK_TIMEOUT_ENV, default, SnapshotError)


def cache_lock_timeout(default: float) -> float:
    """``$MICROSANDBOX_CACHE_LOCK_TIMEOUT`` if set, else ``default``.

    :raises ConfigError: the variable is set but is not a finite number >= 0.
    """
    return env_number(CACHE_LOCK_TIMEOUT_ENV, default, ConfigError)


# -- the in-process gate: one threading.Lock per lock path ------------------------------------

_gates_guard = threading.Lock()
_gates: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()


def _gate(path: Path) -> threading.Lock:
    """This process's gate for ``path`` (kept alive by the EntryLocks using it)."""
    key = os.path.abspath(path)
    with _gates_guard:
        gate = _gates.get(key)
        if gate is None:
            gate = threading.Lock()
            _gates[key] = gate
        return gate


def _forget_gates_in_child() -> None:
    # A forked child has none of its parent's threads or tasks: gates they held
    # would stay held forever in it.
    global _gates_guard, _gates
    _gates_guard = threading.Lock()
    _gates = weakref.WeakValueDictionary()


os.register_at_fork(after_in_child=_forget_gates_in_child)


def _warn_on_event_loop(path: Path) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # a worker thread or plain synchronous code: blocking is fine
    # Not an error: synchronous public APIs (prepare_boot, ...) called from async
    # code would then fail only on a cold cache. The runtime itself never does it.
    warnings.warn(
        f"EntryLock.acquire({path}) blocks the event loop of this thread while it waits "
        "(a holder in the same loop then never finishes); call blocking cache builds "
        "through anyio.to_thread.run_sync, or await acquire_async()",
        RuntimeWarning,
        stacklevel=3,
    )


def _names(fd: int, path: Path) -> bool:
    """Whether ``path`` currently names the file open as ``fd``."""
    st = os.fstat(fd)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino)


class EntryLock:
    """An exclusive lock between processes, threads and tasks on the file at ``path``.

    Not reentrant: a second :class:`EntryLock` on the same path in the same
    process waits like any other process. Acquire and release may happen on
    different threads. A timeout raises ``error`` (a :class:`LockTimeoutError`)
    naming the lock file, ``what`` it guards and ``timeout_env``, the variable
    that sets the timeout; :func:`cache_lock` makes one for cache entries.
    """

    def __init__(
        self,
        path: Path,
        what: str,
        *,
        timeout_env: str = LOCK_TIMEOUT_ENV,
        error: type[LockTimeoutError] = SnapshotLockTimeoutError,
    ) -> None:
        self.path = path
        self.what = what  # for the timeout message, e.g. "template 1a2b..."
        self.timeout_env = timeout_env
        self.error = error
        self._fd: int | None = None
        self._gate: threading.Lock | None = None  # held exactly while _fd is
        self._pending: int | None = None  # opened, flock not yet taken

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float) -> None:
        """Block this thread until it holds the lock (creating the file if needed).

        For synchronous code and worker threads only; async code awaits
        :meth:`acquire_async`.

        :raises LockTimeoutError: (``error``) another process or task held it for
            ``timeout`` s.
        :raises OSError: the lock file cannot be created or opened.
        :raises RuntimeError: this object holds the lock already.
        :warns RuntimeWarning: this thread runs an event loop (which the wait blocks).
        """
        self._check_not_held()
        _warn_on_event_loop(self.path)
        deadline = time.monotonic() + timeout
        gate = _gate(self.path)
        if not gate.acquire(timeout=timeout if timeout < threading.TIMEOUT_MAX else -1):
            raise self._timed_out(timeout)
        try:
            delay = _POLL_MIN_S
            while not self._poll_file(create=True):
                if time.monotonic() >= deadline:
                    raise self._timed_out(timeout)
                time.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
        except BaseException:
            self._close_pending()
            gate.release()
            raise
        self._gate = gate

    async def acquire_async(self, timeout: float) -> None:
        """Wait until this task holds the lock, polling without blocking the event
        loop (no worker thread: cancelling the task stops the wait at once).

        :raises LockTimeoutError: (``error``) another process or task held it for
            ``timeout`` s.
        :raises OSError: the lock file cannot be created or opened.
        :raises RuntimeError: this object holds the lock already.
        """
        self._check_not_held()
        deadline = time.monotonic() + timeout
        gate = _gate(self.path)
        gated = False
        delay = _POLL_MIN_S
        try:
            while True:
                gated = gated or gate.acquire(blocking=False)
                if gated and self._poll_file(create=True):
                    self._gate = gate
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timed_out(timeout)
                await anyio.sleep(min(delay, left))
                delay = min(delay * 2, _POLL_MAX_S)
        except BaseException:
            self._close_pending()
            if gated:
                gate.release()
            raise

    def try_acquire(self, *, create: bool = True) -> bool:
        """Take the lock if nobody holds it, without waiting. With ``create=False``
        a missing lock file is left missing (and the lock is not taken).

        :raises OSError: the lock file cannot be created or opened.
        :raises RuntimeError: this object holds the lock already.
        """
        self._check_not_held()
        gate = _gate(self.path)
        if not gate.acquire(blocking=False):
            return False  # another thread or task of this process holds it
        try:
            locked = self._poll_file(create=create)
        finally:
            if self._fd is None:
                self._close_pending()
                gate.release()
        if locked:
            self._gate = gate
        return locked

    def release(self, *, delete: bool = False) -> None:
        """Release the lock; with ``delete`` also remove the lock file first (safe
        only because we hold it: waiters notice and move to a new file).
        Does nothing if the lock is not held.
        """
        fd, self._fd = self._fd, None
        gate, self._gate = self._gate, None
        if fd is None:
            return
        try:
            if delete and _names(fd, self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock
            if gate is not None:
                gate.release()

    def _check_not_held(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this EntryLock")

    def _poll_file(self, *, create: bool) -> bool:
        """One non-blocking try at the file lock; True (``_fd`` set) if taken.

        The file stays open between tries (``_pending``), so a holder deleting
        it is noticed by the inode check once the flock succeeds.
        """
        while True:
            if self._pending is None:
                if create:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
                try:
                    self._pending = os.open(self.path, flags, 0o666)
                except FileNotFoundError:
                    if create:
                        raise
                    return False
            if not _try_flock(self._pending):
                return False
            fd, self._pending = self._pending, None
            if _names(fd, self.path):
                self._fd = fd
                return True
            # Its holder deleted the file while we waited: lock the current one.
            os.close(fd)

    def _close_pending(self) -> None:
        fd, self._pending = self._pending, None
        if fd is not None:
            os.close(fd)

    def _timed_out(self, timeout: float) -> LockTimeoutError:
        return self.error(
            f"gave up after {timeout:g} s waiting for the lock on {self.what} ({self.path}): "
            "another process, or another task of this one, held it all that time; raise "
            f"${self.timeout_env} (seconds) if that build is just slow, or find the holder "
            f"with `fuser {self.path}`",
            lock_path=str(self.path),
            what=self.what,
            timeout=timeout,
            timeout_env=self.timeout_env,
        )


def cache_lock(path: Path, what: str) -> EntryLock:
    """An :class:`EntryLock` for a cache entry other than a template or zygote:
    its timeout raises :class:`LockTimeoutError` naming ``$MICROSANDBOX_CACHE_LOCK_TIMEOUT``.
    """
    return EntryLock(path, what, timeout_env=CACHE_LOCK_TIMEOUT_ENV, error=LockTimeoutError)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextlib.asynccontextmanager
async def hold(
    path: Path,
    what: str,
    timeout: float,
    *,
    timeout_env: str = LOCK_TIMEOUT_ENV,
    error: type[LockTimeoutError] = SnapshotLockTimeoutError,
) -> AsyncIterator[EntryLock]:
    """``async with hold(path, what, timeout) as lock:`` the lock is held inside
    (waited for with :meth:`EntryLock.acquire_async`: the event loop runs on).

    A body that raises (a failed build: no entry for the lock to guard) deletes
    the lock file on the way out, so failures leave no lock file behind.

    :raises SnapshotLockTimeoutError: (``error``) another process or task held it
        for ``timeout`` s.
    """
    lock = EntryLock(path, what, timeout_env=timeout_env, error=error)
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
