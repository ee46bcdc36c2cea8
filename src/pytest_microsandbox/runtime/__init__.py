"""The VM engine of pytest-microsandbox, usable without pytest.

Async API: :class:`Sandbox`; blocking twin: :class:`SyncSandbox`.
"""

from __future__ import annotations

from ._exceptions import (
    AgentBuildError,
    BackendUnavailableError,
    BootError,
    CommandNotFoundError,
    ConfigError,
    ExecError,
    ExecTimeoutError,
    FilesystemError,
    GuestCrashedError,
    GuestTimeoutError,
    ImageError,
    KernelNotFoundError,
    PathNotFoundError,
    ProtocolError,
    SandboxError,
    SandboxNotRunningError,
    SnapshotError,
    SnapshotLockTimeoutError,
    SnapshotNotFoundError,
)
from .agent.results import DirEntry, Exited, FileKind, FileStat, Started, Stderr, Stdout
from .boot import boot_identity
from .config import SandboxConfig, Volume
from .sandbox import ExecHandle, ExecOutput, Sandbox, SandboxFs, SandboxMetrics
from .sync import SyncExecHandle, SyncSandbox, SyncSandboxFs

__all__ = [
    "AgentBuildError",
    "BackendUnavailableError",
    "BootError",
    "CommandNotFoundError",
    "ConfigError",
    "DirEntry",
    "ExecError",
    "ExecHandle",
    "ExecOutput",
    "ExecTimeoutError",
    "Exited",
    "FileKind",
    "FileStat",
    "FilesystemError",
    "GuestCrashedError",
    "GuestTimeoutError",
    "ImageError",
    "KernelNotFoundError",
    "PathNotFoundError",
    "ProtocolError",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxFs",
    "SandboxMetrics",
    "SandboxNotRunningError",
    "SnapshotError",
    "SnapshotLockTimeoutError",
    "SnapshotNotFoundError",
    "Started",
    "Stderr",
    "Stdout",
    "SyncExecHandle",
    "SyncSandbox",
    "SyncSandboxFs",
    "Volume",
    "boot_identity",
]
