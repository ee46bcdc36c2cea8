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
from typing import Any, TypeVar

import anyio.to_thread
from anyio.from_thread import BlockingPortal

from . import _portal
from ._confined import DEFAULT_COPY_MAX_BYTES, DEFAULT_COPY_MAX_ENTRIES
from ._diagnostics import DIAGNOSTICS_TIMEOUT_S
from ._limits import OnOutputLimit
from .agent.results import DirEntry, ExecEvent, FileStat
from .backend import Backend
from .config import SandboxConfig, Volume
from .network import NetworkPolicy, NetworkStack
from .sandbox import ExecHandle, ExecOutput, Sandbox, SandboxFs, SandboxMetrics

__all__ = ["SyncExecHandle", "SyncSandbox", "SyncSandboxFs"]

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


class SyncSandbox:
    """Blocking twin of :class:`Sandbox`; same methods, no ``await``."""

    def __init__(self, portal: BlockingPortal, cm: AbstractContextManager[Sandbox]) -> None:
        self._portal = portal
        self._cm: AbstractContextManager[Sandbox] | None = cm
        self._sandbox = cm.__enter__()

    @classmethod
    def create(
        cls,
        config: SandboxConfig | None = None,
        /,
        *,
        backend: Backend | None = None,
        **overrides: Any,
    ) -> SyncSandbox:
        """Boot a sandbox (see :meth:`Sandbox.create`)."""

        async def factory() -> Sandbox:
            return await Sandbox.create(config, backend=backend, **overrides)

        return cls._start(factory)

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
    ) -> SyncSandbox:
        """Start a sandbox from a named snapshot (see :meth:`Sandbox.restore`)."""

        async def factory() -> Sandbox:
            return await Sandbox.restore(
                name_or_path,
                name=name,
                volumes=volumes,
                network=network,
                disable_network=disable_network,
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
    def running(self) -> bool:
        return self._sandbox.running

    @property
    def pid(self) -> int | None:
        return self._sandbox.pid

    @property
    def published_ports(self) -> dict[int, int]:
        """guest port -> host 127.0.0.1 port (see :attr:`Sandbox.published_ports`)."""
        return self._sandbox.published_ports

    @property
    def network(self) -> NetworkStack:
        """The sandbox's network (``network.events()``); see :attr:`Sandbox.network`."""
        return self._sandbox.network

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
        async def run() -> ExecOutput:
            return await self._sandbox.exec(
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

        return self._call(run)

    def shell(self, script: str, **kwargs: Any) -> ExecOutput:
        return self.exec(self.config.shell, ["-c", script], **kwargs)

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
        async def run() -> ExecHandle:
            return await self._sandbox.exec_stream(
                cmd, args, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin
            )

        return SyncExecHandle(self._portal, self._call(run))

    def fs(self) -> SyncSandboxFs:
        return SyncSandboxFs(self._portal, self._sandbox.fs())

    def metrics(self) -> SandboxMetrics:
        return self._call(self._sandbox.metrics)

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

    def __init__(self, portal: BlockingPortal, handle: ExecHandle) -> None:
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
