"""A program run on a pseudo-terminal of the test, as a person at a terminal
would run it: its controlling terminal, a size, keys typed, the screen read.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence


class Terminal:
    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], rows: int = 24, cols: int = 80
    ) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, cols)

        def controlling_terminal() -> None:  # in the child, after setsid
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            list(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(env),
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        self.screen = b""

    def resize(self, rows: int, cols: int) -> None:
        # The kernel sends SIGWINCH to the terminal's foreground process group.
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 120) -> bytes:
        """Read until ``needle`` appears after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while needle not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not self._readable(0)):
                raise AssertionError(f"{needle!r} not seen; the screen:\n{self.screen!r}")
            if self._readable(min(left, 1.0)):
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the program and its children closed the terminal
                    raise AssertionError(
                        f"{needle!r} not seen before the end; the screen:\n{self.screen!r}"
                    ) from None
        seen, _, self.screen = self.screen.partition(needle)
        return seen + needle

    def _readable(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
