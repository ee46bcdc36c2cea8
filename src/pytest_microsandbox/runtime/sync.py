"""Synchronous facade over the async :class:`Sandbox` for ordinary tests.

All sandboxes of a process share one event-loop thread (:mod:`._portal`,
shared with the pytest plugin). Each sandbox's create and stop run in one task
of that loop, as anyio's structured concurrency requires; the other calls are
forwarded one by one.
"""

from __future__ import annotations

import os
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import anyio.to_thread
from anyio.from_thread import BlockingPortal

from . import _portal
from ._confined import DEFAULT_COPY_MAX_BYTES, DEFAULT_COPY_MAX_ENTRIES
from ._diagnostics import DIAGNOSTICS_TIMEOUT_S
from ._limits import OnOutputLimit
from ._remote import RemoteSandbox, RemoteSandboxFs, SandboxHandle
from ._remote_stream import RemoteExecHandle, RemotePtySession
from ._state import SandboxStatus
from .agent.results import DirEntry, ExecEvent, FileStat
from .backend import Backend
from .config import SandboxConfig, Volume
from .images import ImageConfig
from .network import NetworkPolicy, NetworkStack, Secret
from .pty import PtySession
from .sandbox import ExecHandle, ExecOutput, Sandbox, SandboxFs, SandboxMetrics

__all__ = [
    "SyncExecHandle",
    "SyncPtySession",
    "SyncRemoteSandbox",
    "SyncRemoteSandboxFs",
    "SyncSandbox",
    "SyncSandboxFs",
]

T = TypeVar("T")


class _Lifetime:
    """Creates (with ``factory``) and stops one sandbox inside a single portal task."""

    def __init__(self, factory: Callable[[], Awaitable[Sandbox]]) -> None:
        self._factory = factory
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Sandbox:
        sandbox = await self._factory()
        return await self._stack.enter_async_context(sandbox)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


