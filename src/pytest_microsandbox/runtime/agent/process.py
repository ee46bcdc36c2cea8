"""A command running in the guest, driven over one EXEC request id."""

from __future__ import annotations

import io
import signal as _signal
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

import anyio

from .._exceptions import ExecError, GuestTimeoutError, OutputLimitError, ProtocolError
from .._limits import OnOutputLimit
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

    async def ack(self, size: int) -> None:
        """Tell the agent ``size`` bytes of output were consumed (EXEC WINDOW)."""
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
        tty: bool = False,
        ack_every: int = 0,
    ) -> None:
        self._chan = channel
        # > 0: output is acknowledged by itself once this many bytes were taken
        # (events yielded or collected), so the window bounds what the host holds.
        self._ack_every = ack_every
        self._taken = 0
        self.program = program
        self.pid = pid
        self._stdin_pipe = stdin_pipe
        self._stdin_closed = not stdin_pipe
        self._deadline = deadline
        self.tty = tty
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

    async def wait(
        self, *, max_output: int | None = None, on_output_limit: OnOutputLimit = "raise"
    ) -> ExecResult:
        """Wait for the exit; return it with the output not consumed by iteration.

        ``max_output`` caps the stdout and stderr collected, together, in bytes
        (None: no cap). Past it, ``on_output_limit="raise"`` kills the command
        and raises OutputLimitError holding the output up to the cap;
        ``"truncate"`` drops the rest, lets the command run to its exit and
        sets ``stdout_truncated`` / ``stderr_truncated`` on the result.
        Otherwise raises like event iteration (see the class docstring). A
        second call returns the first call's result.
        """
        if self._result is not None:
            return self._result
        collected = _Collected(max_output)
        self._started_yielded = True
        while self._exited is None:
            event = await self._next_event()
            if isinstance(event, (Stdout, Stderr)):
                if collected.add(event) or on_output_limit == "truncate":
                    continue
                await self._give_up()
                raise OutputLimitError(
                    f"{self.program!r} (pid {self.pid}) wrote more than {max_output} bytes "
                    "to stdout and stderr, the limit on collected output, and was killed: "
                    "raise max_output (per call, or max_output_bytes in SandboxConfig), "
                    'pass on_output_limit="truncate" to keep the first bytes and let it '
                    "finish, or read its output as it comes with exec_stream",
                    limit=max_output or 0,
                    stdout=collected.stdout.getvalue(),
                    stderr=collected.stderr.getvalue(),
                )
        self._result = ExecResult(
            pid=self.pid,
            exit_code=self._exited.exit_code,
            term_signal=self._exited.term_signal,
            timed_out=self._exited.timed_out,
            # getvalue() hands over BytesIO's own buffer: no second copy of the output.
            stdout=collected.stdout.getvalue(),
            stderr=collected.stderr.getvalue(),
            stdout_truncated=collected.stdout_truncated,
            stderr_truncated=collected.stderr_truncated,
        )
        return self._result

    async def _next_event(self) -> ExecEvent:
        if self._done:
            # Released without an exit (aclose, an earlier error): nothing more will come.
            raise ExecError(f"exec of {self.program!r} (pid {self.pid}) was abandoned")
        frame = await self._receive()
        if frame.type == MsgType.STDOUT:
            data = frame.require_bytes(Tag.DATA)
            await self._took(len(data))
            return Stdout(data)
        if frame.type == MsgType.STDERR:
            if self.tty:
                # A terminal has one output: the agent never sends STDERR for it.
                self._release()
                raise self._chan.violation(f"STDERR (id {frame.id}) from a pseudo-terminal")
            data = frame.require_bytes(Tag.DATA)
            await self._took(len(data))
            return Stderr(data)
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

    async def _took(self, size: int) -> None:
        """Count ``size`` output bytes taken; acknowledge them in batches when
        ``ack_every`` is set (one ACK frame per batch, not one per chunk).
        """
        if not self._ack_every:
            return
        self._taken += size
        if self._taken >= self._ack_every:
            taken, self._taken = self._taken, 0
            await self.ack(taken)

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

    async def ack(self, size: int) -> None:
        """Acknowledge ``size`` bytes of output consumed, for an exec started with a
        ``window``: the agent may send that much more. A no-op once it exited.
        """
        if not self._done and size > 0:
            await self._chan.ack(size)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the pseudo-terminal's size (the guest's foreground process group
        gets SIGWINCH); a no-op once it exited.

        :raises ValueError: the command has no terminal, or a size is outside 1..65535.
        """
        if not self.tty:
            raise ValueError("the command has no terminal; start the exec with tty=(rows, cols)")
        if not (1 <= rows <= 0xFFFF and 1 <= cols <= 0xFFFF):
            raise ValueError(f"a terminal of {rows}x{cols}: rows and cols must be 1..65535")
        if self._done:
            return
        size = [int_field(Tag.ROWS, rows), int_field(Tag.COLS, cols)]
        await self._chan.send(MsgType.RESIZE, size)

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


class _Collected:
    """stdout and stderr collected up to a shared byte budget.

    io.BytesIO rather than bytearray + bytes(): its getvalue() returns the
    buffer itself, so the host holds the output once (about 1.1x with
    BytesIO's growth slack), not twice.
    """

    def __init__(self, limit: int | None) -> None:
        self.room = limit
        self.stdout = io.BytesIO()
        self.stderr = io.BytesIO()
        self.stdout_truncated = False
        self.stderr_truncated = False

    def add(self, event: Stdout | Stderr) -> bool:
        """Keep what fits of ``event``; return False if some of it was dropped."""
        is_out = isinstance(event, Stdout)
        sink = self.stdout if is_out else self.stderr
        data = event.data
        if self.room is None:
            sink.write(data)
            return True
        kept = min(len(data), self.room)
        if kept:
            sink.write(memoryview(data)[:kept])
            self.room -= kept
        if kept == len(data):
            return True
        if is_out:
            self.stdout_truncated = True
        else:
            self.stderr_truncated = True
        return False
