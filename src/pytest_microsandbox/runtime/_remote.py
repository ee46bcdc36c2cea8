"""Named sandboxes seen from any process, and detached sandboxes driven remotely.

:class:`SandboxHandle` is a row of the state store (``_state.py``): what
``Sandbox.get(name)`` and ``Sandbox.list()`` return. It stops or removes its
sandbox whichever process owns it, and connects to a detached one.

A detached sandbox runs in a supervisor process of its own
(``_supervisor.py``) that owns its VM, so it outlives its creator. The
supervisor serves a control socket in the store's directory (mode 0600, the
directory 0700) and answers only requests carrying the sandbox's secret token
(a 0600 file beside it). :class:`RemoteSandbox` speaks to it: one JSON line per
request and per answer, bytes in base64, one connection per call so calls can
run concurrently. The supervisor holds the agent connection and relays the
agent's operations (exec, files, metrics), the lifecycle (pause, resume,
drain, stop, wait) and snapshots; its answers are bounded (:data:`MAX_LINE`).
A streamed exec or a terminal keeps its connection as a windowed session
(``_remote_stream.py``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import secrets
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from . import _exceptions
from ._exceptions import (
    OutputLimitError,
    ProtocolError,
    SandboxError,
    SandboxExistsError,
    SandboxNotFoundError,
    SandboxNotRunningError,
)
from ._limits import OnOutputLimit
from ._state import SandboxRecord, SandboxStatus, StateStore, process_alive, process_start
from .agent.results import DirEntry, FileKind
from .config import SandboxConfig

if TYPE_CHECKING:
    from ._remote_stream import RemoteExecHandle, RemotePtySession
    from .sandbox import ExecOutput, Sandbox, SandboxMetrics

__all__ = [
    "MAX_LINE",
    "RelayedChannel",
    "RemoteSandbox",
    "RemoteSandboxFs",
    "SandboxHandle",
    "create_detached",
    "get_handle",
    "read_line",
    "write_line",
]

#: Longest JSON line either side accepts: a 64 MiB output or file in base64, and slack.
MAX_LINE = 96 << 20
#: Seconds a supervisor gets to end after a stop request before it is signalled.
_SUPERVISOR_GRACE_S = 15.0
_POLL_S = 0.05


async def write_line(stream: anyio.abc.ByteStream, message: Mapping[str, Any]) -> None:
    await stream.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")


async def read_line(reader: BufferedByteReceiveStream, limit: int = MAX_LINE) -> dict[str, Any]:
    """One JSON object line; :raises ProtocolError: too long, not JSON or no object."""
    try:
        raw = await reader.receive_until(b"\n", limit)
    except anyio.DelimiterNotFound as exc:
        raise ProtocolError(f"a control message is longer than {limit} bytes") from exc
    try:
        message = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"a control message is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a control message is not a JSON object")
    return message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected base64 text in a control message")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error
        raise ProtocolError(f"bad base64 in a control message: {exc}") from None


def error_from(message: Mapping[str, Any]) -> SandboxError:
    """The exception an error answer stands for (a SandboxError subclass by name)."""
    kind = message.get("error")
    text = str(message.get("message", "the supervisor reported an error"))
    cls = getattr(_exceptions, kind, None) if isinstance(kind, str) else None
    if isinstance(cls, type) and issubclass(cls, OutputLimitError):
        limit = message.get("limit")
        return cls(text, limit=limit if type(limit) is int else 0)
    if isinstance(cls, type) and issubclass(cls, SandboxError):
        with contextlib.suppress(TypeError):
            return cls(text)
    return SandboxError(text)


@dataclass(frozen=True)
class SandboxHandle:
    """A named sandbox as the state store knows it (any process's)."""

    store: StateStore
    record: SandboxRecord

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def status(self) -> SandboxStatus:
        return self.record.status

    @property
    def created(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.record.created, tz=datetime.timezone.utc)

    @property
    def config(self) -> SandboxConfig:
        return SandboxConfig.from_json(self.record.config)

    @property
    def owner_pid(self) -> int:
        """The process that owns the VM: the creator, or a detached sandbox's supervisor."""
        return self.record.owner_pid

    @property
    def pid(self) -> int | None:
        """The VM's host process id."""
        return self.record.vm_pid

    @property
    def detached(self) -> bool:
        return self.record.detached

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-able values (``microsandbox ls --json``)."""
        return {
            "name": self.name,
            "status": self.status.value,
            "created": self.created.isoformat(),
            "owner_pid": self.owner_pid,
            "pid": self.pid,
            "detached": self.detached,
            "config": json.loads(self.record.config),
        }

    async def connect(self) -> RemoteSandbox | Sandbox:
        """Drive the sandbox: a detached one through its supervisor, one this
        process created as itself.

        :raises SandboxError: it is attached to another process (only detached
            sandboxes outlive and serve other processes).
        """
        if self.record.detached:
            return await anyio.to_thread.run_sync(RemoteSandbox.open, self.store, self.record)
        from .sandbox import _owned

        mine = _owned.get(self.name)
        if mine is not None and self.record.owned_here:
            return mine
        raise SandboxError(
            f"sandbox {self.name!r} is attached to process {self.owner_pid}, which drives it "
            "alone; create it with detached=True to drive it from other processes"
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Stop it (a stopped sandbox leaves the store, so this also removes it)."""
        await self.remove(timeout=timeout)

    async def remove(self, timeout: float | None = None) -> None:
        """Stop the sandbox whichever process owns it and remove what it holds:
        its VM, its supervisor's socket and token, its row. Idempotent.
        """
        record = self.record
        if record.detached:
            await _stop_supervisor(self.store, record, timeout)
        else:
            from .sandbox import _owned

            mine = _owned.get(record.name)
            if mine is not None and record.owned_here:
                await mine.stop(timeout)
            else:
                await _kill_foreign_vm(record)
        await anyio.to_thread.run_sync(self.store.release, record)


async def get_handle(store: StateStore, name: str) -> SandboxHandle:
    """:raises SandboxNotFoundError: no live sandbox is called ``name``."""
    record = await anyio.to_thread.run_sync(store.get, name)
    if record is None:
        raise SandboxNotFoundError(
            f"no live sandbox is named {name!r}: Sandbox.list() (microsandbox ls) shows them"
        )
    return SandboxHandle(store, record)


async def _kill_foreign_vm(record: SandboxRecord) -> None:
    """Kill the VM another live process owns (it sees its guest crash), if that
    pid is still its child, so a recycled pid is never signalled; return once
    it is dead (a zombie until its owner reaps it).
    """
    if record.vm_pid is None:
        return
    start = process_start(record.vm_pid)
    try:
        status = Path(f"/proc/{record.vm_pid}/status").read_text()
    except OSError:
        return
    ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
    if start is None or ppid != str(record.owner_pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.vm_pid, signal.SIGKILL)
    # SIGKILL lands asynchronously (QEMU unmaps its guest RAM first).
    with anyio.move_on_after(_SUPERVISOR_GRACE_S):
        while process_alive(record.vm_pid, start):
            await anyio.sleep(_POLL_S)


async def _stop_supervisor(store: StateStore, record: SandboxRecord, timeout: float | None) -> None:
    """Ask a detached sandbox's supervisor to stop it and wait for it to exit;
    signal it (SIGTERM, then SIGKILL) if it does not. A supervisor that could
    not clean up leaves a stale row, which ``store.get`` drops with its files.
    """
    with contextlib.suppress(SandboxError, OSError):
        remote = await anyio.to_thread.run_sync(RemoteSandbox.open, store, record)
        await remote._call("stop", timeout=timeout)
    grace = _SUPERVISOR_GRACE_S + (timeout or 0.0)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and process_alive(record.owner_pid, record.owner_start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.owner_pid, sig)
        with anyio.move_on_after(grace):
            while process_alive(record.owner_pid, record.owner_start):
                await anyio.sleep(_POLL_S)
            break
    await anyio.to_thread.run_sync(store.get, record.name)


async def create_detached(
    config: SandboxConfig, *, replace: bool, restore: Path | None = None
) -> RemoteSandbox:
    """Start ``config`` under a supervisor process of its own and connect to it;
    with ``restore``, the supervisor restores that snapshot directory instead
    (``Sandbox.detach``).

    :raises SandboxExistsError: the name is taken and ``replace`` is false.
    :raises BootError: (and the rest of ``Sandbox.create``'s errors) as the supervisor
        reports them.
    """
    store = StateStore.default(config.cache_dir)
    existing = await anyio.to_thread.run_sync(store.get, config.name)
    if existing is not None:
        if not replace:
            raise SandboxExistsError(
                f"a sandbox named {config.name!r} is already {existing.status.value}: pass "
                f"replace=True to stop it first, or choose another name"
            )
        await SandboxHandle(store, existing).remove()
    store.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = store.files_of(config.name)[2]
    with open(log, "wb") as err:
        # Its own session: Ctrl+C in our terminal must not reach it; no parent-death
        # signal: it is meant to outlive us.
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "pytest_microsandbox.runtime._supervisor",
                str(store.directory),
                *([] if restore is None else [str(restore)]),
            ],
            stdin=-1,
            stdout=-1,
            stderr=err,
            start_new_session=True,
        )
    assert process.stdin is not None and process.stdout is not None
    await process.stdin.send(config.to_json().encode())
    await process.stdin.aclose()
    reader = BufferedByteReceiveStream(process.stdout)
    try:
        answer = await read_line(reader)
    except (anyio.EndOfStream, anyio.IncompleteRead, ProtocolError):
        await process.wait()
        text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        log.unlink(missing_ok=True)
        raise SandboxError(
            f"the supervisor of detached sandbox {config.name!r} exited with status "
            f"{process.returncode} before it was ready; it said: {text or 'nothing'}"
        ) from None
    finally:
        await process.stdout.aclose()
    if not answer.get("ok"):
        await process.wait()
        log.unlink(missing_ok=True)
        raise error_from(answer)
    record = await anyio.to_thread.run_sync(store.get, config.name)
    if record is None or not record.detached:
        raise SandboxNotRunningError(
            f"detached sandbox {config.name!r} ended as soon as it started"
        )
    return await anyio.to_thread.run_sync(RemoteSandbox.open, store, record)


