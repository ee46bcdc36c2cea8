"""Streamed commands and terminal sessions of a detached sandbox, relayed by its
supervisor over the control socket (``_supervisor.py``, ``_remote.py``).

A stream request (``{"token", "op": "exec_stream" | "pty", ...}``) is answered
like any other (``{"ok": true, "result": {"pid": N}}`` or an error); after an
``ok`` its connection carries the session, one JSON object per line, each
line at most :data:`STREAM_LINE` bytes:

- supervisor to client: ``{"o": B64}`` stdout (a terminal's output),
  ``{"e": B64}`` stderr, each at most :data:`PIECE` bytes; last
  ``{"x": {"exit_code", "term_signal", "timed_out"}}``, then it closes;
- client to supervisor: ``{"i": B64}`` stdin or keys (at most :data:`PIECE`),
  ``{"eof": true}``, ``{"sig": N}``, ``{"kill": true}``, ``{"size": [ROWS, COLS]}``
  (a terminal), ``{"ack": N}`` (N output bytes consumed).

The output is windowed like the local PTY's: the supervisor sends at most
:data:`STREAM_WINDOW` bytes the client has not acknowledged, then stops
reading the guest command until it has, so a slow client costs the
supervisor a bounded buffer, never more. Anything else (an unknown key, bad
base64, an oversized piece, an ack of bytes never sent) breaks the session:
the supervisor kills the command, the client raises :class:`ProtocolError`.
The client closing its connection kills the command.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from ._exceptions import (
    ExecTimeoutError,
    OutputLimitError,
    ProtocolError,
    SandboxError,
    SandboxNotRunningError,
)
from ._remote import RemoteSandbox, _b64, _unb64, error_from, read_line, write_line
from .agent.results import Exited, Stderr, Stdout
from .pty import PTY_WINDOW

if TYPE_CHECKING:
    from .agent.results import ExecEvent
    from .pty import PtySession
    from .sandbox import ExecHandle, ExecOutput, Sandbox

__all__ = [
    "PIECE",
    "STREAM_LINE",
    "STREAM_OPS",
    "STREAM_WINDOW",
    "RemoteExecHandle",
    "RemotePtySession",
    "open_relay",
    "open_stream",
]

#: Output or input bytes in one session line, at most (64 KiB of base64).
PIECE = 48 * 1024
#: Longest session line either side accepts.
STREAM_LINE = 80 * 1024
#: Output bytes in flight to a client, at most (the local PTY's window).
STREAM_WINDOW = PTY_WINDOW
#: The control operations that open a session.
STREAM_OPS = frozenset({"exec_stream", "pty"})
#: Longest terminal side (the agent's limit).
_MAX_SIDE = 65535
#: Highest signal number a client may ask for (Linux's SIGRTMAX).
_MAX_SIGNAL = 64


def _pieces(data: bytes) -> list[bytes]:
    return [data[i : i + PIECE] for i in range(0, len(data), PIECE)] or [b""]


def _piece(message: Mapping[str, Any], key: str) -> bytes:

    data = _unb64(message[key])
    if len(data) > PIECE:
        raise ProtocolError(f"a stream piece of {len(data)} bytes is over {PIECE}")
    return data


def _exit_of(message: Mapping[str, Any]) -> Exited:
    info = message["x"]
    if not isinstance(info, dict):
        raise ProtocolError("a stream's exit is not an object")
    code, sig, timed_out = info.get("exit_code"), info.get("term_signal"), info.get("timed_out")
    for value in (code, sig):
        if value is not None and (type(value) is not int or not -(1 << 31) <= value < 1 << 31):
            raise ProtocolError(f"a stream's exit carries a bad status {value!r}")
    if type(timed_out) is not bool or (code is None) == (sig is None):
        raise ProtocolError("a stream's exit needs one of exit_code and term_signal")
    return Exited(code, sig, timed_out)


# -- the supervisor's side ------------------------------------------------------------------


class _Relay:
    """One guest command (an exec stream or a terminal) relayed to one client."""

    def __init__(self, handle: ExecHandle | None, session: PtySession | None) -> None:
        self._handle = handle
        self._session = session
        self._sent = 0
        self._acked = 0
        self._acks = anyio.Event()

    @property
    def pid(self) -> int:
        source = self._handle or self._session
        assert source is not None
        return source.pid

    async def _output(self) -> AsyncIterator[tuple[str, bytes] | Exited]:
        if self._handle is not None:
            async for event in self._handle:
                if isinstance(event, Stdout):
                    yield "o", event.data
                elif isinstance(event, Stderr):
                    yield "e", event.data
                elif isinstance(event, Exited):
                    yield event
                    return
            return
        assert self._session is not None
        while data := await self._session.read():
            yield "o", data
        code = self._session.returncode
        assert code is not None
        yield Exited(code if code >= 0 else None, -code if code < 0 else None, False)

    async def run(self, stream: anyio.abc.SocketStream, reader: BufferedByteReceiveStream) -> None:
        """Relay until the command exits or the client goes; the command is dead after."""

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._control, reader, tg.cancel_scope)
                async for item in self._output():
                    if isinstance(item, Exited):
                        exit_ = {
                            "exit_code": item.exit_code,
                            "term_signal": item.term_signal,
                            "timed_out": item.timed_out,
                        }
                        await write_line(stream, {"x": exit_})
                        break
                    kind, data = item
                    for piece in _pieces(data):
                        while self._sent - self._acked >= STREAM_WINDOW:
                            self._acks = anyio.Event()
                            await self._acks.wait()
                        await write_line(stream, {kind: _b64(piece)})
                        self._sent += len(piece)
                else:  # the command's stream ended without its exit: it was killed
                    gone = {"exit_code": None, "term_signal": signal.SIGKILL, "timed_out": False}
                    await write_line(stream, {"x": gone})
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def _control(self, reader: BufferedByteReceiveStream, scope: anyio.CancelScope) -> None:

        try:
            while True:
                await self._apply(await read_line(reader, STREAM_LINE))
        except (anyio.EndOfStream, anyio.IncompleteRead, OSError, anyio.BrokenResourceError):
            scope.cancel()  # the client went away: the command goes too
        except (ProtocolError, KeyError, TypeError, ValueError):
            scope.cancel()  # it broke the protocol: the same

    async def _apply(self, message: dict[str, Any]) -> None:
        if len(message) != 1:
            raise ProtocolError("a stream message has exactly one key")
        ((key, value),) = message.items()
        if key == "ack":
            if type(value) is not int or not 0 < value <= self._sent - self._acked:
                raise ProtocolError(f"an ack of {value!r} bytes was never sent")
            self._acked += value
            self._acks.set()
        elif key == "i":
            data = _piece(message, "i")
            if self._handle is not None:
                await self._handle.write_stdin(data)
            elif self._session is not None:
                await self._session.write(data)
        elif key == "eof" and value is True and self._handle is not None:
            await self._handle.close_stdin()
        elif key == "sig" and type(value) is int and 0 < value <= _MAX_SIGNAL:
            source = self._handle or self._session
            assert source is not None
            await source.signal(value)
        elif key == "kill" and value is True:
            if self._handle is not None:
                await self._handle.kill()
            elif self._session is not None:
                await self._session.signal(signal.SIGKILL)
        elif key == "size" and self._session is not None:
            rows, cols = value
            if not all(type(v) is int and 0 < v <= _MAX_SIDE for v in (rows, cols)):
                raise ProtocolError(f"a terminal size of {value!r}")
            await self._session.resize(rows, cols)
        else:
            raise ProtocolError(f"an unknown stream message {key!r}")

    async def aclose(self) -> None:
        with contextlib.suppress(SandboxError, OSError):
            if self._handle is not None:
                await self._handle.__aexit__(None, None, None)
            if self._session is not None:
                await self._session.aclose()


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what} is not a list of strings")
    return list(value)


def _env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ProtocolError("env is not an object of strings")
    return dict(value)


def _optional(value: object, kind: type, what: str) -> Any:
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    if kind is float and type(value) is int:
        return float(value)
    raise ProtocolError(f"{what} is not a {kind.__name__}")


async def open_relay(sandbox: Sandbox, op: str, args: Mapping[str, Any]) -> _Relay:
    """Start the command a stream request asks for (the supervisor's side).

    :raises ProtocolError: a malformed request. The sandbox's own errors
        (``CommandNotFoundError``...) pass through, to be answered as errors.
    """
    cmd = args.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("cmd is not a string")
    argv = _strings(args.get("args", []), "args")
    env = _env(args.get("env"))
    cwd = _optional(args.get("cwd"), str, "cwd")
    user = _optional(args.get("user"), str, "user")
    timeout = _optional(args.get("timeout"), float, "timeout")
    if op == "pty":
        rows, cols = (_optional(args.get(k, d), int, k) for k, d in (("rows", 24), ("cols", 80)))
        session = await sandbox.pty(
            cmd, argv, rows=rows, cols=cols, env=env, cwd=cwd, user=user, timeout=timeout
        )
        return _Relay(None, session)
    stdin = args.get("stdin", False)
    if type(stdin) is not bool:
        raise ProtocolError("stdin is not a boolean")
    handle = await sandbox.exec_stream(
        cmd, argv, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin
    )
    return _Relay(handle, None)


# -- the client's side ----------------------------------------------------------------------


class _Session:
    """A client's end of one stream session."""

    def __init__(
        self,
        sandbox: RemoteSandbox,
        stream: anyio.abc.SocketStream,
        reader: BufferedByteReceiveStream,
        pid: int,
    ) -> None:
        self._sandbox = sandbox
        self._stream = stream
        self._reader = reader
        self._send_lock = anyio.Lock()
        self.pid = pid
        self.exited: Exited | None = None
        self._closed = False

    async def send(self, message: Mapping[str, Any]) -> None:

        if self.exited is not None or self._closed:
            return  # the command is gone: input for it is dropped
        async with self._send_lock:
            # It may have ended meanwhile: the next read says how.
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await write_line(self._stream, message)

    async def next(self) -> tuple[str, bytes] | Exited:
        """The next output piece (acknowledged), or the exit."""

        if self.exited is not None:
            return self.exited
        try:
            message = await read_line(self._reader, STREAM_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead, OSError):
            raise SandboxNotRunningError(
                f"sandbox {self._sandbox.name!r}: its supervisor hung up during a command "
                "(the sandbox stopped?): microsandbox ls shows the live ones"
            ) from None
        try:
            if len(message) == 1 and "x" in message:
                self.exited = _exit_of(message)
                await self.aclose()
                return self.exited
            if len(message) == 1 and ("o" in message or "e" in message):
                key = "o" if "o" in message else "e"
                data = _piece(message, key)
                if data:
                    await self.send({"ack": len(data)})
                return key, data
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"a bad stream message from the supervisor: {exc!r}") from None
        raise ProtocolError(f"an unknown stream message from the supervisor: {sorted(message)}")

    async def write(self, data: bytes) -> None:

        for piece in _pieces(data):
            if piece:
                await self.send({"i": _b64(piece)})

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.aclose()


