"""What a sandbox can say about itself when a test fails: its last commands and
the guest kernel's messages since it started serving.

Everything here comes from the guest, so it is untrusted: each piece is capped
in size and cut down to printable characters before it reaches a report.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DIAGNOSTICS_TIMEOUT_S",
    "KERNEL_LINES",
    "KMSG_MAX_BYTES",
    "RECENT_EXECS",
    "RecentExecs",
    "kernel_messages_since",
    "printable",
]

#: Seconds :meth:`Sandbox.diagnostics` waits for the guest's kernel messages.
DIAGNOSTICS_TIMEOUT_S = 5.0
#: Commands a sandbox remembers for its diagnostics.
RECENT_EXECS = 5
#: Bytes of each remembered command's stderr kept (its end), and lines shown.
_STDERR_TAIL_BYTES = 2048
_STDERR_LINES = 12
#: A remembered command line is cut to this many characters.
_COMMAND_CHARS = 200
#: Guest kernel messages shown, and the characters kept of each.
KERNEL_LINES = 40
_LINE_CHARS = 300
#: Output of the guest's ``dmesg`` collected at most (its end is kept).
KMSG_MAX_BYTES = 256 * 1024

#: ``dmesg -r`` line: ``<6>[   12.345678] text`` (util-linux and busybox alike).
_KMSG_LINE = re.compile(r"^(?:<\d{1,4}>)?\[\s*(\d{1,9})\.(\d{1,9})\]\s?(.*)$")


def printable(text: str, max_chars: int | None = None) -> str:
    """``text`` without control characters (tabs become spaces), at most
    ``max_chars`` long (marked with an ellipsis when cut).
    """
    cleaned = "".join(ch if ch.isprintable() else " " if ch == "\t" else "" for ch in text)
    if max_chars is not None and len(cleaned) > max_chars:
        return cleaned[: max_chars - 1] + "…"
    return cleaned


@dataclass(frozen=True)
class _ExecRecord:
    command: str
    outcome: str
    stderr_tail: tuple[str, ...]


def _command_line(argv: Sequence[str]) -> str:
    return printable(" ".join(argv), _COMMAND_CHARS)


def _stderr_tail(stderr: bytes) -> tuple[str, ...]:
    text = stderr[-_STDERR_TAIL_BYTES:].decode("utf-8", "replace")
    lines = [printable(line, _LINE_CHARS) for line in text.splitlines()]
    return tuple(lines[-_STDERR_LINES:])


class RecentExecs:
    """A ring buffer of the last :data:`RECENT_EXECS` commands a sandbox ran:
    each one's command line, how it ended and the end of its stderr (bounded).
    """

    def __init__(self, size: int = RECENT_EXECS) -> None:
        self._records: deque[_ExecRecord] = deque(maxlen=size)

    def record(self, argv: Sequence[str], outcome: str, stderr: bytes = b"") -> None:
        self._records.append(_ExecRecord(_command_line(argv), outcome, _stderr_tail(stderr)))

    def __len__(self) -> int:
        return len(self._records)

    def render(self) -> str:
        """The commands, oldest first, each with its stderr's last lines."""
        if not self._records:
            return "recent commands: none"
        lines = [f"recent commands (the last {len(self._records)}, oldest first):"]
        for rec in self._records:
            lines.append(f"  $ {rec.command}  ->  {rec.outcome}")
            if rec.stderr_tail:
                lines.append("    stderr:")
                lines.extend(f"      {line}" for line in rec.stderr_tail)
        return "\n".join(lines)


def kernel_messages_since(dmesg_raw: bytes, since_s: float | None) -> list[str]:
    """The last :data:`KERNEL_LINES` messages of ``dmesg -r`` output stamped at or
    after ``since_s`` seconds of guest uptime (all of them for None), cleaned.
    Lines without a stamp continue the message before them.
    """
    text = dmesg_raw[-KMSG_MAX_BYTES:].decode("utf-8", "replace")
    kept: list[str] = []
    keeping = since_s is None
    for raw in text.splitlines():
        match = _KMSG_LINE.match(raw)
        if match is not None:
            seconds = float(f"{match.group(1)}.{match.group(2)}")
            keeping = since_s is None or seconds >= since_s
            line = f"[{seconds:12.6f}] {match.group(3)}"
        else:
            line = "  " + raw
        if keeping:
            kept.append(printable(line, _LINE_CHARS))
    return kept[-KERNEL_LINES:]
