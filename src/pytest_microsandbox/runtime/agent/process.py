"""A command running in the guest, driven over one EXEC request id."""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

import anyio

from .._exceptions import ExecError, GuestTimeoutError, ProtocolError
from .protocol import CHUNK, Field, Frame, MsgType, Tag, bytes_field, int_field
from .results import ExecEvent, ExecResult, Exited, Started, Stderr, Stdout

__all__ = ["ExecProcess", "RequestChannel"]

#: How long the best-effort SIGKILL sent when giving up may take.
_KILL_SEND_TIMEOUT = 5.0


class RequestChannel(Protocol):
    """The client's view of one request id, as used by :class:`ExecProcess`."""

    @property
    def id(self) -> int:
        """The request id."""
        ...

    async def send(self, type: MsgType, fields: Sequence[Field] = ()) -> None:
        """Send one frame on this id; raises the connection's error if it is dead."""
        ...

    async def receive(self) -> Frame:
        """Next frame for this id; raises the connection's error if it died."""
        ...

    def violation(self, message: str) -> ProtocolError:
        """Poison the connection for a guest protocol violation; return the error to raise."""
        ...

    def close(self) -> None:
        """Stop routing frames to this id (later frames for it are dropped)."""
        ...


class ExecProcess:
    """A started guest command (see ``AgentClient.exec_stream``).

    Iterate it (``async for event in proc``) for :class:`Started`, then
    :class:`Stdout`/:class:`Stderr` chunks, then one :class:`Exited`; or call
    :meth:`wait`, which collects the output not yet consumed by iteration. Use
    one consumer at a time. Leaving ``async with`` (or :meth:`aclose`) while the
    command runs kills its process group; use one of them, or wait to the end,
    so the request id is released.

    Reading events raises GuestTimeoutError if the agent has not reported the
    exit by the backstop deadline (command timeout + grace), ExecError if the
    agent reports an ERROR after the start, and the connection's error
    (ProtocolError, SandboxNotRunningError) if the connection dies.
    """

    def __init__(
        self,
        channel: RequestChannel,
        *,
        program: str,
        pid: int,
        stdin_pipe: bool,
        deadline: float | None,
    ) -> None:
        self._chan = channel
        self.program = program
        self.pid = pid
        self._stdin_pipe = stdin_pipe
        self._stdin_closed = not stdin_pipe
        self._deadline = deadline
        self._started_yielded = False
        self._exited: Exited | None = None
        self._result: ExecResult | None = None
        self._done = False  # the request id has been released

    @property
    def exited(self) -> Exited | None:
        """The exit event once the guest reported it, else None."""
        return self._exited

    @property
    def returncode(self) -> int | None:
        """Exit code, or minus the killing signal, once exited; None while running."""
        if self._exited is None:
            return None
        if self._exited.exit_code is not None:
            return self._exited.exit_code
        return -(self._exited.term_signal or 0)

    # -- events -----------------------------------------------------------------------------

    def __aiter__(self) -> ExecProcess:
        return self

    async def __anext__(self) -> ExecEvent:
        if not self._started_yielded:
            self._started_yielded = True
            return Started(self.pid)
        if self._exited is not None:
            raise StopAsyncIteration
        return await self._next_event()

    async def wait(self) -> ExecResult:
        """Wait for the exit; return it with the output not consumed by iteration.

        Raises like event iteration (see the class docstring). A second call
        returns the first call's result.
        """
        if self._result is not None:
            return self._result
        out = bytearray()
        err = bytearray()
        self._started_yielded = True
        while self._exited is None:
            event = await self._next_event()
            if isinstance(event, Stdout):
                out += event.data
            elif isinstance(event, Stderr):
                err += event.data
        self._result = ExecResult(
            pid=self.pid,
            exit_code=self._exited.exit_code,
            term_signal=self._exited.term_signal,
            timed_out=self._exited.timed_out,
            stdout=bytes(out),
            stderr=bytes(err),
        )
        return self._result

    async def _next_event(self) -> ExecEvent:
        if self._done:
            # Released without an exit (aclose, an earlier error): nothing more will come.
            raise ExecError(f"exec of {self.program!r} (pid {self.pid}) was abandoned")
        frame = await self._receive()
        if frame.type == MsgType.STDOUT:
            return Stdout(frame.require_bytes(Tag.DATA))
        if frame.type == MsgType.STDERR:
            return Stderr(frame.require_bytes(Tag.DATA))
        if frame.type == MsgType.EXITED:
            timed_out = frame.require_int(Tag.TIMED_OUT)
            if timed_out not in (0, 1):
                self._release()
                raise self._chan.violation(f"EXITED (id {frame.id}) has TIMED_OUT={timed_out}")
            self._exited = Exited(
                exit_code=frame.get_int(Tag.EXIT_CODE),
                term_signal=frame.get_int(Tag.TERM_SIGNAL),
                timed_out=bool(timed_out),
            )
            self._release()
            return self._exited
        self._release()
        if frame.type == MsgType.ERROR:
            errno = frame.require_int(Tag.ERRNO)
            raise ExecError(
                f"exec of {self.program!r} (pid {self.pid}) failed in the guest: "
                f"{frame.require_str(Tag.MESSAGE)} (errno {errno})"
            )
        raise self._chan.violation(
            f"unexpected {frame.type_name} (id {frame.id}) while an exec is running"
        )

    async def _receive(self) -> Frame:
        if self._deadline is None:
            return await self._chan.receive()
        try:
            with anyio.fail_after(max(0.0, self._deadline - anyio.current_time())):
                return await self._chan.receive()
        except TimeoutError:
            # The agent should have killed the command and reported EXITED by now.
            await self._give_up()
            raise GuestTimeoutError(
                f"agent did not report the exit of {self.program!r} (pid {self.pid}) "
                "by its timeout plus grace"
            ) from None

    # -- input and signals ------------------------------------------------------------------

    async def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin, in CHUNK-sized frames.

        Raises ValueError if stdin is not a pipe or was closed. Data sent after
        the command exited is dropped (by the host or the agent).
        """
        if not self._stdin_pipe:
            raise ValueError("stdin is not a pipe; start the exec with stdin=True")
        if self._stdin_closed:
            raise ValueError("stdin is closed")
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK):
            if self._done:
                return
            chunk = bytes(view[offset : offset + CHUNK])
            await self._chan.send(MsgType.STDIN, [bytes_field(Tag.DATA, chunk)])

    async def close_stdin(self) -> None:
        """Close the command's stdin (EOF). Idempotent; a no-op without a pipe."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if not self._done:
            # An empty DATA chunk is the protocol's EOF marker.
            await self._chan.send(MsgType.STDIN, [bytes_field(Tag.DATA, b"")])

    async def signal(self, sig: int) -> None:
        """Send ``sig`` to the command's process group; a no-op once it exited."""
        if self._done:
            return
        await self._chan.send(MsgType.SIGNAL, [int_field(Tag.SIGNAL, int(sig))])

    async def kill(self) -> None:
        """Send SIGKILL to the command's process group; a no-op once it exited."""
        await self.signal(_signal.SIGKILL)

    # -- lifetime ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Kill the command if it still runs and release the request id."""
        if not self._done:
            await self._give_up()

    async def __aenter__(self) -> ExecProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _give_up(self) -> None:
        # Best effort: never let cleanup hang or mask the error being raised.
        try:
            with anyio.move_on_after(_KILL_SEND_TIMEOUT, shield=True):
                await self.kill()
        except Exception:  # the connection may be dead already; nothing left to kill then
            pass
        finally:
            self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._chan.close()
