"""Sandbox: one microVM's lifecycle, commands, files and metrics (async API).

``Sandbox.create`` boots a VM whose PID 1 is our agent, waits for the agent's
READY, sends the host clock, a fresh RNG seed and the hostname, and returns a
handle. Every guest-facing call maps transport failures to errors that carry
the tail of the guest console, since that usually says why the guest died.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import os
import secrets
import shutil
import signal as _signal
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import anyio.abc

from ._confined import (
    DEFAULT_COPY_MAX_BYTES,
    DEFAULT_COPY_MAX_ENTRIES,
    ConfinedDir,
    CopyBudget,
)
from ._diagnostics import (
    DIAGNOSTICS_TIMEOUT_S,
    KMSG_MAX_BYTES,
    RecentExecs,
    kernel_messages_since,
    printable,
)
from ._exceptions import (
    BackendUnavailableError,
    CommandNotFoundError,
    ConfigError,
    CopyLimitError,
    ExecError,
    ExecTimeoutError,
    FilesystemError,
    GuestCrashedError,
    GuestTimeoutError,
    PathNotFoundError,
    ProtocolError,
    SandboxDrainingError,
    SandboxError,
    SandboxExistsError,
    SandboxNotRunningError,
    SandboxPausedError,
    SnapshotError,
)
from ._limits import OnOutputLimit, check_limit, check_timeout
from ._state import SandboxRecord, SandboxStatus, StateStore, new_record
from .agent.process import ExecProcess
from .agent.results import DirEntry, ExecEvent, ExecResult, FileKind, FileStat
from .backend import Backend, DirectTransferVM, describe_exit
from .config import SandboxConfig, Volume
from .images import SCRIPTS_DIR, ImageConfig, image_config_for, imaged_venv
from .lifetime import current_runtime
from .network import NetworkPolicy, NetworkStack, PortPublisher, Secret, SecretSubstituter
from .network._ports import RELAY_ARGS, RELAY_PROGRAM, RELAY_UDP_ARGS
from .network._streams import (
    NFT_PATHS,
    NFT_TABLE,
    STREAM_ARGS,
    STREAM_PORT,
    ExecTransport,
    MuxTransport,
    PortTransport,
)
from .network._tls import ensure_ca
from .provision import ColdBoot, GuestSession, Provisioner, Snapshotter, extensions
from .pty import PTY_WINDOW, PtySession
from .qemu import STREAM_PORT_NAME, XFER_DISK_BYTES, XFER_IMAGE, XFER_SERIAL
from .volumes import (
    lock_volumes,
    mount_volumes,
)

if TYPE_CHECKING:
    from ._remote import RemoteSandbox, SandboxHandle

__all__ = [
    "READ_STREAM_WINDOW",
    "ExecHandle",
    "ExecOutput",
    "Sandbox",
    "SandboxFs",
    "SandboxMetrics",
    "SandboxStatus",
    "exec_environment",
]

T = TypeVar("T")

#: A command's PATH in the guest when nothing sets another.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Seconds between liveness pings while a command runs (a hung guest is
#: reported after this plus ``request_timeout``, not never).
HEARTBEAT_INTERVAL = 5.0

#: Host->guest payloads at least this big go through the transfer disk
#: (>100 MB/s under TCG) instead of the agent port (~3 MB/s that way).
XFER_THRESHOLD = 1024 * 1024
#: Bytes of a guest file that :meth:`SandboxFs.read_stream` holds in host
#: memory at most: it reads the file one window of this size at a time.
READ_STREAM_WINDOW = 1024 * 1024
#: Transfers in flight take disjoint, aligned ranges of the transfer disk.
_XFER_ALIGN = 1 << 20
#: Seconds a sandbox whose agent connection dropped waits for its VM process
#: to end, to report how it ended.
_EXIT_GRACE_S = 1.0
#: How often ``drain()`` looks whether the running commands are done.
_DRAIN_POLL_S = 0.05

#: The named sandboxes this process owns, so ``Sandbox.remove(name)`` here stops
#: the object itself (gracefully) instead of killing its VM from outside.
_owned: weakref.WeakValueDictionary[str, Sandbox] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class ExecOutput:
    """The result of a finished command (names follow microsandbox's SDK)."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    term_signal: int | None = None
    #: Output past ``max_output`` was dropped (only with ``on_output_limit="truncate"``).
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def truncated(self) -> bool:
        """Whether stdout or stderr is cut short at ``max_output``."""
        return self.stdout_truncated or self.stderr_truncated

    @property
    def stdout_text(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    # Aliases for people coming from subprocess.
    @property
    def stdout(self) -> bytes:
        return self.stdout_bytes

    @property
    def stderr(self) -> bytes:
        return self.stderr_bytes

    @classmethod
    def _from_result(cls, result: ExecResult) -> ExecOutput:
        return cls(
            exit_code=result.returncode,
            stdout_bytes=result.stdout,
            stderr_bytes=result.stderr,
            term_signal=result.term_signal,
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
        )


@dataclass(frozen=True)
class SandboxMetrics:
    """A sample of the guest's resource use."""

    cpu_percent: float  # guest CPU busy share since boot or since the last sample
    memory_bytes: int  # guest memory in use (MemTotal - MemAvailable)
    memory_total_bytes: int
    memory_host_resident_bytes: int | None  # VM process RSS on the host
    uptime_ms: int
    processes: int
    load1: float


#: Where a sandbox with secrets finds the interception CA (its overlay only).
_GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: Output of ``agent --stream`` the host holds unacknowledged (its frames).
_STREAM_WINDOW = 4 << 20
#: Output of an ``exec_stream`` the host holds before the caller takes it: past
#: it the agent stops reading the command's pipes (the command blocks), so a
#: command nobody reads, or a hostile guest, cannot grow host memory.
EXEC_STREAM_WINDOW = 1 << 20
_GUEST_CA_FILE = "/etc/ssl/certs/pytest-microsandbox-ca.pem"
_CA_ENV = {
    "SSL_CERT_FILE": _GUEST_CA_BUNDLE,  # OpenSSL, Python's ssl
    "REQUESTS_CA_BUNDLE": _GUEST_CA_BUNDLE,
    "CURL_CA_BUNDLE": _GUEST_CA_BUNDLE,
    "NODE_EXTRA_CA_CERTS": _GUEST_CA_FILE,
}


class ExecHandle:
    """A running command: iterate its events, feed stdin, signal it, wait for it."""

    def __init__(self, sandbox: Sandbox, process: ExecProcess, timeout: float | None) -> None:
        self._sandbox = sandbox
        self._process = process
        self._timeout = timeout

    @property
    def pid(self) -> int:
        return self._process.pid

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ExecEvent]:
        async with self._sandbox._guest_errors(new=False):
            async for event in self._process:
                yield event

    async def write_stdin(self, data: bytes) -> None:
        async with self._sandbox._guest_errors(new=False):
            await self._process.write_stdin(data)

    async def close_stdin(self) -> None:
        async with self._sandbox._guest_errors(new=False):
            await self._process.close_stdin()

    async def signal(self, sig: int) -> None:
        async with self._sandbox._guest_errors(new=False):
            await self._process.signal(sig)

    async def kill(self) -> None:
        async with self._sandbox._guest_errors(new=False):
            await self._process.kill()

    async def wait(
        self, *, max_output: int | None = None, on_output_limit: OnOutputLimit | None = None
    ) -> ExecOutput:
        """Wait for the exit; output not consumed by iteration is in the result.

        The output it collects is capped like :meth:`Sandbox.exec`'s (events
        taken by iterating are not).

        :raises ExecTimeoutError: the command ran past its timeout and was killed.
        :raises OutputLimitError: the output passed ``max_output`` (killed).
        """
        limit, action = self._sandbox._output_limit(max_output, on_output_limit)
        async with self._sandbox._guest_errors(new=False):
            result = await self._process.wait(max_output=limit, on_output_limit=action)
        self._sandbox._recent.record([self._process.program], _outcome(result), result.stderr)
        return _finish(result, self._process.program, self._timeout)

    async def __aenter__(self) -> ExecHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._process.aclose()


def _finish(result: ExecResult, program: str, timeout: float | None) -> ExecOutput:
    if result.timed_out:
        raise ExecTimeoutError(
            f"{program!r} ran past its {timeout:g} s timeout and was killed in the guest",
            stdout=result.stdout,
            stderr=result.stderr,
            timeout=timeout or 0.0,
        )
    return ExecOutput._from_result(result)


class SandboxFs:
    """Guest files (names follow microsandbox's ``sandbox.fs``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def read(self, path: str, *, max_size: int | None = None) -> bytes:
        """Return a guest file's content.

        :raises OutputLimitError: it is over ``max_size`` bytes (default
            ``config.max_read_bytes``); the guest stops reading it. Copy big
            files with :meth:`copy_to_host`, which streams to disk.
        """
        limit = self._sb.config.max_read_bytes if max_size is None else max_size
        check_limit(limit, "max_size")
        return await self._sb._watched(
            f"reading {path}", lambda: self._sb._agent.read_file(path, max_size=limit)
        )

    async def read_text(
        self, path: str, encoding: str = "utf-8", *, max_size: int | None = None
    ) -> str:
        return (await self.read(path, max_size=max_size)).decode(encoding)

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        """Write a whole file, creating parent directories; returns the size."""
        payload = data.encode() if isinstance(data, str) else data
        if len(payload) >= XFER_THRESHOLD:
            return await self._sb._import(payload, path, mode)
        return await self._sb._watched(
            f"writing {path}", lambda: self._sb._agent.write_file(path, payload, mode=mode)
        )

    async def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """Yield a guest file's content in chunks, any size, holding at most
        :data:`READ_STREAM_WINDOW` bytes of it in host memory at a time (the
        file is read window by window: a file that changes meanwhile is not
        read as one snapshot). Chunks are never empty.

        :raises PathNotFoundError: there is no such file.
        :raises FilesystemError: it is not a regular file, or reading it failed.
        """
        offset = 0
        while True:
            window = await self._read_window(path, offset)
            got = sum(len(chunk) for chunk in window)
            while window:
                chunk = window.pop(0)
                if chunk:
                    yield chunk
            offset += got
            if got < READ_STREAM_WINDOW:
                return

    async def _read_window(self, path: str, offset: int) -> list[bytes]:
        window: list[bytes] = []
        await self._sb._watched(
            f"reading {path}",
            lambda: self._sb._agent.read_file_to(
                path, window.append, offset=offset, length=READ_STREAM_WINDOW
            ),
        )
        return window

    async def write_stream(
        self, path: str, chunks: AsyncIterable[bytes] | Iterable[bytes], *, mode: int = 0o644
    ) -> int:
        """Write the chunks of ``chunks`` (an iterable or async iterable of bytes)
        to a guest file as they come, creating parent directories; returns the
        size. Memory holds one chunk at a time. Through the agent's port
        (~3 MB/s under TCG): copy a big host file with :meth:`copy_from_host`.
        """

        async def pieces() -> AsyncIterator[bytes]:
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    yield _as_bytes(chunk)
            else:
                for chunk in chunks:
                    yield _as_bytes(chunk)

        return await self._sb._watched(
            f"writing {path}", lambda: self._sb._agent.write_file(path, pieces(), mode=mode)
        )

    async def copy(self, src: str, dst: str) -> int:
        """Copy the guest file ``src`` to ``dst`` inside the guest (no data
        passes through the host), creating parent directories and keeping its
        permission bits; returns the size.

        :raises PathNotFoundError: ``src`` does not exist.
        :raises FilesystemError: ``src`` is not a regular file, or the copy failed.
        """
        st = await self.stat(src)
        return await self._sb._watched(
            f"copying {src} to {dst}",
            lambda: self._sb._agent.copy_file(src, dst, mode=st.permissions),
        )

    async def list(self, path: str) -> list[DirEntry]:
        async with self._sb._guest_errors():
            return await self._sb._agent.list_dir(path, timeout=self._sb._request_timeout)

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        async with self._sb._guest_errors():
            return await self._sb._agent.stat(
                path, follow_symlinks=follow_symlinks, timeout=self._sb._request_timeout
            )

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path, follow_symlinks=False)
        except PathNotFoundError:
            return False
        return True

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        async with self._sb._guest_errors():
            await self._sb._agent.mkdir(
                path, mode=mode, parents=parents, timeout=self._sb._request_timeout
            )

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        async with self._sb._guest_errors():
            await self._sb._agent.remove(
                path, recursive=recursive, timeout=self._sb._request_timeout
            )

    async def rename(self, src: str, dst: str) -> None:
        async with self._sb._guest_errors():
            await self._sb._agent.rename(src, dst, timeout=self._sb._request_timeout)

    async def chmod(self, path: str, mode: int) -> None:
        async with self._sb._guest_errors():
            await self._sb._agent.chmod(path, mode, timeout=self._sb._request_timeout)

    async def copy_from_host(self, host_path: str | os.PathLike[str], guest_path: str) -> int:
        """Copy a host file or directory tree into the guest; returns bytes copied."""
        src = Path(host_path)
        if src.is_dir():
            total = 0
            await self.mkdir(guest_path)
            for entry in sorted(src.iterdir()):
                total += await self.copy_from_host(entry, f"{guest_path.rstrip('/')}/{entry.name}")
            return total
        st = src.stat()
        mode = st.st_mode & 0o7777
        if st.st_size >= XFER_THRESHOLD:
            return await self._sb._import(src, guest_path, mode)
        return await self._sb._watched(
            f"writing {guest_path}",
            lambda: self._sb._agent.write_file(guest_path, src, mode=mode),
        )

    async def copy_to_host(
        self,
        guest_path: str,
        host_path: str | os.PathLike[str],
        *,
        max_bytes: int | None = DEFAULT_COPY_MAX_BYTES,
        max_entries: int | None = DEFAULT_COPY_MAX_ENTRIES,
    ) -> int:
        """Copy a guest file (streamed, any size) or directory tree to the host;
        returns the bytes copied.

        Everything written is confined under ``host_path`` (docs/host-writes.md):
        guest names are checked, guest symlinks are copied as symlinks and
        never followed, a symlink found inside the destination is refused
        (UnsafeHostPathError), and files appear whole or not at all.
        ``guest_path`` itself is resolved in the guest; its entries are not.
        ``max_bytes`` / ``max_entries`` (None: no limit) bound the copy;
        passing one raises CopyLimitError. Permission bits are copied, less
        setuid/setgid/sticky.
        """
        budget = CopyBudget(max_bytes, max_entries, what=f"copying {guest_path} to {host_path}")
        st = await self.stat(guest_path)
        with ConfinedDir.parent_of(host_path) as (parent, name):
            budget.charge_entry(guest_path)
            if st.is_dir:
                with parent.subdir(name) as top:
                    return await self._copy_tree_to_host(guest_path, top, budget)
            return await self._copy_file_to_host(guest_path, st, parent, name, budget)

    async def _copy_tree_to_host(self, guest_dir: str, top: ConfinedDir, budget: CopyBudget) -> int:
        """Copy the guest directory ``guest_dir``'s entries into ``top``.

        Walks with lstat semantics (the agent's DIRENT kinds): a guest link is
        copied as a link. The walk keeps a stack of (guest path, host
        components below ``top``) and re-enters each host directory from
        ``top`` without following links, so only two fds are open at a time.
        """
        total = 0
        pending: list[tuple[str, tuple[str, ...]]] = [(guest_dir, ())]
        while pending:
            guest, parts = pending.pop()
            try:
                async with self._sb._guest_errors():
                    entries = await self._sb._agent.list_dir(
                        guest, timeout=self._sb._request_timeout, max_entries=budget.entries_left
                    )
            except CopyLimitError:
                raise budget.too_many_entries(f"{guest} holds too many entries", guest) from None
            subdirs: list[tuple[str, tuple[str, ...]]] = []
            with top.descend(parts) as here:
                for entry in sorted(entries, key=lambda e: e.name):
                    child = f"{guest.rstrip('/')}/{entry.name}"
                    budget.charge_entry(child)
                    if entry.kind is FileKind.DIRECTORY:
                        here.subdir(entry.name).close()
                        subdirs.append((child, (*parts, entry.name)))
                    elif entry.kind is FileKind.SYMLINK:
                        async with self._sb._guest_errors():
                            target = await self._sb._agent.readlink(
                                child, timeout=self._sb._request_timeout
                            )
                        here.symlink(entry.name, target)
                    elif entry.kind is FileKind.FILE:
                        st = FileStat(entry.kind, entry.size, entry.mode, entry.mtime_ns, 0, 0)
                        total += await self._copy_file_to_host(child, st, here, entry.name, budget)
                    else:
                        raise FilesystemError(
                            f"copying {guest_dir} to the host: {child} is not a regular file, "
                            "directory or symlink (copy_to_host copies only those)",
                            path=child,
                        )
            pending.extend(reversed(subdirs))
        return total

    async def _copy_file_to_host(
        self, guest_file: str, st: FileStat, into: ConfinedDir, name: str, budget: CopyBudget
    ) -> int:
        if not st.is_file:
            raise FilesystemError(
                f"{guest_file} is not a regular file or directory (copy_to_host copies those)",
                path=guest_file,
            )
        budget.check_bytes(st.size, guest_file)  # the agent's size can lie; writes are counted too
        with into.new_file(name, st.permissions, budget=budget) as out:
            return await self._sb._watched(
                f"reading {guest_file}", lambda: self._sb._agent.read_file_to(guest_file, out.write)
            )


class Sandbox:
    """A running microVM. Create with :meth:`create`; use as an async context manager."""

    def __init__(self, config: SandboxConfig, session: GuestSession) -> None:
        """Wrap a started guest; use :meth:`create`, or :meth:`from_session` for a
        session of a provisioner of your own.
        """
        self.config = config
        self.name = config.name
        self.plan = session.plan  # None for a sandbox restored from a named snapshot
        self._session = session
        self._vm = session.vm
        self._agent = session.agent
        self._stopped = False
        self._request_timeout = config.request_timeout
        self._last_cpu: tuple[int, int] | None = None
        self._xfer_users = 0
        self._xfer_next = 0  # first free byte of the transfer disk
        self._xfer_lock = anyio.Lock()
        #: The OCI image's config (env, workdir, user, entrypoint), or None.
        self.image_config: ImageConfig | None = _image_config(config)
        self._recent = RecentExecs()
        self._base_env: dict[str, str] | None = None
        self._network: NetworkStack | None = None
        self._captured_network = False
        #: Secret placeholders to keep (env var -> placeholder): a restore's or fork's.
        self._placeholders: dict[str, str] = {}
        self._ports: PortPublisher | None = None
        self.boot_seconds = 0.0
        # Lifecycle (pause, drain, host timers, the state store).
        self._paused = False
        self._draining = False
        self._active = 0  # guest operations in flight
        self._streams: weakref.WeakSet[ExecHandle] = weakref.WeakSet()
        self._ptys: weakref.WeakSet[PtySession] = weakref.WeakSet()
        self._last_activity = time.monotonic()
        self._stopped_event = anyio.Event()
        self._timers = anyio.CancelScope()
        #: The heartbeat of guest calls in flight (:meth:`_watched`), started by the first.
        self._watchdog: anyio.CancelScope | None = None
        self._watches: set[anyio.CancelScope] = set()
        #: Why the sandbox stopped: "stopped" (stop/kill/drain), "max_duration",
        #: "idle_timeout" (a host timer), "exited" (the VM ended on its own).
        self.stop_reason: str | None = None
        self._store: StateStore | None = None
        self._record: SandboxRecord | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @overload
    @classmethod
    async def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        register: bool = False,
        replace: bool = False,
        detached: Literal[False] = False,
        **overrides: Any,
    ) -> Sandbox: ...

    @overload
    @classmethod
    async def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        register: bool = False,
        replace: bool = False,
        detached: Literal[True],
        **overrides: Any,
    ) -> RemoteSandbox: ...

    @classmethod
    async def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        register: bool = False,
        replace: bool = False,
        detached: bool = False,
        **overrides: Any,
    ) -> Sandbox | RemoteSandbox:
        """Boot a sandbox and return once its agent is serving.

        ``overrides`` are :class:`SandboxConfig` fields applied on top of ``config``.
        Unless ``cold_boot``, the sandbox is a copy-on-write clone of a template of
        its configuration (built once) when the snapshot layer is installed.

        ``register=True`` makes it a **named** sandbox: it is in the state store
        (:meth:`list`, :meth:`get`, :meth:`remove` from any process) and its
        ``name`` is unique among live named sandboxes; ``replace=True`` (which
        implies ``register``) stops the one that has the name first. Other
        sandboxes are not registered, so any number may share a name (the
        plugin's, tests' under xdist).

        ``detached=True`` (implies ``register``) starts it under a supervisor
        process of its own, so it outlives this process, and returns a
        :class:`~._remote.RemoteSandbox` driving it through that supervisor.
        Attached sandboxes die with the process that created them.

        :raises ConfigError: a field is invalid, or ``memory``/``cpus`` is more than
            this host has.
        :raises SandboxExistsError: a live sandbox has the name and ``replace`` is false.
        :raises BackendUnavailableError: QEMU, the kernel or a usable accelerator is missing.
        :raises BootError: the guest did not reach its agent in ``boot_timeout``.
        """
        named = register or replace or detached
        explicit_name = "name" in overrides or (
            config is not None and "name" in config.model_fields_set
        )
        if config is None:
            config = SandboxConfig(**overrides)
        elif overrides:
            config = SandboxConfig(**{**config.model_dump(), **overrides})
        if named and not explicit_name:
            raise ConfigError(
                "a named sandbox (register, replace or detached) needs a name: "
                "Sandbox.create(..., name='web', register=True); other processes find it by it"
            )
        if detached:
            if backend is not None:
                raise ConfigError("detached=True uses the QEMU backend; drop backend=")
            from ._remote import create_detached

            return await create_detached(config, replace=replace)
        store = StateStore.default(config.cache_dir) if named else None
        record = None
        if store is not None:
            record = await _claim_name(store, config, replace=replace)
        try:
            sandbox = await cls._boot(config, backend)
        except BaseException:
            if store is not None and record is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(store.release, record)
            raise
        if store is not None and record is not None:
            await sandbox._register(store, record)
        return sandbox

    @classmethod
    async def _boot(cls, config: SandboxConfig, backend: Backend | None) -> Sandbox:
        if backend is None:
            from .qemu import QemuBackend

            backend = QemuBackend()
        start = time.monotonic()
        provisioner: Provisioner
        if isinstance(backend, Provisioner):  # a test double that provisions itself
            provisioner = backend
        else:
            templates = None if config.cold_boot else extensions().templates
            provisioner = templates or ColdBoot()
        session = await provisioner.provision(config, backend)
        sandbox = await cls.from_session(config, session)
        sandbox.boot_seconds = time.monotonic() - start
        return sandbox

    async def _register(self, store: StateStore, record: SandboxRecord) -> None:
        """Mark this sandbox's row RUNNING; it is released when the sandbox stops."""
        self._store = store
        self._record = await anyio.to_thread.run_sync(
            lambda: store.update(record, status=SandboxStatus.RUNNING, vm_pid=self.pid)
        )
        _owned[self.name] = self

    # -- named sandboxes (the state store, runtime/_state.py) -------------------------------

    @staticmethod
    async def list(*, cache_dir: str | os.PathLike[str] | None = None) -> list[SandboxHandle]:
        """The live named sandboxes of every process, oldest first."""
        from ._remote import SandboxHandle

        store = StateStore.default(cache_dir)
        records = await anyio.to_thread.run_sync(store.list)
        return [SandboxHandle(store, record) for record in records]

    @staticmethod
    async def get(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> SandboxHandle:
        """The live named sandbox ``name`` (of any process).

        :raises SandboxNotFoundError: there is none.
        """
        from ._remote import get_handle

        return await get_handle(StateStore.default(cache_dir), name)

    @staticmethod
    async def remove(
        name: str,
        *,
        timeout: float | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Stop the named sandbox ``name``, whichever process owns it, and remove
        everything it holds (VM, sockets, overlays, its row).

        :raises SandboxNotFoundError: there is none.
        """
        handle = await Sandbox.get(name, cache_dir=cache_dir)
        await handle.remove(timeout=timeout)

    @classmethod
    async def from_session(
        cls,
        config: SandboxConfig,
        session: GuestSession,
        *,
        secret_placeholders: Mapping[str, str] | None = None,
        captured_network: bool = False,
    ) -> Sandbox:
        """Take over a provisioned guest: give it the host clock, a fresh RNG seed
        and its hostname, mount ``config.volumes``, return the sandbox. The
        session is closed if that fails.

        ``secret_placeholders`` (env var -> placeholder) are those the guest
        already holds (a restored snapshot's, a fork's parent's): the secrets of
        ``config`` keep them instead of drawing new ones. ``captured_network``:
        the guest was captured with a network on, so it may hold the captured
        sandbox's stream path (its redirect and its listener, whose host end is
        gone): the new one replaces it before the sandbox is handed out.
        """
        sandbox = cls(config, session)
        sandbox._placeholders = dict(secret_placeholders or {})
        sandbox._captured_network = captured_network
        try:
            await sandbox._configure_guest()
        except BaseException:
            await session.aclose()
            raise
        if config.max_duration is not None or config.idle_timeout is not None:
            runtime = await current_runtime()
            runtime.spawn(sandbox._enforce_limits)
        return sandbox

    @property
    def session(self) -> GuestSession:
        """The guest session this sandbox drives (its VM, agent client, monitor)."""
        return self._session

    async def _configure_guest(self) -> None:
        async with self._guest_errors():
            # The network's host side (host work only) starts while the guest
            # runs CONFIGURE, and NET follows as soon as it is up, without
            # waiting for CONFIGURE's reply (the agent answers them in order):
            # one round trip less before the first command.
            net: asyncio.Future[NetworkStack] | None = None
            if self.config.network is not None:
                stack = self._network_stack(self.config.network)
                net = asyncio.ensure_future(self._net_setup(stack))
            try:
                await self._agent.configure(
                    time_ns=time.time_ns(),
                    seed=os.urandom(64),
                    hostname=self.name,
                    timeout=self._request_timeout,
                )
                if self.config.volumes:
                    # Named volumes: one sandbox at a time, released when the session ends.
                    for fd in lock_volumes(self.config.volumes):
                        self._session.stack.callback(os.close, fd)
                    await mount_volumes(self._agent, self.config.volumes, self._request_timeout)
                if net is not None:
                    await net
            except BaseException:
                if net is not None:  # stopped, its error (if any) retrieved
                    net.cancel()
                    with contextlib.suppress(BaseException):
                        await net
                raise
            if net is not None:
                await self._start_network(net.result())
            if self.config.ports:
                await self._publish_ports()

    async def _publish_ports(self) -> None:
        async def start_relay(guest_port: int, protocol: str) -> ExecHandle:
            flag = RELAY_UDP_ARGS if protocol == "udp" else RELAY_ARGS
            return await self.exec_stream(
                RELAY_PROGRAM, [flag, str(guest_port)], stdin=True, user="0"
            )

        publisher = PortPublisher(self.config.ports, start_relay)
        await publisher.start()
        self._session.stack.push_async_callback(publisher.aclose)
        self._ports = publisher

    @property
    def published_ports(self) -> dict[int | str, int]:
        """guest port (a ``config.ports`` key: 8080 for TCP, "5353/udp") -> the host
        127.0.0.1 port that reaches it.
        """
        return {} if self._ports is None else self._ports.bound

    def _network_stack(self, policy: NetworkPolicy) -> NetworkStack:
        """This sandbox's host-side network, not started; closed with the session."""
        stack = NetworkStack(
            policy,
            self.config.hosts,
            self._vm.spec.run_dir,
            SecretSubstituter(self.config.secrets, self._placeholders)
            if self.config.secrets
            else None,
            cache_dir=self.config.cache_dir,
            upstream_ca_certs=self.config.upstream_ca_certs,
        )
        self._session.stack.push_async_callback(stack.aclose)
        return stack

    async def _net_setup(self, stack: NetworkStack) -> NetworkStack:
        """Start ``stack`` and give the guest its interfaces (fresh key, MAC
        and address on every restore: clones share no identity). Done before
        the sandbox is handed out: the first command has the network.
        """
        await stack.start()
        self._network = stack
        await self._agent.net_setup(
            stack.guest_blob(), stack.resolv_conf().encode(), timeout=self._request_timeout
        )
        return stack

    async def _start_network(self, stack: NetworkStack) -> None:
        """After :meth:`_net_setup`: the interception CA (secrets) and the
        stream path.
        """
        if stack.secrets is not None:
            await self._trust_interception_ca()
        stack.start_stream_path(
            self._start_stream_mux, self._apply_nft, stale=self._captured_network
        )
        if self._captured_network:
            # The captured redirect leads to a listener whose host end is gone:
            # the first command must find the new one (or WireGuard) in place.
            up = await stack.wait_stream_path(self._request_timeout)
            if not up and stack.stream_state == "starting":
                await self._apply_nft(f"delete table inet {NFT_TABLE}")

    async def _start_stream_mux(self, token: str) -> MuxTransport:
        """The guest end of the stream path (``agent --stream``, no timeout) and
        the transport to it: the VM's stream port, else the agent channel
        (the exec's stdin/stdout, its output bounded by a window).
        """
        argv = [RELAY_PROGRAM, STREAM_ARGS, str(STREAM_PORT), token]
        try:
            port = await self._vm.connect_stream_port(self._request_timeout)
        except (BackendUnavailableError, SandboxNotRunningError):
            port = None
        if port is None:
            handle = await self._agent.exec_stream(
                argv, env={}, cwd="/", user="0", stdin=True, window=_STREAM_WINDOW
            )
            return ExecTransport(handle)
        try:
            # Over the port it leaves the agent once listening (exit 0).
            result = await self._agent.exec(
                [*argv, STREAM_PORT_NAME],
                env={},
                cwd="/",
                user="0",
                timeout=self._request_timeout,
                max_output=1 << 16,
            )
            if not result.ok:
                raise ExecError(f"agent --stream exited with {result.returncode}")
        except BaseException:
            await port.aclose()
            raise
        return PortTransport(port)

    async def _apply_nft(self, commands: str) -> bool:
        """Run ``nft`` commands in the guest as root; False when it cannot (an
        image without nft, a kernel without its modules).
        """
        for nft in NFT_PATHS:
            try:
                result = await self._agent.exec(
                    [nft, commands], env={}, cwd="/", user="0", timeout=60, max_output=1 << 16
                )
            except CommandNotFoundError:
                continue
            except SandboxError:
                return False
            return result.ok
        return False

    async def _trust_interception_ca(self) -> None:
        """Add the cache directory's interception CA to the guest's trust store
        (its overlay only) and point the usual variables at it (see _exec_env).
        """
        ca = await anyio.to_thread.run_sync(ensure_ca, self.config.cache_dir)
        try:
            bundle = await self._agent.read_file(
                _GUEST_CA_BUNDLE, timeout=self._request_timeout, max_size=16 << 20
            )
        except SandboxError:
            bundle = b""  # an image without a CA bundle: ours alone
        if bundle and not bundle.endswith(b"\n"):
            bundle += b"\n"
        for path, data in ((_GUEST_CA_FILE, ca.cert_pem), (_GUEST_CA_BUNDLE, bundle + ca.cert_pem)):
            await self._agent.write_file(path, data, mode=0o644, timeout=self._request_timeout)

    @property
    def network(self) -> NetworkStack:
        """This sandbox's network: ``network.events()`` lists every connection
        attempt and DNS query with its verdict.

        :raises ConfigError: the sandbox was created without ``network=``.
        """
        if self._network is None:
            raise ConfigError(
                f"sandbox {self.name!r} has no network: create it with network='public-only' "
                "(or a NetworkPolicy)"
            )
        return self._network

    # -- snapshots (pytest_microsandbox.snapshots, installed as an extension) -----------------

    @classmethod
    async def restore(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        volumes: Mapping[str, Volume | str | os.PathLike[str]] | None = None,
        network: NetworkPolicy | str | None = None,
        disable_network: bool = False,
        secrets: Sequence[Secret] | None = None,
    ) -> Sandbox:
        """Start a sandbox from a named snapshot (or a snapshot directory's path).

        ``volumes`` (guest path -> :meth:`Volume.bind`) are mounted in the restored
        sandbox; a snapshot itself never carries any. ``network`` replaces the
        captured network policy, ``disable_network=True`` drops it; each restore
        gets a fresh network identity (key, MAC, address).

        ``secrets``: a snapshot stores no secret value (only the placeholders the
        guest holds), so a snapshot of a sandbox with secrets is restored with
        them passed again (same ``env_var``; the placeholders in the guest keep
        working), or with ``disable_network=True``.

        :raises SnapshotNotFoundError: there is no such snapshot.
        :raises SnapshotError: it is broken or the restore failed.
        :raises ConfigError: a volume is invalid, or a secret of the capture is
            not passed again.
        """
        return await _snapshotter().restore(
            name_or_path,
            name=name,
            volumes=volumes,
            network=network,
            disable_network=disable_network,
            secrets=secrets,
        )

    async def snapshot(self, name: str) -> Path:
        """Capture this running sandbox (memory, devices, in-RAM overlay) as snapshot
        ``name``; it pauses for the capture and runs on. Returns the snapshot's path.

        A paused sandbox runs for the capture and is paused again after it.

        :raises SnapshotError: cold-booted sandbox, mounted volume, full disk, QEMU error.
        """
        async with self._unpaused():
            await self._settle_network()
            return await _snapshotter().snapshot(self, name)

    async def fork(self, name: str | None = None) -> Sandbox:
        """A child sandbox carrying this one's state; later writes diverge. With a
        ``name`` the capture is kept for more children (``Sandbox.restore(name)``).

        :raises SnapshotError: like :meth:`snapshot`.
        """
        async with self._unpaused():
            await self._settle_network()
            return await _snapshotter().fork(self, name)

    async def _settle_network(self) -> None:
        """Let a stream path that is starting finish (its requests to the agent
        and its ``nft`` run) before a capture, so that no capture holds them
        half done.
        """
        if self._network is not None:
            await self._network.wait_stream_path(self._request_timeout)

    @contextlib.asynccontextmanager
    async def _unpaused(self) -> AsyncIterator[None]:
        """Run the guest for the body if it is paused (a capture talks to its
        agent), and pause it again after.
        """
        if not self._paused:
            yield
            return
        await self._set_paused(False)
        try:
            yield
        finally:
            if not self._stopped:
                with anyio.CancelScope(shield=True):
                    await self._set_paused(True)

    async def detach(self) -> RemoteSandbox:
        """Move this sandbox under a supervisor process, so it outlives this one,
        and return the :class:`~._remote.RemoteSandbox` driving it there.

        The VM's process dies with its creator (its parent-death signal cannot
        be handed over), so the guest moves instead: it is captured like
        :meth:`snapshot`, this VM stops, and the supervisor restores the
        capture under the same name (registered, as with ``detached=True``):
        memory, files and guest processes carry over; host-side handles of
        running commands (``exec_stream``) do not, and the host timers start
        again. The capture is deleted once restored.

        :raises SnapshotError: the sandbox cannot be captured (cold-booted, a
            mounted volume), or the restore failed.
        :raises SandboxExistsError: another live sandbox took the name meanwhile.
        """
        self._check_running()
        snapshots = _snapshotter()
        capture = f"detach-{secrets.token_hex(8)}"
        path = await self.snapshot(capture)
        config = self.config
        try:
            await self.stop()
            from ._remote import create_detached

            return await create_detached(config, replace=False, restore=path)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(SandboxError, OSError):
                await snapshots.remove(capture, config.cache_dir)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return not self._stopped and self._vm.returncode is None

    @property
    def pid(self) -> int | None:
        """Host process id of the VM."""
        return self._vm.pid

    @property
    def console_path(self) -> Path:
        return self._vm.spec.console_path

    def console_tail(self, lines: int = 40) -> str:
        """The last lines the guest printed on its console."""
        return self._vm.console_tail(lines)

    async def diagnostics(self, timeout: float = DIAGNOSTICS_TIMEOUT_S) -> str:
        """What to show when a test that used this sandbox fails: its last
        commands (each with how it ended and its stderr's last lines) and the
        guest kernel's messages since this sandbox started serving (a clone's
        console is silent after its restore). Bounded, cleaned text; never
        raises for a guest that cannot answer (the text says so).
        """
        parts = [self._recent.render()]
        if self._network is not None:
            events = self._network.events()[-50:]
            parts.append("network events (newest last):" + ("" if events else " none"))
            parts.extend(f"  {e.describe()}" for e in events)
        info = self._agent.hello_info or self._agent.ready_info
        since = None if info is None else info.uptime_ms / 1000
        heading = "guest kernel messages" + (
            "" if since is None else f" since the sandbox started serving (uptime {since:.1f} s)"
        )
        if not self.running:
            parts.append(f"{heading}: unavailable, the sandbox is not running")
            return "\n".join(parts)
        try:
            with anyio.fail_after(timeout):
                result = await self._agent.exec(
                    ["dmesg", "-r"],
                    env={"PATH": DEFAULT_PATH, "LANG": "C"},
                    user="0",
                    timeout=timeout,
                    max_output=KMSG_MAX_BYTES,
                    on_output_limit="truncate",
                )
        except (SandboxError, TimeoutError) as exc:
            why = exc.message if isinstance(exc, SandboxError) else f"no answer in {timeout:g} s"
            parts.append(f"{heading}: unavailable ({printable(why, 300)})")
            return "\n".join(parts)
        if result.returncode != 0:
            why = printable(result.stderr[-300:].decode("utf-8", "replace"), 300)
            parts.append(f"{heading}: unavailable (dmesg exited {result.returncode}: {why})")
            return "\n".join(parts)
        messages = kernel_messages_since(result.stdout, since)
        parts.append(f"{heading}:" + ("" if messages else " none"))
        parts.extend(f"  {line}" for line in messages)
        return "\n".join(parts)

    async def stop(self, timeout: float | None = None) -> None:
        """Shut the guest down gracefully, bounded by ``timeout`` (default
        ``config.stop_timeout``), then kill it. Idempotent; never raises for a
        guest that is already gone.

        A copy-on-write clone without volumes is killed at once: all it wrote
        lives in its own RAM, so a shutdown would flush nothing anywhere and
        only spend a guest power-off's CPU (tens of ms of cold code under
        TCG, taken from the pool's pre-starts).
        """
        if timeout != 0:  # 0: no grace, kill at once
            check_timeout(timeout, "timeout")
        if self._stopped:
            return
        if self._session.origin is not None and not self.config.volumes:
            await self.kill()
            return
        self._stopped = True
        self._timers.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._paused:  # a stopped guest cannot shut down
            with contextlib.suppress(SandboxError, OSError):
                await self._set_paused(False)
        monitor = self._session.monitor
        if monitor is not None:  # before QEMU exits, so its EOF is no monitor error
            await monitor.close()
        limit = self.config.stop_timeout if timeout is None else timeout
        if self._vm.returncode is None and self._agent.error is None:
            with anyio.move_on_after(limit, shield=True), contextlib.suppress(SandboxError):
                await self._agent.shutdown(timeout=limit)
                await self._vm.wait()
        try:
            await self._session.aclose()
        finally:
            await self._finish_stop()

    async def kill(self) -> None:
        """Kill the VM at once (no guest shutdown). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._timers.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        monitor = self._session.monitor
        if monitor is not None:  # before QEMU exits, so its EOF is no monitor error
            await monitor.close()
        try:
            await self._vm.kill()
            await self._session.aclose()
        finally:
            await self._finish_stop()

    async def _finish_stop(self) -> None:
        """Release the row, wake :meth:`wait` (shielded: it runs on every stop)."""
        if self.stop_reason is None:
            self.stop_reason = "stopped"
        self._paused = self._draining = False
        self._stopped_event.set()
        store, record, self._store, self._record = self._store, self._record, None, None
        if _owned.get(self.name) is self:
            del _owned[self.name]
        if store is not None and record is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(store.release, record)

    # -- pause, drain, wait, host timers ----------------------------------------------------

    @property
    def status(self) -> SandboxStatus:
        """RUNNING, PAUSED, DRAINING, STOPPED, or CRASHED (its VM ended by itself)."""
        if self._stopped:
            return SandboxStatus.CRASHED if self.stop_reason == "exited" else SandboxStatus.STOPPED
        if self._vm.returncode is not None:
            return SandboxStatus.CRASHED
        if self._paused:
            return SandboxStatus.PAUSED
        if self._draining:
            return SandboxStatus.DRAINING
        return SandboxStatus.RUNNING

    async def pause(self) -> None:
        """Stop the guest's CPUs (QMP ``stop``; a ``SIGSTOP`` of the VM process
        where the VM has no monitor): it uses no CPU and its clock stands still
        until :meth:`resume`. Its memory stays. Idempotent.

        While paused, new commands and file operations raise SandboxPausedError
        (they are refused, not queued: resume first); commands already running
        are frozen with the guest and go on after the resume.

        :raises SandboxNotRunningError: the sandbox is stopped.
        """
        self._check_running()
        if not self._paused:
            await self._set_paused(True)
            await self._update_row(SandboxStatus.PAUSED)

    async def resume(self) -> None:
        """Start the guest's CPUs again after :meth:`pause`. Idempotent.

        :raises SandboxNotRunningError: the sandbox is stopped.
        """
        self._check_running()
        if self._paused:
            await self._set_paused(False)
            self._last_activity = time.monotonic()
            await self._update_row(
                SandboxStatus.DRAINING if self._draining else SandboxStatus.RUNNING
            )

    async def _set_paused(self, paused: bool) -> None:
        monitor = self._session.monitor
        if monitor is not None:
            await monitor.execute("stop" if paused else "cont")
        elif self._vm.pid is not None and self._vm.returncode is None:
            os.kill(self._vm.pid, _signal.SIGSTOP if paused else _signal.SIGCONT)
        self._paused = paused

    async def drain(self, timeout: float | None = None) -> None:
        """Let the running commands and file operations finish, refusing new ones
        (SandboxDrainingError), then stop the sandbox. A paused sandbox is
        resumed first, so its commands can finish. ``timeout`` (seconds, None:
        no limit) bounds the wait; past it the sandbox stops anyway.

        A command started with :meth:`exec_stream` counts until its exit has
        been read from its handle (or the handle closed).
        """
        check_timeout(timeout, "timeout")
        if self._stopped:
            return
        self._draining = True
        if self._paused:
            await self.resume()
        await self._update_row(SandboxStatus.DRAINING)
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while self._busy():
                await anyio.sleep(_DRAIN_POLL_S)
        await self.stop()

    async def wait(self) -> SandboxStatus:
        """Wait until the sandbox stops (by :meth:`stop`, :meth:`drain`, a host
        timer, another process's ``Sandbox.remove``, or its VM ending on its
        own, whose resources are then released); return its final status
        (:attr:`stop_reason` says why).
        """
        if not self._stopped:
            exited = False
            async with anyio.create_task_group() as tg:

                async def vm_exit() -> None:
                    nonlocal exited
                    await self._vm.wait()
                    exited = True
                    tg.cancel_scope.cancel()

                async def stopped() -> None:
                    await self._stopped_event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(vm_exit)
                tg.start_soon(stopped)
            if exited and not self._stopped:
                self.stop_reason = "exited"
                await self.stop()
        await self._stopped_event.wait()  # a stop under way in another task: its end
        return self.status

    def _busy(self) -> bool:
        """Whether a host call or a streamed command is in flight."""
        # A terminal session counts like a streamed command: a shell waiting for
        # a person must not be stopped by idle_timeout under them.
        processes = [h._process for h in self._streams] + [p._process for p in self._ptys]
        return self._active > 0 or any(p.exited is None and not p._done for p in processes)

    async def _enforce_limits(self) -> None:
        """The host timers of ``max_duration`` and ``idle_timeout``: they stop the
        sandbox; nothing the guest does moves them.
        """
        max_duration, idle = self.config.max_duration, self.config.idle_timeout
        started = time.monotonic()
        reason: str | None = None
        with self._timers:
            while reason is None:
                now = time.monotonic()
                wake: list[float] = []
                if max_duration is not None:
                    if now >= started + max_duration:
                        reason = "max_duration"
                        break
                    wake.append(started + max_duration)
                if idle is not None:
                    if self._busy():
                        wake.append(now + idle)
                    elif now >= self._last_activity + idle:
                        reason = "idle_timeout"
                        break
                    else:
                        wake.append(self._last_activity + idle)
                await anyio.sleep(max(0.01, min(wake) - now))
        if reason is not None and not self._stopped:
            self.stop_reason = reason
            await self.stop()

    async def _update_row(self, status: SandboxStatus) -> None:
        store, record = self._store, self._record
        if store is not None and record is not None:
            self._record = await anyio.to_thread.run_sync(
                lambda: store.update(record, status=status)
            )

    # -- commands ----------------------------------------------------------------------------

    def _default_cwd(self) -> str:
        # An explicit workdir wins; "/" (the default) yields to the image's.
        image = self.image_config
        if self.config.workdir == "/" and image is not None and image.workdir:
            return image.workdir
        return self.config.workdir

    def _default_user(self) -> str | None:
        image = self.image_config
        return self.config.user or (image.user if image is not None else None)

    def _exec_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        if self._base_env is None:  # once: the venv's path is resolved on the host
            self._base_env = exec_environment(self.config, self.image_config)
        merged = dict(self._base_env)
        if self._network is not None and self._network.secrets is not None:
            merged.update(self._network.secrets.env())  # placeholders, never the values
            merged.update(_CA_ENV)
        if env:
            merged.update(env)
        if self.config.scripts:
            merged["PATH"] = f"{merged.get('PATH', DEFAULT_PATH)}:{SCRIPTS_DIR}"
        return merged

    async def exec_stream(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> ExecHandle:
        """Start a command and return a handle streaming its events.

        Iterating the handle delivers all of the output, without limit; its
        :meth:`ExecHandle.wait` caps what it collects like :meth:`exec`. The host
        holds at most :data:`EXEC_STREAM_WINDOW` bytes not yet taken: past that
        the command blocks on its output until the handle is read.

        :raises CommandNotFoundError: ``cmd`` does not exist in the guest.
        :raises ConfigError: ``timeout`` is not a finite number of seconds > 0.
        :raises ExecError: an argument or env var is too big to pass (it is named).
        """
        self._check_accepting()
        timeout = self.config.exec_timeout if timeout is None else timeout
        check_timeout(timeout, "timeout")
        async with self._guest_errors():
            process = await self._agent.exec_stream(
                [cmd, *args],
                env=self._exec_env(env),
                cwd=cwd or self._default_cwd(),
                user=user or self._default_user(),
                timeout=timeout,
                stdin=stdin,
                window=EXEC_STREAM_WINDOW,
                auto_ack=True,
            )
        handle = ExecHandle(self, process, timeout)
        self._streams.add(handle)
        return handle

    async def pty(
        self,
        cmd: str = "/bin/sh",
        args: Sequence[str] = (),
        *,
        rows: int = 24,
        cols: int = 80,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> PtySession:
        """Start ``cmd`` on a new pseudo-terminal of ``rows`` x ``cols`` in the guest
        (an interactive shell by default) and return its session.

        ``TERM`` is ``xterm-256color`` unless ``env`` or the config set it. No
        timeout unless ``timeout`` is given (``config.exec_timeout`` does not
        apply: a shell waits for a person).

        :raises CommandNotFoundError: ``cmd`` does not exist in the guest.
        :raises ValueError: a size outside 1..65535.
        """
        self._check_running()
        if timeout is not None:
            check_timeout(timeout, "timeout")
        merged = self._exec_env(None)
        if merged.get("TERM", "dumb") == "dumb" and "TERM" not in self.config.env:
            merged["TERM"] = "xterm-256color"
        merged.update(env or {})
        async with self._guest_errors():
            process = await self._agent.exec_stream(
                [cmd, *args],
                env=merged,
                cwd=cwd or self.config.workdir,
                user=user or self.config.user,
                timeout=timeout,
                tty=(rows, cols),
                window=PTY_WINDOW,
            )
        session = PtySession(self, process)
        self._ptys.add(session)
        return session

    def entrypoint_argv(self, args: Sequence[str] | None = None) -> builtins.list[str]:
        """The command line ``docker run IMAGE [ARGS]`` would start: the OCI
        image's entrypoint followed by ``args`` (default: the image's cmd).

        :raises ExecError: the image has neither an entrypoint nor a cmd (or is
            not an OCI image).
        """
        image = self.image_config
        argv = [*(image.entrypoint if image else ()), *(args if args is not None else (
            image.cmd if image else ()
        ))]  # fmt: skip
        if not argv:
            raise ExecError(
                f"image {self.config.image!r} has no entrypoint or cmd to run: pass the "
                "command to exec() instead"
            )
        return argv

    async def exec(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bytes | str | None = None,
        max_output: int | None = None,
        on_output_limit: OnOutputLimit | None = None,
    ) -> ExecOutput:
        """Run a command to completion.

        At most ``max_output`` bytes of stdout and stderr together are
        collected (default ``config.max_output_bytes``, 64 MiB). Past it,
        ``on_output_limit`` (default ``config.on_output_limit``) decides:
        ``"raise"`` kills the command and raises OutputLimitError, which holds
        the output up to the limit; ``"truncate"`` keeps that much, drops the
        rest while the command runs to its end, and sets
        ``ExecOutput.truncated``. Use :meth:`exec_stream` for all of a big output.

        :raises CommandNotFoundError: ``cmd`` does not exist in the guest.
        :raises ExecTimeoutError: it ran past ``timeout`` seconds (it was killed).
        :raises OutputLimitError: its output passed ``max_output`` (it was killed).
        :raises ConfigError: ``timeout`` is not a finite number of seconds > 0, or
            ``max_output`` / ``on_output_limit`` is invalid.
        :raises ExecError: an argument or env var is too big to pass (it is named).
        :raises GuestTimeoutError: the guest stopped answering meanwhile (checked
            every ``HEARTBEAT_INTERVAL`` seconds, so a hung guest never hangs the caller).
        """
        self._check_accepting()
        timeout = self.config.exec_timeout if timeout is None else timeout
        check_timeout(timeout, "timeout")
        limit, action = self._output_limit(max_output, on_output_limit)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        argv = [cmd, *args]
        try:
            result = await self._watched(
                f"{cmd!r} ran",
                lambda: self._agent.exec(
                    argv,
                    env=self._exec_env(env),
                    cwd=cwd or self._default_cwd(),
                    user=user or self._default_user(),
                    timeout=timeout,
                    stdin=data,
                    max_output=limit,
                    on_output_limit=action,
                ),
            )
        except SandboxError as exc:
            self._recent.record(argv, f"{type(exc).__name__}: {exc.message}")
            raise
        self._recent.record(argv, _outcome(result), result.stderr)
        return _finish(result, cmd, timeout)

    def _output_limit(
        self, max_output: int | None, on_output_limit: OnOutputLimit | None
    ) -> tuple[int, OnOutputLimit]:
        """The output cap of one exec: the call's values, else the config's."""
        limit = self.config.max_output_bytes if max_output is None else max_output
        check_limit(limit, "max_output")
        action = self.config.on_output_limit if on_output_limit is None else on_output_limit
        if action not in ("raise", "truncate"):
            raise ConfigError(
                f'on_output_limit: must be "raise" or "truncate", got {on_output_limit!r}'
            )
        return limit, action

    async def shell(self, script: str, **kwargs: Any) -> ExecOutput:
        """Run ``script`` with the configured shell (``sh -c``)."""
        return await self.exec(self.config.shell, ["-c", script], **kwargs)

    async def open_channel(self, timeout: float | None = None) -> anyio.abc.ByteStream:
        """Open the raw byte channel to the guest: a virtio-serial port named
        ``msb.chan`` (its ``/dev/vportNpM`` node is the entry of
        ``/sys/class/virtio-ports`` whose ``name`` reads so). No agent, no
        framing: whatever one side writes the other reads, with one process in
        the guest holding the port open. One connection per VM lifetime;
        closing it ends the channel (the guest then reads EOF).

        :raises SandboxNotRunningError: stopped, or the channel was already opened.
        :raises BackendUnavailableError: the backend has no channel (test doubles).
        """
        self._check_running()
        check_timeout(timeout, "timeout")
        return await self._vm.connect_channel(self._request_timeout if timeout is None else timeout)

    def fs(self) -> SandboxFs:
        """Guest file operations."""
        return SandboxFs(self)

    async def metrics(self) -> SandboxMetrics:
        """Sample guest CPU, memory and uptime."""
        self._check_running()
        async with self._guest_errors():
            m = await self._agent.metrics(timeout=self._request_timeout)
        busy, idle = m.cpu_busy_ms, m.cpu_idle_ms
        if self._last_cpu is not None:
            d_busy, d_idle = busy - self._last_cpu[0], idle - self._last_cpu[1]
        else:
            d_busy, d_idle = busy, idle
        self._last_cpu = (busy, idle)
        total = d_busy + d_idle
        return SandboxMetrics(
            cpu_percent=100.0 * d_busy / total if total > 0 else 0.0,
            memory_bytes=m.mem_total - m.mem_available,
            memory_total_bytes=m.mem_total,
            memory_host_resident_bytes=_rss(self._vm.pid),
            uptime_ms=m.uptime_ms,
            processes=m.nprocs,
            load1=m.load1,
        )

    # -- internals ---------------------------------------------------------------------------

    async def _import(self, source: bytes | Path, guest_path: str, mode: int) -> int:
        """Copy host bytes or a host file into the guest through the transfer disk."""
        self._check_accepting()
        if isinstance(self._vm, DirectTransferVM):  # the guest sees a host directory
            return await self._import_direct(source, self._vm.xfer_guest_dir, guest_path, mode)
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        image = self._vm.spec.run_dir / XFER_IMAGE
        async with self._xfer_range(size, guest_path) as offset:
            try:
                await anyio.to_thread.run_sync(_write_at, image, offset, source)
            except OSError as exc:
                raise FilesystemError(
                    f"cannot stage {size} bytes for {guest_path} in {image}: {exc.strerror} "
                    "(is that disk full? free space there or set TMPDIR to another)"
                ) from exc
            return await self._watched(
                f"copying into {guest_path}",
                lambda: self._agent.copy_from_disk(
                    XFER_SERIAL, offset, size, guest_path, mode=mode
                ),
            )

    async def _import_direct(
        self, source: bytes | Path, direct: str, guest_path: str, mode: int
    ) -> int:
        staged = self._vm.spec.run_dir / "xfer" / f"{secrets.token_hex(8)}.bin"
        staged.parent.mkdir(exist_ok=True)
        try:
            if isinstance(source, bytes):
                await anyio.to_thread.run_sync(staged.write_bytes, source)
            else:
                await anyio.to_thread.run_sync(shutil.copyfile, source, staged)
            return await self._watched(
                f"copying into {guest_path}",
                lambda: self._agent.copy_file(f"{direct}/{staged.name}", guest_path, mode=mode),
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    @contextlib.asynccontextmanager
    async def _xfer_range(self, size: int, guest_path: str) -> AsyncIterator[int]:
        """Reserve ``size`` bytes of the transfer disk; yield their offset. Once no
        transfer runs, the disk's file is emptied (its blocks freed) and reused.
        """
        if size > XFER_DISK_BYTES:
            raise FilesystemError(
                f"cannot copy {size} bytes into {guest_path}: the transfer disk holds "
                f"{XFER_DISK_BYTES} bytes; split the file"
            )
        async with self._xfer_lock:
            if self._xfer_next + size > XFER_DISK_BYTES:
                raise FilesystemError(
                    "the transfer disk is full of transfers still in flight: retry later"
                )
            offset = self._xfer_next
            self._xfer_next += -(-size // _XFER_ALIGN) * _XFER_ALIGN
            self._xfer_users += 1
        try:
            yield offset
        finally:
            # Shielded: a cancelled transfer must still give its range back.
            with anyio.CancelScope(shield=True):
                async with self._xfer_lock:
                    self._xfer_users -= 1
                    if self._xfer_users == 0:
                        self._xfer_next = 0
                        with contextlib.suppress(OSError):
                            _empty_sparse(self._vm.spec.run_dir / XFER_IMAGE, XFER_DISK_BYTES)

    async def _watched(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` (an open-ended guest operation: a command, a transfer)
        while the sandbox's watchdog pings the agent every ``HEARTBEAT_INTERVAL``
        seconds, so a hung guest raises GuestTimeoutError instead of blocking
        the caller forever.

        One watchdog task per sandbox serves every call in flight: a task
        spawned and cancelled per call cost about a tenth of an exec's host
        time (issue #16).
        """
        watch = anyio.CancelScope()
        async with self._guest_errors():
            if self._watchdog is None:
                self._watchdog = anyio.CancelScope()
                (await current_runtime()).spawn(self._watch_guest, self._watchdog)
            self._watches.add(watch)
            try:
                with watch:
                    return await call()
            finally:
                self._watches.discard(watch)
            # Only the watchdog cancels ``watch``: the guest did not answer its ping.
            raise GuestTimeoutError(
                f"sandbox {self.name!r}: the guest stopped answering while {what} "
                f"(no reply to a ping within {self._request_timeout:g} s)"
            )

    async def _watch_guest(self, scope: anyio.CancelScope) -> None:
        """The watchdog of :meth:`_watched`: while calls are in flight, ping the
        agent every ``HEARTBEAT_INTERVAL`` seconds; a ping left unanswered
        cancels them all. Ends with the sandbox (``scope`` is cancelled at stop).
        """
        with scope:
            while not self._stopped:
                await anyio.sleep(HEARTBEAT_INTERVAL)
                if not self._watches or self._paused:
                    continue  # nothing to watch; a paused guest answers nothing, and is not hung
                try:
                    await self._agent.ping(timeout=self._request_timeout)
                except GuestTimeoutError:
                    if self._paused:
                        continue
                    for watch in list(self._watches):
                        watch.cancel()
                except SandboxError:
                    return  # a dead connection fails the calls themselves, with their own error

    def _check_running(self) -> None:
        if self._stopped:
            raise SandboxNotRunningError(f"sandbox {self.name!r} is stopped")

    def _check_accepting(self) -> None:
        """:raises SandboxNotRunningError: new work cannot start (stopped, paused, draining)."""
        self._check_running()
        if self._paused:
            raise SandboxPausedError(
                f"sandbox {self.name!r} is paused: call resume() before running commands "
                "or touching its files"
            )
        if self._draining:
            raise SandboxDrainingError(
                f"sandbox {self.name!r} is draining (its running commands finish, then it "
                "stops): it takes no new commands; create another sandbox"
            )

    @contextlib.asynccontextmanager
    async def _host_activity(self) -> AsyncIterator[None]:
        """Count as a host call in flight (``idle_timeout``) meanwhile: a detached
        sandbox's channel relayed to a client (``_supervisor.py``).
        """
        self._active += 1
        self._last_activity = time.monotonic()
        try:
            yield
        finally:
            self._active -= 1
            self._last_activity = time.monotonic()

    @contextlib.asynccontextmanager
    async def _guest_errors(self, *, new: bool = True) -> AsyncIterator[None]:
        """Turn a lost connection into GuestCrashedError with the console tail.

        ``new``: this starts an operation (refused on a paused or draining
        sandbox), rather than following up a started command. Every guest
        operation counts as host activity (``idle_timeout``) while it runs.
        """
        if new:
            self._check_accepting()
        self._active += 1
        self._last_activity = time.monotonic()
        try:
            yield
        except (SandboxNotRunningError, ProtocolError, GuestTimeoutError) as exc:
            crashed = isinstance(exc, SandboxNotRunningError) and not self._stopped
            if crashed and self._vm.returncode is None:
                # A lost agent connection means the VM is going down (a guest
                # panic or a dead agent ends QEMU): wait briefly, so the error can
                # say how it ended and the console tail holds its last words.
                with anyio.move_on_after(_EXIT_GRACE_S, shield=True):
                    await self._vm.wait()
            if exc.console_tail is None:
                exc.console_tail = self.console_tail()
            if crashed:
                returncode = self._vm.returncode
                how = "" if returncode is None else f"; its VM process {describe_exit(returncode)}"
                raise GuestCrashedError(
                    f"sandbox {self.name!r}: the guest went away ({exc.message}{how})",
                    console_tail=exc.console_tail,
                ) from exc
            raise
        finally:
            self._active -= 1
            self._last_activity = time.monotonic()

    def __repr__(self) -> str:
        return f"<Sandbox {self.name!r} {self.status.value} pid={self.pid}>"


async def _claim_name(store: StateStore, config: SandboxConfig, *, replace: bool) -> SandboxRecord:
    """Claim ``config.name`` in the store; with ``replace``, remove its live holder first.

    :raises SandboxExistsError: a live sandbox has the name and ``replace`` is false.
    """
    record = new_record(config.name, config.to_json())
    for _ in range(3):
        existing = await anyio.to_thread.run_sync(store.claim, record)
        if existing is None:
            return record
        if not replace:
            raise SandboxExistsError(
                f"a sandbox named {config.name!r} is already {existing.status.value} "
                f"(owner pid {existing.owner_pid}): pass replace=True to stop it first, "
                f"choose another name, or remove it (microsandbox rm {config.name})"
            )
        from ._remote import SandboxHandle

        await SandboxHandle(store, existing).remove()
    raise SandboxExistsError(
        f"a sandbox named {config.name!r} kept being recreated while replace=True removed "
        "it: another process creates it in a loop; choose another name"
    )


def _as_bytes(chunk: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_stream chunks must be bytes, got {type(chunk).__name__}")
    return bytes(chunk)


def _outcome(result: ExecResult) -> str:
    """How a command ended, in a few words."""
    if result.timed_out:
        return "timed out (killed)"
    if result.term_signal is not None:
        return f"killed by signal {result.term_signal}"
    return f"exit {result.returncode}"


def exec_environment(
    config: SandboxConfig, image_config: ImageConfig | None = None
) -> dict[str, str]:
    """The environment a command gets in a sandbox of ``config`` when the exec
    adds none: a plain PATH, HOME, LANG and TERM, the imaged virtualenv
    activated (``image="host"``), an OCI image's own ``Env``, then ``config.env``.
    """
    merged = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
    merged.update(_venv_env(config.image))
    if image_config is not None:
        merged.update(image_config.env)
    merged.update(config.env)
    return merged


def _image_config(config: SandboxConfig) -> ImageConfig | None:
    """The config of an OCI image as pinned in the local store (its pull ran
    when the sandbox's root was built), or None for other images.
    """
    return image_config_for(config.image, config.cache_dir)


def _venv_env(image: str) -> dict[str, str]:
    """With ``image="host"``, the environment of the imaged virtualenv, activated
    (its ``bin/`` first on PATH, so ``python``, ``pip`` and ``pytest`` are the
    venv's); nothing for other images, which do not carry it.
    """
    venv = imaged_venv() if image == "host" else None
    if venv is None:
        return {}
    return {"PATH": f"{venv}/bin:{DEFAULT_PATH}", "VIRTUAL_ENV": str(venv)}


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _write_at(image: Path, offset: int, source: bytes | Path) -> None:
    """Put ``source`` at ``offset`` of the transfer disk's backing file."""
    fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if isinstance(source, bytes):
            view = memoryview(source)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done : done + (16 << 20)], offset + done)
            return
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            done = 0
            while done < size:
                # In-kernel copy (a reflink where the filesystem has them).
                n = os.copy_file_range(src.fileno(), fd, size - done, done, offset + done)
                if n == 0:
                    break  # the file shrank meanwhile: the guest copy reports the shortfall
                done += n
    finally:
        os.close(fd)


def _empty_sparse(image: Path, size: int) -> None:
    """Free every block of the transfer disk's file, keeping its size."""
    os.truncate(image, 0)
    os.truncate(image, size)


def _snapshotter() -> Snapshotter:
    snapshots = extensions().snapshots
    if snapshots is None:
        raise SnapshotError(
            "snapshots are not installed in this runtime: import pytest_microsandbox "
            "(its package installs them) rather than loading the runtime on its own"
        )
    return snapshots