class RelayedChannel(anyio.abc.ByteStream):
    """A detached sandbox's channel through its supervisor's control socket: bytes
    both ways, after the one JSON answer line (``leftover``: what was read past it).
    """

    def __init__(self, stream: anyio.abc.SocketStream, leftover: bytes) -> None:
        self._stream = stream
        self._leftover = leftover

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class RemoteSandbox:
    """A detached sandbox, driven through its supervisor (any process may hold one).

    Names follow :class:`~.sandbox.Sandbox`; streamed execs and terminals are
    relayed by the supervisor (``_remote_stream.py``), snapshots and forks taken
    by it, and the raw channel (:meth:`open_channel`) relayed by it, one client
    at a time.
    """

    def __init__(self, store: StateStore, record: SandboxRecord, token: str) -> None:
        self.store = store
        self.record = record
        self.name = record.name
        self.config = SandboxConfig.from_json(record.config)
        self._token = token

    @classmethod
    def open(cls, store: StateStore, record: SandboxRecord) -> RemoteSandbox:
        """:raises SandboxNotRunningError: its supervisor's files are gone (it stopped)."""
        if record.control is None:
            raise SandboxNotRunningError(f"sandbox {record.name!r} has no supervisor")
        try:
            token = store.files_of(record.name)[1].read_text().strip()
        except OSError as exc:
            raise SandboxNotRunningError(
                f"sandbox {record.name!r}: its supervisor's token is gone ({exc.strerror}); "
                "it stopped: Sandbox.list() shows the live ones"
            ) from exc
        return cls(store, record, token)

    @property
    def pid(self) -> int | None:
        return self.record.vm_pid

    async def _connect(self) -> anyio.abc.SocketStream:
        path = self.record.control
        assert path is not None
        try:
            return await anyio.connect_unix(path)
        except OSError as exc:
            raise SandboxNotRunningError(
                f"sandbox {self.name!r}: its supervisor does not answer ({exc.strerror}); "
                "it stopped: Sandbox.list() shows the live ones"
            ) from exc

    async def _call(self, op: str, **args: Any) -> Any:
        stream = await self._connect()
        async with stream:
            await write_line(stream, {"token": self._token, "op": op, **args})
            try:
                answer = await read_line(BufferedByteReceiveStream(stream))
            except (anyio.EndOfStream, anyio.IncompleteRead):
                if op in ("stop", "kill", "drain"):
                    return None  # it went down with the sandbox before answering
                raise SandboxNotRunningError(
                    f"sandbox {self.name!r}: its supervisor hung up during {op}"
                ) from None
        if not answer.get("ok"):
            raise error_from(answer)
        return answer.get("result")

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
        """Run a command to completion (see :meth:`Sandbox.exec`; the output cap
        applies in the supervisor).
        """
        from .sandbox import ExecOutput

        data = stdin.encode() if isinstance(stdin, str) else stdin
        result = await self._call(
            "exec",
            cmd=cmd,
            args=list(args),
            env=dict(env or {}),
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=None if data is None else _b64(data),
            max_output=max_output,
            on_output_limit=on_output_limit,
        )
        if not isinstance(result, dict):
            raise ProtocolError("the supervisor's exec answer is not an object")
        return ExecOutput(
            exit_code=int(result["exit_code"]),
            stdout_bytes=_unb64(result["stdout"]),
            stderr_bytes=_unb64(result["stderr"]),
            term_signal=result.get("term_signal"),
            stdout_truncated=bool(result.get("stdout_truncated")),
            stderr_truncated=bool(result.get("stderr_truncated")),
        )

    async def shell(self, script: str, **kwargs: Any) -> ExecOutput:
        """Run ``script`` with the configured shell (``sh -c``)."""
        return await self.exec(self.config.shell, ["-c", script], **kwargs)

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
    ) -> RemoteExecHandle:
        """Start a command and return a handle streaming its events (see
        :meth:`Sandbox.exec_stream`); the output is windowed on the wire
        (``_remote_stream.py``). Leaving ``async with`` kills it if it runs.
        """
        from ._remote_stream import RemoteExecHandle, open_stream, stream_args

        request = stream_args(cmd, args, env, cwd, user, timeout) | {"stdin": stdin}
        session = await open_stream(self, "exec_stream", request)
        return RemoteExecHandle(session, cmd, timeout)

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
    ) -> RemotePtySession:
        """Start ``cmd`` on a new pseudo-terminal in the guest (see :meth:`Sandbox.pty`),
        relayed by the supervisor; leaving ``async with`` kills it if it runs.

        :raises ValueError: a size outside 1..65535.
        """
        from ._remote_stream import RemotePtySession, open_stream, stream_args

        if not (0 < rows <= 65535 and 0 < cols <= 65535):
            raise ValueError(f"a terminal of {rows}x{cols}: each side must be in 1..65535")
        request = stream_args(cmd, args, env, cwd, user, timeout) | {"rows": rows, "cols": cols}
        return RemotePtySession(await open_stream(self, "pty", request))

    async def snapshot(self, name: str) -> Path:
        """Capture the detached sandbox as snapshot ``name`` (see :meth:`Sandbox.snapshot`;
        the supervisor takes it, the sandbox runs on). Returns the snapshot's path.

        :raises SnapshotError: a mounted volume, a full disk, a QEMU error.
        """
        result = await self._call("snapshot", name=name)
        if not isinstance(result, str):
            raise ProtocolError("the supervisor's snapshot answer is not a path")
        return Path(result)

    async def fork(
        self, name: str | None = None, *, sandbox_name: str | None = None
    ) -> RemoteSandbox:
        """A detached child carrying this sandbox's state, under a supervisor of its own,
        called ``sandbox_name`` (default: this name and a random suffix). With a ``name``
        the capture is kept as that snapshot for more children
        (``Sandbox.restore(name)``); without, it is deleted once the child runs.

        :raises SnapshotError: like :meth:`snapshot`.
        :raises SandboxExistsError: a live sandbox is already called ``sandbox_name``.
        """
        from .sandbox import _snapshotter

        capture = name or f"fork-{secrets.token_hex(8)}"
        child = sandbox_name or f"{self.name}-{secrets.token_hex(3)}"
        path = await self.snapshot(capture)
        try:
            config = self.config.model_copy(update={"name": child})
            return await create_detached(config, replace=False, restore=path)
        finally:
            if name is None:
                with anyio.CancelScope(shield=True), contextlib.suppress(SandboxError, OSError):
                    await _snapshotter().remove(capture, self.config.cache_dir)

    def fs(self) -> RemoteSandboxFs:
        return RemoteSandboxFs(self)

    async def metrics(self) -> SandboxMetrics:
        from .sandbox import SandboxMetrics

        result = await self._call("metrics")
        if not isinstance(result, dict):
            raise ProtocolError("the supervisor's metrics answer is not an object")
        return SandboxMetrics(**result)

    async def status(self) -> SandboxStatus:
        """The sandbox's status now (STOPPED once its supervisor is gone)."""
        try:
            return SandboxStatus(await self._call("status"))
        except SandboxNotRunningError:
            return SandboxStatus.STOPPED

    async def pause(self) -> None:
        await self._call("pause")

    async def resume(self) -> None:
        await self._call("resume")

    async def drain(self, timeout: float | None = None) -> None:
        await self._call("drain", timeout=timeout)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop it and wait until its supervisor has cleaned up (a stopped sandbox
        leaves the store: this removes it too).
        """
        await _stop_supervisor(self.store, self.record, timeout)

    async def kill(self) -> None:
        with contextlib.suppress(SandboxNotRunningError):
            await self._call("kill")

    async def open_channel(self) -> anyio.abc.ByteStream:
        """The raw byte channel to the guest (see :meth:`Sandbox.open_channel`),
        relayed by the supervisor, which holds the VM's end for the sandbox's
        life: one client at a time, and another may open it once this one is
        closed (unlike a local sandbox's, opened once). What the guest writes
        while no client holds it is discarded. An open channel counts as host
        activity (``idle_timeout``).

        :raises SandboxError: another client holds the channel (its message says
            so), or the sandbox is stopped.
        """
        stream = await self._connect()
        try:
            await write_line(stream, {"token": self._token, "op": "channel"})
            reader = BufferedByteReceiveStream(stream)
            try:
                answer = await read_line(reader)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                raise SandboxNotRunningError(
                    f"sandbox {self.name!r}: its supervisor hung up opening the channel"
                ) from None
            if not answer.get("ok"):
                raise error_from(answer)
        except BaseException:
            await stream.aclose()
            raise
        return RelayedChannel(stream, reader.buffer)

    async def remove(self, timeout: float | None = None) -> None:
        await SandboxHandle(self.store, self.record).remove(timeout=timeout)

    async def wait(self) -> SandboxStatus:
        """Wait until the sandbox stops (its supervisor then exits)."""
        with contextlib.suppress(SandboxNotRunningError):
            await self._call("wait")
        while process_alive(self.record.owner_pid, self.record.owner_start):
            await anyio.sleep(_POLL_S)
        return SandboxStatus.STOPPED

    async def detach(self) -> RemoteSandbox:
        """Already detached: returns itself."""
        return self

    def __repr__(self) -> str:
        return f"<RemoteSandbox {self.name!r} supervisor={self.record.owner_pid}>"


class RemoteSandboxFs:
    """Guest files of a detached sandbox (see :class:`~.sandbox.SandboxFs`)."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def read(self, path: str) -> bytes:
        return _unb64(await self._sb._call("read", path=path))

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        payload = data.encode() if isinstance(data, str) else data
        return int(await self._sb._call("write", path=path, data=_b64(payload), mode=mode))

    async def list(self, path: str) -> list[DirEntry]:
        result = await self._sb._call("list", path=path)
        if not isinstance(result, list):
            raise ProtocolError("the supervisor's list answer is not an array")
        return [
            DirEntry(str(e[0]), FileKind(e[1]), int(e[2]), int(e[3]), int(e[4])) for e in result
        ]

    async def exists(self, path: str) -> bool:
        return bool(await self._sb._call("exists", path=path))

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        await self._sb._call("mkdir", path=path, parents=parents, mode=mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sb._call("remove", path=path, recursive=recursive)