async def open_stream(sandbox: RemoteSandbox, op: str, args: Mapping[str, Any]) -> _Session:
    """Send a stream request and return its session once the command started."""

    stream = await sandbox._connect()
    try:
        await write_line(stream, {"token": sandbox._token, "op": op, **args})
        reader = BufferedByteReceiveStream(stream)
        try:
            answer = await read_line(reader, STREAM_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            raise SandboxNotRunningError(
                f"sandbox {sandbox.name!r}: its supervisor hung up before {op} started"
            ) from None
        if not answer.get("ok"):
            raise error_from(answer)
        result = answer.get("result")
        pid = result.get("pid") if isinstance(result, dict) else None
        if type(pid) is not int or pid <= 0:
            raise ProtocolError(f"the supervisor's {op} answer carries no pid")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return _Session(sandbox, stream, reader, pid)


class RemoteExecHandle:
    """A command running in a detached sandbox (see :class:`~.sandbox.ExecHandle`)."""

    def __init__(self, session: _Session, program: str, timeout: float | None) -> None:
        self._session = session
        self._program = program
        self._timeout = timeout

    @property
    def pid(self) -> int:
        return self._session.pid

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ExecEvent]:
        while True:
            item = await self._session.next()
            if isinstance(item, Exited):
                yield item
                return
            kind, data = item
            yield Stdout(data) if kind == "o" else Stderr(data)

    async def write_stdin(self, data: bytes) -> None:
        await self._session.write(data)

    async def close_stdin(self) -> None:
        await self._session.send({"eof": True})

    async def signal(self, sig: int) -> None:
        await self._session.send({"sig": sig})

    async def kill(self) -> None:
        await self._session.send({"kill": True})

    async def wait(
        self, *, max_output: int | None = None, on_output_limit: str | None = None
    ) -> ExecOutput:
        """Wait for the exit; output not taken by iteration is in the result,
        capped like :meth:`RemoteSandbox.exec` (the config's ``max_output_bytes``).

        :raises ExecTimeoutError: the command ran past its timeout and was killed.
        :raises OutputLimitError: the output passed the cap and the action is ``raise``.
        """
        from .sandbox import ExecOutput

        config = self._session._sandbox.config
        limit = config.max_output_bytes if max_output is None else max_output
        action = config.on_output_limit if on_output_limit is None else on_output_limit
        out = {"o": bytearray(), "e": bytearray()}
        cut = {"o": False, "e": False}
        while not isinstance(item := await self._session.next(), Exited):
            kind, data = item
            room = max(0, limit - len(out["o"]) - len(out["e"]))
            out[kind] += data[:room]
            if len(data) > room:
                cut[kind] = True
                if action == "raise":
                    await self._session.aclose()  # the supervisor kills the command
                    raise OutputLimitError(
                        f"{self._program!r} wrote more than {limit} bytes: pass a larger "
                        'max_output or on_output_limit="truncate"',
                        limit=limit,
                        stdout=bytes(out["o"]),
                        stderr=bytes(out["e"]),
                    )
        if item.timed_out:
            raise ExecTimeoutError(
                f"{self._program!r} ran past its {self._timeout or 0:g} s timeout and was "
                "killed in the guest",
                stdout=bytes(out["o"]),
                stderr=bytes(out["e"]),
                timeout=self._timeout or 0.0,
            )
        return ExecOutput(
            exit_code=item.exit_code if item.exit_code is not None else -(item.term_signal or 0),
            stdout_bytes=bytes(out["o"]),
            stderr_bytes=bytes(out["e"]),
            term_signal=item.term_signal,
            stdout_truncated=cut["o"],
            stderr_truncated=cut["e"],
        )

    async def aclose(self) -> None:
        """Let go of the command (the supervisor kills it if it still runs)."""
        await self._session.aclose()

    async def __aenter__(self) -> RemoteExecHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


