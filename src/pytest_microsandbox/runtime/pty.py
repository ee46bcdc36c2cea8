"""Interactive sessions: a command on a pseudo-terminal in the guest
(:meth:`Sandbox.pty <pytest_microsandbox.runtime.Sandbox.pty>`).

The agent opens the pty, makes it the command's controlling terminal and
relays it over the command's EXEC request (``docs/protocol.md``): its output
arrives as STDOUT chunks (each at most the protocol's CHUNK, validated like
every frame; a STDERR frame for a terminal breaks the protocol), keystrokes go
as STDIN, a size change as RESIZE. The output is windowed: the agent sends at
most :data:`PTY_WINDOW` bytes the host has not read (ACK), so a guest flooding
its terminal costs the host a bounded buffer, and one ignoring the window
breaks the protocol. Nothing is interpreted on the host: a
``\\x03`` written is a Ctrl-C the guest's line discipline turns into SIGINT for
the foreground process group.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from .agent.results import Exited, Stderr, Stdout

#: Output a session holds unread, at most, while its command runs (the agent stops
#: reading the terminal until the host has consumed it); a guest that ignores the
#: window is cut off past 33 windows, 8.25 MiB (``docs/protocol.md``).
PTY_WINDOW = 256 * 1024

if TYPE_CHECKING:
    from .agent.process import ExecProcess
    from .sandbox import Sandbox

__all__ = ["PTY_WINDOW", "PtySession"]


class PtySession:
    """A command running on a pseudo-terminal in the guest.

    ``read()`` returns its output as it comes and ``b""`` once it exited;
    ``write()`` types into it; ``resize()`` changes the terminal's size;
    ``wait()`` returns the exit status. Leaving ``async with`` (or
    :meth:`aclose`) kills it if it still runs.
    """

    def __init__(self, sandbox: Sandbox, process: ExecProcess) -> None:
        self._sandbox = sandbox
        self._process = process
        self._exited: Exited | None = None

    @property
    def pid(self) -> int:
        """The command's pid in the guest."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, minus the killing signal, or None while it runs."""
        return self._process.returncode

    async def read(self) -> bytes:
        """The next output (at most one chunk), waiting for it; ``b""`` once the
        command exited and all its output was read.
        """
        if self._exited is not None:
            return b""
        async with self._sandbox._guest_errors():
            async for event in self._process:
                if isinstance(event, Stdout):
                    await self._process.ack(len(event.data))
                    return event.data
                if isinstance(event, Exited):
                    self._exited = event
                    return b""
                if isinstance(event, Stderr):  # pragma: no cover - the process refuses it
                    raise AssertionError("a terminal has no stderr")
        return b""

    async def write(self, data: bytes | str) -> None:
        """Type ``data`` (text is UTF-8) into the terminal; dropped once it exited."""
        if isinstance(data, str):
            data = data.encode()
        async with self._sandbox._guest_errors():
            await self._process.write_stdin(data)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size; the foreground process group gets SIGWINCH.

        :raises ValueError: a size outside 1..65535.
        """
        async with self._sandbox._guest_errors():
            await self._process.resize(rows, cols)

    async def signal(self, sig: int) -> None:
        """Send ``sig`` to the session's process group (the command's own)."""
        async with self._sandbox._guest_errors():
            await self._process.signal(sig)

    async def wait(self) -> int:
        """Wait for the exit, discarding output not read; the exit code, or minus
        the signal that killed it.
        """
        while await self.read():
            pass
        code = self._process.returncode
        assert code is not None
        return code

    async def aclose(self) -> None:
        """Kill the command if it still runs and release its request."""
        await self._process.aclose()

    async def __aenter__(self) -> PtySession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
