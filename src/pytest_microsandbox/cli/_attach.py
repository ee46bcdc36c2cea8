"""Connect this process's terminal to a guest command: a PTY session (keys in,
screen out, size changes follow the window) or a plain exec (output streamed
to stdout and stderr, stdin forwarded on request).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import anyio

from ._common import exit_status

if TYPE_CHECKING:
    from ..runtime import (
        ExecHandle,
        PtySession,
        RemoteExecHandle,
        RemotePtySession,
        RemoteSandbox,
        Sandbox,
    )

__all__ = ["run_command", "run_terminal", "terminal_size"]

_READ_SIZE = 64 * 1024


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of this process's terminal; 24x80 when there is none.

    The terminal itself first, as ssh asks it: ``shutil.get_terminal_size``
    prefers $LINES/$COLUMNS, which an outer program (pytest, a CI runner) may
    have exported for a different terminal.
    """
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    fallback = shutil.get_terminal_size((80, 24))
    return max(1, fallback.lines), max(1, fallback.columns)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The local terminal in raw mode (keys reach the guest as typed: Ctrl-C
    included), restored on the way out whatever happens.
    """
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keys typed ahead are kept
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def run_terminal(
    sandbox: Sandbox | RemoteSandbox,
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``argv`` on a guest pseudo-terminal attached to ours; its exit status."""
    rows, cols = terminal_size()
    term = os.environ.get("TERM")
    env = {**({"TERM": term} if term else {}), **(env or {})}
    session = await sandbox.pty(argv[0], argv[1:], rows=rows, cols=cols, cwd=cwd, env=env)
    async with session:
        in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
        sys.stdout.flush()
        with _raw(in_fd):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_keys, session, in_fd)
                tg.start_soon(_window, session)
                while data := await session.read():
                    _write_all(out_fd, data)
                tg.cancel_scope.cancel()
        code = await session.wait()
    return exit_status(code)


async def _keys(session: PtySession | RemotePtySession, fd: int) -> None:
    os.set_blocking(fd, False)
    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if not data:
                # Our input (a pipe, a file) ended: type the terminal's end of
                # file, so a shell reading it exits as it would at a keyboard.
                await session.write(b"\x04")
                return
            await session.write(data)
    finally:
        os.set_blocking(fd, True)


async def _window(session: PtySession | RemotePtySession) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            await session.resize(*terminal_size())


async def run_command(
    sandbox: Sandbox | RemoteSandbox,
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    stdin: bool = False,
) -> int:
    """Run ``argv`` without a terminal, its output streamed to ours as it comes;
    with ``stdin`` our input is forwarded. Its exit status.
    """
    from ..runtime import Exited, Stderr, Stdout

    handle = await sandbox.exec_stream(argv[0], argv[1:], cwd=cwd, env=env, stdin=stdin)
    status = 0
    async with handle, anyio.create_task_group() as tg:
        if stdin:
            tg.start_soon(_feed, handle, sys.stdin.fileno())
        async for event in handle:
            if isinstance(event, Stdout):
                _write_all(sys.stdout.fileno(), event.data)
            elif isinstance(event, Stderr):
                _write_all(sys.stderr.fileno(), event.data)
            elif isinstance(event, Exited):
                if event.timed_out:
                    print("microsandbox: the command ran past its timeout", file=sys.stderr)
                code = event.exit_code
                status = exit_status(-(event.term_signal or 0) if code is None else code)
        tg.cancel_scope.cancel()
    return status


async def _feed(handle: ExecHandle | RemoteExecHandle, fd: int) -> None:
    while data := await anyio.to_thread.run_sync(os.read, fd, _READ_SIZE, abandon_on_cancel=True):
        await handle.write_stdin(data)
    await handle.close_stdin()