class RemotePtySession:
    """A terminal session in a detached sandbox (see :class:`~.pty.PtySession`)."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    @property
    def pid(self) -> int:
        return self._session.pid

    @property
    def returncode(self) -> int | None:
        exited = self._session.exited
        if exited is None:
            return None
        return exited.exit_code if exited.exit_code is not None else -(exited.term_signal or 0)

    async def read(self) -> bytes:
        """The next output, waiting for it; ``b""`` once the command exited."""
        while not isinstance(item := await self._session.next(), Exited):
            if item[1]:
                return item[1]
        return b""

    async def write(self, data: bytes | str) -> None:
        await self._session.write(data.encode() if isinstance(data, str) else data)

    async def resize(self, rows: int, cols: int) -> None:
        """:raises ValueError: a size outside 1..65535."""
        if not (0 < rows <= _MAX_SIDE and 0 < cols <= _MAX_SIDE):
            raise ValueError(f"a terminal of {rows}x{cols}: each side must be in 1..65535")
        await self._session.send({"size": [rows, cols]})

    async def signal(self, sig: int) -> None:
        await self._session.send({"sig": sig})

    async def wait(self) -> int:
        """The exit code, or minus the killing signal; output not read is discarded."""
        while await self.read():
            pass
        code = self.returncode
        assert code is not None
        return code

    async def aclose(self) -> None:
        await self._session.aclose()

    async def __aenter__(self) -> RemotePtySession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


def stream_args(
    cmd: str,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
) -> dict[str, Any]:
    return {
        "cmd": cmd,
        "args": list(args),
        "env": dict(env or {}),
        "cwd": cwd,
        "user": user,
        "timeout": timeout,
    }
