"""``--sandbox-keep-warm=SECONDS``: a project's process-isolation VM kept running
between runs, so the run after an edit neither restores a clone nor collects in
a QEMU whose translation cache is empty (README, "Performance").

The VM is a detached sandbox (``runtime/_supervisor.py``, docs/lifecycle.md)
restored from the base zygote, named ``msb-warm-<project>-<slot>``, with
``idle_timeout=SECONDS``: it shows in ``microsandbox ls``, stops by itself once
unused that long, and its supervisor owns it whatever happens to the run that
started it. In the guest, the base runner stays pristine (it never collects)
and forks a child per run (``guest/bootstrap.py``); the next go request kills
the last run's processes first.

A run claims its slot (0, or xdist's worker number) with a file lock, held for
the run: a concurrent run of the same slot finds it taken and goes the usual
way. The slot's record (``<slot>.json`` beside the lock) names the sandbox, the
base zygote it was restored from and the project's files as they were copied
in; the next run reuses the VM only if the base is the one it would restore
(same environment, interpreter, packages, options that shape the base), and
copies in only the files that changed, removing the ones that went.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc

from ..guest.messages import END, READY, Go, MessageError
from ..runtime import GuestTimeoutError, LockTimeoutError, SandboxConfig, SandboxError
from ..runtime._keys import digest_parts
from ..runtime._locks import EntryLock
from ..runtime._remote import RemoteSandbox, SandboxHandle, create_detached
from ..runtime._state import StateStore
from ..runtime.images import project_exclusions
from ..runtime.paths import cache_dir as default_cache_dir
from ._zygote import (
    CONTROL_DIR,
    GuestPlan,
    collected,
    copy_project,
    ensure_base_zygote,
    project_image,
    send_go,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

T = TypeVar("T")

#: How often a kept-warm VM's guest is asked for its metrics while a test runs.
HEARTBEAT_S = 5.0

__all__ = [
    "HEARTBEAT_S",
    "MAX_RECORD_BYTES",
    "FileState",
    "WarmRecord",
    "WarmSlot",
    "WarmVM",
    "claim_slot",
    "claim_warm",
    "file_changes",
    "project_files",
    "sweep_stale",
    "warm_sandbox_name",
]

#: (size, mtime in ns) of a project file as copied into the VM.
FileState = tuple[int, int]
#: A record larger than this is not read (a project of ~100k files fits).
MAX_RECORD_BYTES = 16 << 20


@dataclass(frozen=True)
class WarmRecord:
    """What a slot's VM holds: its sandbox's name, the base zygote it was
    restored from, the project's files (relative path -> state) copied in, and
    the last run's go request (the next run sends it again as soon as it has
    claimed the VM, before its own collection; "" for none).
    """

    sandbox: str
    base: str
    files: Mapping[str, FileState]
    go: str = ""

    def encode(self) -> str:
        files = {path: list(state) for path, state in sorted(self.files.items())}
        return json.dumps(
            {"sandbox": self.sandbox, "base": self.base, "files": files, "go": self.go}
        )

    @classmethod
    def decode(cls, text: str) -> WarmRecord | None:
        """The record in ``text``; None if it is not one (it is then ignored)."""
        try:
            data = json.loads(text)
            sandbox, base, raw = data["sandbox"], data["base"], data["files"]
            files = {str(p): (int(s[0]), int(s[1])) for p, s in raw.items()}
            go = data.get("go", "")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return None
        if not all(isinstance(v, str) for v in (sandbox, base, go)):
            return None
        return cls(sandbox=sandbox, base=base, files=files, go=go)


def _slots_dir(cache: Path | None, project_root: Path) -> Path:
    key = digest_parts(os.fspath(project_root.resolve()), length=16)
    return (cache or default_cache_dir()) / "warm" / key


def warm_sandbox_name(project_root: Path, slot: int) -> str:
    """The detached sandbox of ``project_root``'s ``slot`` (fits the store's names)."""
    return f"msb-warm-{digest_parts(os.fspath(project_root.resolve()), length=12)}-{slot}"


class WarmSlot:
    """A claimed slot: its lock is held until :meth:`release`."""

    def __init__(self, directory: Path, slot: int, lock: EntryLock) -> None:
        self.directory = directory
        self.slot = slot
        self._lock = lock
        self._path = directory / f"{slot}.json"

    def record(self) -> WarmRecord | None:
        """The slot's record, or None (none, unreadable or too large)."""
        try:
            with open(self._path, "rb") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
        except OSError:
            return None
        if len(raw) > MAX_RECORD_BYTES:
            return None
        return WarmRecord.decode(raw.decode("utf-8", "replace"))

    def write(self, record: WarmRecord) -> None:
        """Replace the record (written aside, then renamed into place)."""
        part = self._path.with_suffix(f".{os.getpid()}.part")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(record.encode())
            os.replace(part, self._path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()

    def forget(self) -> None:
        """Drop the record: the slot's VM is gone or not to be reused."""
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def release(self) -> None:
        """Let the slot go; its lock file (and the project's directory, once
        empty) too when no VM waits in it.
        """
        if self._lock.held:
            empty = not self._path.exists()
            self._lock.release(delete=empty)
            if empty:
                with contextlib.suppress(OSError):  # other slots are in it
                    self.directory.rmdir()

    @property
    def held(self) -> bool:
        return self._lock.held


def claim_slot(cache: Path | None, project_root: Path, slot: int) -> WarmSlot | None:
    """Slot ``slot`` of ``project_root``, its lock taken; None if another run holds
    it (that run's VM is not shared: this run goes the usual way).
    """
    directory = _slots_dir(cache, project_root)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = EntryLock(directory / f"{slot}.lock", f"warm VM slot {slot} of {project_root}")
    try:
        lock.acquire(0)
    except LockTimeoutError:
        return None
    return WarmSlot(directory, slot, lock)


def sweep_stale(cache: Path | None, alive: Callable[[str], bool]) -> int:
    """Drop the records (and lock files) of slots whose sandbox is gone (its idle
    timeout stopped it, or it was removed), skipping slots a run holds; the
    number dropped. ``alive(name)``: whether that sandbox still runs.
    """
    dropped = 0
    warm = (cache or default_cache_dir()) / "warm"
    with contextlib.suppress(OSError):
        for directory in list(warm.iterdir()):
            for path in list(directory.glob("*.json")):
                if not path.stem.isdigit():
                    continue
                lock = EntryLock(directory / f"{path.stem}.lock", "a warm VM slot")
                try:
                    lock.acquire(0)
                except (LockTimeoutError, OSError):
                    continue
                slot = WarmSlot(directory, int(path.stem), lock)
                record = slot.record()
                if record is None or not alive(record.sandbox):
                    slot.forget()
                    dropped += 1
                slot.release()
            with contextlib.suppress(OSError):
                directory.rmdir()
    return dropped


def project_files(
    root: Path, exclude_paths: Iterable[Path] = (), exclude_names: Iterable[str] = ()
) -> dict[str, FileState] | None:
    """The regular files under ``root`` (relative path -> state), skipping the
    project layer's exclusions; None if it holds anything else (a symlink, a
    device): such a tree is copied whole.
    """
    skip_paths = {os.fspath(p) for p in exclude_paths}
    skip_names = set(exclude_names)
    files: dict[str, FileState] = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [
            d for d in dirs if d not in skip_names and os.path.join(directory, d) not in skip_paths
        ]
        for name in names:
            path = os.path.join(directory, name)
            if name in skip_names or path in skip_paths:
                continue
            st = os.lstat(path)
            if not os.path.isfile(path) or os.path.islink(path):
                return None
            files[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
        for d in dirs:
            if os.path.islink(os.path.join(directory, d)):
                return None
    return files


def file_changes(
    before: Mapping[str, FileState], now: Mapping[str, FileState]
) -> tuple[list[str], list[str]]:
    """(new or changed paths, removed paths), each sorted."""
    changed = sorted(p for p, state in now.items() if before.get(p) != state)
    removed = sorted(p for p in before if p not in now)
    return changed, removed


# -- the VM ---------------------------------------------------------------------------------


class WarmVM:
    """A slot's detached sandbox as the host runner's ``process`` worker uses it:
    what :meth:`HostRunner.exchange` needs of a sandbox, plus :meth:`go`
    (start a run's child in the guest) and :meth:`park` (keep it for the next run).
    """

    def __init__(
        self, remote: RemoteSandbox, slot: WarmSlot, base: str, files: dict[str, FileState]
    ) -> None:
        self.remote = remote
        self.name = remote.name
        self.config = remote.config
        self.slot = slot
        self.base = base
        self.files = files
        self.running = True
        self.reused = False  # served an earlier run (else restored for this one)
        self.sent: Go | None = None  # the go request its guest runs now

    async def open_channel(self) -> anyio.abc.ByteStream:
        return await self.remote.open_channel()

    def console_tail(self, lines: int = 40) -> str:
        return f"(kept-warm VM {self.name}: its console is its supervisor's; see `microsandbox ls`)"

    async def _watched(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` while the guest is asked for its metrics every
        :data:`HEARTBEAT_S` through the supervisor: a hung guest raises
        GuestTimeoutError instead of blocking the run (as a local sandbox's
        watchdog does).
        """
        result: list[T] = []
        failure: list[SandboxError] = []

        async def run(scope: anyio.CancelScope) -> None:
            result.append(await call())
            scope.cancel()

        async def watch(scope: anyio.CancelScope) -> None:
            while True:
                await anyio.sleep(HEARTBEAT_S)
                try:
                    with anyio.fail_after(3 * HEARTBEAT_S):
                        await self.remote.metrics()
                except TimeoutError:
                    failure.append(
                        GuestTimeoutError(
                            f"kept-warm VM {self.name}: the guest stopped answering while "
                            f"{what} (no answer within {3 * HEARTBEAT_S:g} s)"
                        )
                    )
                except SandboxError as exc:
                    failure.append(exc)
                if failure:
                    scope.cancel()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, tg.cancel_scope)
                tg.start_soon(watch, tg.cancel_scope)
        except BaseExceptionGroup as group:  # call()'s own error, as itself
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if failure:
            raise failure[0]
        return result[0]

    async def send(self, request: Go) -> None:
        """Have the pristine base runner start a child collecting ``request``
        (replacing the one started before, if any)."""
        with contextlib.suppress(SandboxError):  # the last run's: not this one's
            await self.remote.fs().remove(f"{CONTROL_DIR}/{READY}")
        await send_go(self.remote, request.encode())
        self.sent = request

    async def go(self, plan: GuestPlan) -> None:
        """This run's child collected: the one started at the claim if it was
        sent what ``plan`` asks for, else a new one.

        :raises ZygoteError: it did not collect (the message has its log).
        """
        request = Go(cwd=plan.cwd, args=plan.args, keep=True)
        if self.sent != request:
            await self.send(request)
        await collected(self.remote)

    async def kill(self) -> None:
        """Stop and remove it (it crashed, broke the protocol, or is stale)."""
        self.running = False
        self.slot.forget()
        with contextlib.suppress(SandboxError, OSError):
            await self.remote.remove()
        await anyio.to_thread.run_sync(self.slot.release)

    async def park(self) -> None:
        """End this run in the guest (its processes killed), record the VM for the
        next run and let the slot go; if the guest does not take the end, kill it.
        """
        if not self.running:
            return
        try:
            await send_go(self.remote, END)
        except SandboxError:
            await self.kill()
            return
        self.running = False
        go = "" if self.sent is None else self.sent.encode()
        record = WarmRecord(sandbox=self.name, base=self.base, files=self.files, go=go)
        await anyio.to_thread.run_sync(self.slot.write, record)
        await anyio.to_thread.run_sync(self.slot.release)


async def _sync_files(
    remote: RemoteSandbox, root: Path, changed: list[str], removed: list[str]
) -> None:
    """Copy ``changed`` (paths relative to ``root``) in, remove ``removed``."""
    made: set[str] = set()
    for rel in changed:
        path = root / rel
        parent = os.fspath(path.parent)
        if parent not in made:
            await remote.fs().mkdir(parent, parents=True)
            made.add(parent)
        data = await anyio.Path(path).read_bytes()
        await remote.fs().write(os.fspath(path), data, mode=path.stat().st_mode & 0o7777)
    for rel in removed:
        with contextlib.suppress(SandboxError):
            await remote.fs().remove(os.fspath(root / rel))


async def _reuse(
    slot: WarmSlot, plan: GuestPlan, root: Path, files: dict[str, FileState], seconds: float
) -> WarmVM | None:
    """The slot's VM, its files brought up to date; None if there is none alive
    (or it was started with another idle time: it is removed).
    """
    record = await anyio.to_thread.run_sync(slot.record)
    if record is None:
        return None
    # Forgotten while in use: a run killed halfway leaves no record of files
    # that no longer say what the VM holds (its VM is replaced by the next run).
    await anyio.to_thread.run_sync(slot.forget)
    store = StateStore.default(plan.config.cache_dir)
    row = await anyio.to_thread.run_sync(store.get, record.sandbox)
    if row is None or not row.detached:
        return None
    if SandboxConfig.from_json(row.config).idle_timeout != seconds:  # asked for another time
        with contextlib.suppress(SandboxError, OSError):
            await SandboxHandle(store, row).remove()
        return None
    try:
        remote = await anyio.to_thread.run_sync(RemoteSandbox.open, store, row)
        changed, removed = file_changes(record.files, files)
        await _sync_files(remote, root, changed, removed)
    except SandboxError:
        with contextlib.suppress(SandboxError, OSError):
            await SandboxHandle(store, row).remove()
        return None
    vm = WarmVM(remote, slot, record.base, files)
    vm.reused = True
    if record.go:
        # The last run's request again, now: its collection runs beside this
        # run's own start-up and collection, and serves it if the files and
        # options are the same (WarmVM.go).
        try:
            request = Go.decode(record.go)
            if request.keep:
                await vm.send(request)
        except MessageError:
            pass  # not one: this run sends its own
        except SandboxError:
            await vm.kill()
            raise
    return vm


async def _start(
    slot: WarmSlot,
    plan: GuestPlan,
    root: Path,
    files: dict[str, FileState],
    seconds: float,
    build_name: str,
) -> WarmVM | None:
    """A new detached VM for the slot: the base zygote restored by its
    supervisor, the project copied in. None if the project is too large to copy.
    """
    project = await project_image(plan)
    if project is None:
        return None
    base = await ensure_base_zygote(plan, build_name)
    from ..snapshots._store import named_root

    config = plan.base_config().model_copy(
        update={"name": warm_sandbox_name(root, slot.slot), "idle_timeout": seconds}
    )
    remote = await create_detached(
        config, replace=True, restore=named_root(plan.config.cache_dir) / base
    )
    try:
        await copy_project(remote, *project)
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(SandboxError, OSError):
            await remote.remove()
        raise
    return WarmVM(remote, slot, base, files)


async def claim_warm(
    plan: GuestPlan, slot_number: int, seconds: float, build_name: str
) -> WarmVM | None:
    """This run's warm VM for ``plan``'s project: the slot's, reused, or a new one;
    None when another run holds the slot or the project cannot be copied in
    (the run then goes the usual way).
    """
    root = plan.config.resolved_project_root()
    if root is None:
        return None
    cache = plan.config.cache_dir
    store = StateStore.default(cache)

    def alive(name: str) -> bool:
        row = store.get(name)
        return row is not None and row.detached

    await anyio.to_thread.run_sync(sweep_stale, cache, alive)
    slot = await anyio.to_thread.run_sync(claim_slot, cache, root, slot_number)
    if slot is None:
        return None
    try:
        excluded = await anyio.to_thread.run_sync(project_exclusions, root, cache)
        files = await anyio.to_thread.run_sync(project_files, root, *excluded)
        if files is None:  # symlinks or special files: copied whole, each run
            return None
        vm = await _reuse(slot, plan, root, files, seconds)
        if vm is None:
            vm = await _start(slot, plan, root, files, seconds, build_name)
    except BaseException:
        await anyio.to_thread.run_sync(slot.release)
        raise
    if vm is None:
        await anyio.to_thread.run_sync(slot.release)
    return vm
