"""The VM engine of pytest-microsandbox, usable without pytest.

Async API: :class:`Sandbox`; blocking twin: :class:`SyncSandbox`.

The exceptions are imported at once, every other name on first use: the
pytest header and ``microsandbox-doctor`` need a few light modules
(``paths``, ``kernel``, ``accel``), not pydantic and the whole engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from ._exceptions import (
    AgentBuildError,
    BackendUnavailableError,
    BootError,
    CommandNotFoundError,
    ConfigError,
    CopyLimitError,
    ExecError,
    ExecTimeoutError,
    FilesystemError,
    GuestCrashedError,
    GuestTimeoutError,
    ImageError,
    KernelNotFoundError,
    LockTimeoutError,
    OutputLimitError,
    PathNotFoundError,
    ProtocolError,
    SandboxError,
    SandboxNotRunningError,
    SnapshotError,
    SnapshotLockTimeoutError,
    SnapshotNotFoundError,
    UnsafeHostPathError,
)

if TYPE_CHECKING:
    from .agent.results import DirEntry, Exited, FileKind, FileStat, Started, Stderr, Stdout
    from .boot import boot_identity
    from .config import SandboxConfig, Volume
    from .network import NetworkEvent, NetworkPolicy, Rule, Secret
    from .sandbox import ExecHandle, ExecOutput, Sandbox, SandboxFs, SandboxMetrics
    from .sync import SyncExecHandle, SyncSandbox, SyncSandboxFs

__all__ = [
    "AgentBuildError",
    "BackendUnavailableError",
    "BootError",
    "CommandNotFoundError",
    "ConfigError",
    "CopyLimitError",
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
    "LockTimeoutError",
    "NetworkEvent",
    "NetworkPolicy",
    "OutputLimitError",
    "PathNotFoundError",
    "ProtocolError",
    "Rule",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxFs",
    "SandboxMetrics",
    "SandboxNotRunningError",
    "Secret",
    "SnapshotError",
    "SnapshotLockTimeoutError",
    "SnapshotNotFoundError",
    "Started",
    "Stderr",
    "Stdout",
    "SyncExecHandle",
    "SyncSandbox",
    "SyncSandboxFs",
    "UnsafeHostPathError",
    "Volume",
    "boot_identity",
]

_WHERE = {
    "DirEntry": ".agent.results",
    "ExecHandle": ".sandbox",
    "ExecOutput": ".sandbox",
    "Exited": ".agent.results",
    "FileKind": ".agent.results",
    "FileStat": ".agent.results",
    "NetworkEvent": ".network",
    "NetworkPolicy": ".network",
    "Rule": ".network",
    "Secret": ".network",
    "Sandbox": ".sandbox",
    "SandboxConfig": ".config",
    "SandboxFs": ".sandbox",
    "SandboxMetrics": ".sandbox",
    "Started": ".agent.results",
    "Stderr": ".agent.results",
    "Stdout": ".agent.results",
    "SyncExecHandle": ".sync",
    "SyncSandbox": ".sync",
    "SyncSandboxFs": ".sync",
    "Volume": ".config",
    "boot_identity": ".boot",
}


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, globals(), __all__)