class _SyncCommands:
    """The command methods :class:`SyncSandbox` and :class:`SyncRemoteSandbox`
    share: the same signatures over a local or a detached sandbox.
    """

    _portal: BlockingPortal

    @property
    def _target(self) -> Sandbox | RemoteSandbox:
        raise NotImplementedError

    def exec(
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
        """Blocking :meth:`Sandbox.exec`: run a command to completion."""

        async def run() -> ExecOutput:
            return await self._target.exec(
                cmd,
                args,
                env=env,
                cwd=cwd,
                user=user,
                timeout=timeout,
                stdin=stdin,
                max_output=max_output,
                on_output_limit=on_output_limit,
            )

        return self._portal.call(run)

    def shell(self, script: str, **kwargs: Any) -> ExecOutput:
        """Run ``script`` with the configured shell (``sh -c``)."""
        return self.exec(self._target.config.shell, ["-c", script], **kwargs)

    def exec_stream(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> SyncExecHandle:
        """Blocking :meth:`Sandbox.exec_stream`: a handle on a running command."""

        async def run() -> ExecHandle | RemoteExecHandle:
            return await self._target.exec_stream(
                cmd, args, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin
            )

        return SyncExecHandle(self._portal, self._portal.call(run))

    def pty(
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
    ) -> SyncPtySession:
        """Blocking :meth:`Sandbox.pty`: a command on a pseudo-terminal in the guest."""

        async def run() -> PtySession | RemotePtySession:
            return await self._target.pty(
                cmd, args, rows=rows, cols=cols, env=env, cwd=cwd, user=user, timeout=timeout
            )

        return SyncPtySession(self._portal, self._portal.call(run))


class SyncSandbox(_SyncCommands):
    """Blocking twin of :class:`Sandbox`; same methods, no ``await``."""

    def __init__(self, portal: BlockingPortal, cm: AbstractContextManager[Sandbox]) -> None:
        self._portal = portal
        self._cm: AbstractContextManager[Sandbox] | None = cm
        self._sandbox = cm.__enter__()

    @property
    def _target(self) -> Sandbox:
        return self._sandbox

    @overload
    @classmethod
    def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        register: bool = False,
        replace: bool = False,
        detached: Literal[False] = False,
        **overrides: Any,
    ) -> SyncSandbox: ...

    @overload
    @classmethod
    def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        register: bool = False,
        replace: bool = False,
        detached: Literal[True],
        **overrides: Any,
    ) -> SyncRemoteSandbox: ...

    @classmethod
    def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        register: bool = False,
        replace: bool = False,
        detached: bool = False,
        **overrides: Any,
    ) -> SyncSandbox | SyncRemoteSandbox:
        """Boot a sandbox (see :meth:`Sandbox.create`)."""
        if detached:

            async def start_detached() -> RemoteSandbox:
                return await Sandbox.create(
                    config, backend=backend, replace=replace, detached=True, **overrides
                )

            portal = _portal.portal()
            return SyncRemoteSandbox(portal, portal.call(start_detached))

        async def factory() -> Sandbox:
            return await Sandbox.create(
                config,
                backend=backend,
                register=register,
                replace=replace,
                detached=False,
                **overrides,
            )

        return cls._start(factory)

    def detach(self) -> SyncRemoteSandbox:
        """Move the sandbox under a supervisor process (see :meth:`Sandbox.detach`)."""
        remote = self._call(self._sandbox.detach)
        self.stop()
        return SyncRemoteSandbox(self._portal, remote)

    @classmethod
    def _start(cls, factory: Callable[[], Awaitable[Sandbox]]) -> SyncSandbox:
        portal = _portal.portal()
        return cls(portal, portal.wrap_async_context_manager(_Lifetime(factory)))

    @classmethod
    def restore(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        volumes: Mapping[str, Volume | str | os.PathLike[str]] | None = None,
        network: NetworkPolicy | str | None = None,
        disable_network: bool = False,
        secrets: Sequence[Secret] | None = None,
    ) -> SyncSandbox:
        """Start a sandbox from a named snapshot (see :meth:`Sandbox.restore`)."""

        async def factory() -> Sandbox:
            return await Sandbox.restore(
                name_or_path,
                name=name,
                volumes=volumes,
                network=network,
                disable_network=disable_network,
                secrets=secrets,
            )

        return cls._start(factory)

    def snapshot(self, name: str) -> Path:
        """Capture this sandbox as snapshot ``name`` (see :meth:`Sandbox.snapshot`)."""
        return self._call(self._sandbox.snapshot, name)

    def fork(self, name: str | None = None) -> SyncSandbox:
        """A child carrying this sandbox's state (see :meth:`Sandbox.fork`)."""
        parent = self._sandbox

        async def factory() -> Sandbox:
            return await parent.fork(name)

        return self._start(factory)

    @property
    def async_sandbox(self) -> Sandbox:
        return self._sandbox

    @property
    def name(self) -> str:
        return self._sandbox.name

    @property
    def config(self) -> SandboxConfig:
        return self._sandbox.config

    @property
    def image_config(self) -> ImageConfig | None:
        """The OCI image's config (env, workdir, user, entrypoint, cmd), or None."""
        return self._sandbox.image_config

    @property
    def running(self) -> bool:
        return self._sandbox.running

    @property
    def pid(self) -> int | None:
        return self._sandbox.pid

    @property
    def published_ports(self) -> dict[int | str, int]:
        """guest port -> host 127.0.0.1 port (see :attr:`Sandbox.published_ports`)."""
        return self._sandbox.published_ports

    @property
    def network(self) -> NetworkStack:
        """The sandbox's network (``network.events()``); see :attr:`Sandbox.network`."""
        return self._sandbox.network

    def wait_stream_path(self, timeout: float) -> bool:
        """Wait until the network's stream path is on (True) or has failed or
        timed out (False); see :meth:`NetworkStack.wait_stream_path`, which
        needs the sandbox's event loop.

        :raises ConfigError: the sandbox has no network.
        """
        return self._call(self._sandbox.network.wait_stream_path, timeout)

    @property
    def console_path(self) -> Path:
        """The host file holding the guest console's output."""
        return self._sandbox.console_path

    def console_tail(self, lines: int = 40) -> str:
        return self._sandbox.console_tail(lines)

    def diagnostics(self, timeout: float = DIAGNOSTICS_TIMEOUT_S) -> str:
        """Recent commands and guest kernel messages (see :meth:`Sandbox.diagnostics`)."""
        return self._call(self._sandbox.diagnostics, timeout)

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self._portal.call(fn, *args)

    def entrypoint_argv(self, args: Sequence[str] | None = None) -> list[str]:
        """The OCI image's entrypoint plus ``args`` (default: its cmd); see
        :meth:`Sandbox.entrypoint_argv`. Run it with ``exec(argv[0], argv[1:])``.
        """
        return self._sandbox.entrypoint_argv(args)

    def fs(self) -> SyncSandboxFs:
        return SyncSandboxFs(self._portal, self._sandbox.fs())

    def metrics(self) -> SandboxMetrics:
        return self._call(self._sandbox.metrics)

    # -- lifecycle (see Sandbox) --------------------------------------------------------------

    @property
    def status(self) -> SandboxStatus:
        return self._sandbox.status

    @property
    def stop_reason(self) -> str | None:
        return self._sandbox.stop_reason

    def pause(self) -> None:
        """Stop the guest's CPUs (see :meth:`Sandbox.pause`)."""
        self._call(self._sandbox.pause)

    def resume(self) -> None:
        self._call(self._sandbox.resume)

    def drain(self, timeout: float | None = None) -> None:
        """Let running commands finish, refuse new ones, then stop (see :meth:`Sandbox.drain`)."""
        self._call(self._sandbox.drain, timeout)
        self.stop()

    def wait(self) -> SandboxStatus:
        """Block until the sandbox stops (see :meth:`Sandbox.wait`)."""
        status = self._call(self._sandbox.wait)
        self.stop()
        return status

    @staticmethod
    def list(*, cache_dir: str | os.PathLike[str] | None = None) -> list[SandboxHandle]:
        """The live named sandboxes (see :meth:`Sandbox.list`)."""

        async def run() -> list[SandboxHandle]:
            return await Sandbox.list(cache_dir=cache_dir)

        return _portal.portal().call(run)

    @staticmethod
    def get(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> SandboxHandle:
        """The live named sandbox ``name`` (see :meth:`Sandbox.get`)."""

        async def run() -> SandboxHandle:
            return await Sandbox.get(name, cache_dir=cache_dir)

        return _portal.portal().call(run)

    @staticmethod
    def remove(
        name: str,
        *,
        timeout: float | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Stop and remove the named sandbox ``name`` (see :meth:`Sandbox.remove`)."""

        async def run() -> None:
            await Sandbox.remove(name, timeout=timeout, cache_dir=cache_dir)

        _portal.portal().call(run)

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully, then force (see :meth:`Sandbox.stop`). Idempotent."""
        cm, self._cm = self._cm, None
        if cm is None:
            return
        if timeout is not None:
            self._call(self._sandbox.stop, timeout)
        cm.__exit__(None, None, None)

    def kill(self) -> None:
        cm, self._cm = self._cm, None
        if cm is None:
            return
        self._call(self._sandbox.kill)
        cm.__exit__(None, None, None)

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return repr(self._sandbox).replace("<Sandbox", "<SyncSandbox", 1)


class SyncExecHandle:
    """Blocking twin of :class:`ExecHandle`: iterate events, feed stdin, signal, wait."""

    def __init__(self, portal: BlockingPortal, handle: ExecHandle | RemoteExecHandle) -> None:
        self._portal = portal
        self._handle = handle
        self._events = handle.__aiter__()

    @property
    def pid(self) -> int:
        return self._handle.pid

    def __iter__(self) -> Iterator[ExecEvent]:
        while True:
            try:
                yield self._portal.call(self._events.__anext__)
            except StopAsyncIteration:
                return

    def write_stdin(self, data: bytes) -> None:
        self._portal.call(self._handle.write_stdin, data)

    def close_stdin(self) -> None:
        self._portal.call(self._handle.close_stdin)

    def signal(self, sig: int) -> None:
        self._portal.call(self._handle.signal, sig)

    def kill(self) -> None:
        self._portal.call(self._handle.kill)

    def wait(
        self, *, max_output: int | None = None, on_output_limit: OnOutputLimit | None = None
    ) -> ExecOutput:
        async def run() -> ExecOutput:
            return await self._handle.wait(max_output=max_output, on_output_limit=on_output_limit)

        return self._portal.call(run)


class SyncPtySession:
    """Blocking twin of :class:`~.pty.PtySession` (``with`` kills a command still running)."""

    def __init__(self, portal: BlockingPortal, session: PtySession | RemotePtySession) -> None:
        self._portal = portal
        self._session = session

    @property
    def pid(self) -> int:
        return self._session.pid

    @property
    def returncode(self) -> int | None:
        return self._session.returncode

    def read(self) -> bytes:
        """The next output; ``b""`` once the command exited and all of it was read."""
        return self._portal.call(self._session.read)

    def write(self, data: bytes | str) -> None:
        self._portal.call(self._session.write, data)

    def resize(self, rows: int, cols: int) -> None:
        self._portal.call(self._session.resize, rows, cols)

    def signal(self, sig: int) -> None:
        self._portal.call(self._session.signal, sig)

    def wait(self) -> int:
        """The exit code (minus the signal that killed it); unread output is discarded."""
        return self._portal.call(self._session.wait)

    def close(self) -> None:
        self._portal.call(self._session.aclose)

    def __enter__(self) -> SyncPtySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSandboxFs:
    """Blocking twin of :class:`SandboxFs`."""

    def __init__(self, portal: BlockingPortal, fs: SandboxFs) -> None:
        self._portal = portal
        self._fs = fs

    def read(self, path: str, *, max_size: int | None = None) -> bytes:
        async def run() -> bytes:
            return await self._fs.read(path, max_size=max_size)

        return self._portal.call(run)

    def read_text(self, path: str, encoding: str = "utf-8", *, max_size: int | None = None) -> str:
        async def run() -> str:
            return await self._fs.read_text(path, encoding, max_size=max_size)

        return self._portal.call(run)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        async def run() -> int:
            return await self._fs.write(path, data, mode=mode)

        return self._portal.call(run)

    def read_stream(self, path: str) -> Iterator[bytes]:
        """Yield a guest file's content in chunks (see :meth:`SandboxFs.read_stream`)."""
        chunks = self._fs.read_stream(path)
        try:
            while True:
                try:
                    yield self._portal.call(chunks.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            self._portal.call(chunks.aclose)

    def write_stream(self, path: str, chunks: Iterable[bytes], *, mode: int = 0o644) -> int:
        """Write ``chunks`` to a guest file as they come (see :meth:`SandboxFs.write_stream`).

        The iterable is advanced in a worker thread, so one that blocks (reading
        a file, a socket) does not stall the event loop that serves every sandbox.
        """
        source = iter(chunks)

        async def pieces() -> AsyncIterator[bytes]:
            while (chunk := await anyio.to_thread.run_sync(next, source, None)) is not None:
                yield chunk

        async def run() -> int:
            return await self._fs.write_stream(path, pieces(), mode=mode)

        return self._portal.call(run)

    def copy(self, src: str, dst: str) -> int:
        """Copy a guest file inside the guest (see :meth:`SandboxFs.copy`)."""
        return self._portal.call(self._fs.copy, src, dst)

    def list(self, path: str) -> list[DirEntry]:
        return self._portal.call(self._fs.list, path)

    def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        async def run() -> FileStat:
            return await self._fs.stat(path, follow_symlinks=follow_symlinks)

        return self._portal.call(run)

    def exists(self, path: str) -> bool:
        return self._portal.call(self._fs.exists, path)

    def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        async def run() -> None:
            await self._fs.mkdir(path, parents=parents, mode=mode)

        self._portal.call(run)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        async def run() -> None:
            await self._fs.remove(path, recursive=recursive)

        self._portal.call(run)

    def rename(self, src: str, dst: str) -> None:
        self._portal.call(self._fs.rename, src, dst)

    def chmod(self, path: str, mode: int) -> None:
        self._portal.call(self._fs.chmod, path, mode)

    def copy_from_host(self, host_path: str | os.PathLike[str], guest_path: str) -> int:
        return self._portal.call(self._fs.copy_from_host, host_path, guest_path)

    def copy_to_host(
        self,
        guest_path: str,
        host_path: str | os.PathLike[str] | Path,
        *,
        max_bytes: int | None = DEFAULT_COPY_MAX_BYTES,
        max_entries: int | None = DEFAULT_COPY_MAX_ENTRIES,
    ) -> int:
        async def run() -> int:
            return await self._fs.copy_to_host(
                guest_path, host_path, max_bytes=max_bytes, max_entries=max_entries
            )

        return self._portal.call(run)


class SyncRemoteSandbox(_SyncCommands):
    """Blocking twin of :class:`~._remote.RemoteSandbox` (a detached sandbox)."""

    def __init__(self, portal: BlockingPortal, remote: RemoteSandbox) -> None:
        self._portal = portal
        self._remote = remote

    @property
    def _target(self) -> RemoteSandbox:
        return self._remote

    @property
    def async_sandbox(self) -> RemoteSandbox:
        return self._remote

    @property
    def name(self) -> str:
        return self._remote.name

    @property
    def config(self) -> SandboxConfig:
        return self._remote.config

    @property
    def pid(self) -> int | None:
        return self._remote.pid

    def snapshot(self, name: str) -> Path:
        return self._portal.call(self._remote.snapshot, name)

    def fork(
        self, name: str | None = None, *, sandbox_name: str | None = None
    ) -> SyncRemoteSandbox:
        async def run() -> RemoteSandbox:
            return await self._remote.fork(name, sandbox_name=sandbox_name)

        return SyncRemoteSandbox(self._portal, self._portal.call(run))

    def fs(self) -> SyncRemoteSandboxFs:
        return SyncRemoteSandboxFs(self._portal, self._remote.fs())

    def metrics(self) -> SandboxMetrics:
        return self._portal.call(self._remote.metrics)

    def status(self) -> SandboxStatus:
        return self._portal.call(self._remote.status)

    def pause(self) -> None:
        self._portal.call(self._remote.pause)

    def resume(self) -> None:
        self._portal.call(self._remote.resume)

    def drain(self, timeout: float | None = None) -> None:
        self._portal.call(self._remote.drain, timeout)

    def stop(self, timeout: float | None = None) -> None:
        self._portal.call(self._remote.stop, timeout)

    def kill(self) -> None:
        self._portal.call(self._remote.kill)

    def remove(self, timeout: float | None = None) -> None:
        self._portal.call(self._remote.remove, timeout)

    def wait(self) -> SandboxStatus:
        return self._portal.call(self._remote.wait)

    def detach(self) -> SyncRemoteSandbox:
        return self

    def __repr__(self) -> str:
        return repr(self._remote).replace("<RemoteSandbox", "<SyncRemoteSandbox", 1)


class SyncRemoteSandboxFs:
    """Blocking twin of :class:`~._remote.RemoteSandboxFs`."""

    def __init__(self, portal: BlockingPortal, fs: RemoteSandboxFs) -> None:
        self._portal = portal
        self._fs = fs

    def read(self, path: str) -> bytes:
        return self._portal.call(self._fs.read, path)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self._portal.call(self._fs.read_text, path, encoding)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        async def run() -> int:
            return await self._fs.write(path, data, mode=mode)

        return self._portal.call(run)

    def list(self, path: str) -> list[DirEntry]:
        return self._portal.call(self._fs.list, path)

    def exists(self, path: str) -> bool:
        return self._portal.call(self._fs.exists, path)

    def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        async def run() -> None:
            await self._fs.mkdir(path, parents=parents, mode=mode)

        self._portal.call(run)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        async def run() -> None:
            await self._fs.remove(path, recursive=recursive)

        self._portal.call(run)
