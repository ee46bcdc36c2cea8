"""Plain data returned by :class:`~pytest_microsandbox.runtime.agent.client.AgentClient`."""

from __future__ import annotations

import enum
import stat as _stat
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "DirEntry",
    "ExecEvent",
    "ExecResult",
    "Exited",
    "FileKind",
    "FileStat",
    "GuestMetrics",
    "HelloInfo",
    "Started",
    "Stderr",
    "Stdout",
]


@dataclass(frozen=True)
class HelloInfo:
    """What the agent says about itself (READY and the HELLO reply)."""

    version: int
    agent_version: str
    uptime_ms: int


@dataclass(frozen=True)
class GuestMetrics:
    """A METRICS snapshot of the guest."""

    uptime_ms: int
    mem_total: int
    mem_available: int
    cpu_busy_ms: int
    cpu_idle_ms: int
    nprocs: int
    load1_milli: int

    @property
    def load1(self) -> float:
        """The 1-minute load average."""
        return self.load1_milli / 1000


class FileKind(enum.IntEnum):
    """The KIND field."""

    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    OTHER = 4


@dataclass(frozen=True)
class DirEntry:
    """One entry of a guest directory (names decoded UTF-8 with surrogateescape)."""

    name: str
    kind: FileKind
    size: int
    mode: int
    mtime_ns: int


@dataclass(frozen=True)
class FileStat:
    """Result of a guest ``stat``; ``mode`` is the full ``st_mode``."""

    kind: FileKind
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int

    @property
    def permissions(self) -> int:
        """The permission bits (``mode & 0o7777``)."""
        return _stat.S_IMODE(self.mode)

    @property
    def is_file(self) -> bool:
        """Whether this is a regular file."""
        return self.kind is FileKind.FILE

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return self.kind is FileKind.DIRECTORY


@dataclass(frozen=True)
class ExecResult:
    """How a guest command ended, with the output not consumed by event iteration.

    Exactly one of ``exit_code`` and ``term_signal`` is set. ``timed_out`` is
    true when the agent killed the command because its timeout passed; the
    layer above decides whether that is an error. ``stdout_truncated`` /
    ``stderr_truncated`` say that output past the collection limit was dropped.
    """

    pid: int
    exit_code: int | None
    term_signal: int | None
    timed_out: bool
    stdout: bytes = b""
    stderr: bytes = b""
    #: Output past the collection limit was dropped (``on_output_limit="truncate"``).
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def returncode(self) -> int:
        """``subprocess`` convention: the exit code, or minus the killing signal."""
        if self.exit_code is not None:
            return self.exit_code
        return -(self.term_signal or 0)

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0 in time."""
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class Started:
    """The command is running as ``pid`` (in the guest's PID namespace)."""

    pid: int


@dataclass(frozen=True)
class Stdout:
    """A chunk the command wrote to its stdout."""

    data: bytes


@dataclass(frozen=True)
class Stderr:
    """A chunk the command wrote to its stderr."""

    data: bytes


@dataclass(frozen=True)
class Exited:
    """The command ended; its output has all been delivered before this event."""

    exit_code: int | None
    term_signal: int | None
    timed_out: bool


#: Events of :meth:`ExecProcess.events`, in the order the guest sent them.
ExecEvent: TypeAlias = Started | Stdout | Stderr | Exited
