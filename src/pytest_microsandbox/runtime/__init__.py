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
    ImageInUseError,
    ImageNotFoundError,
    ImagePlatformError,
    KernelNotFoundError,
    LockTimeoutError,
    OutputLimitError,
    PathNotFoundError,
    ProtocolError,
    RegistryAuthError,
    RegistryUnreachableError,
    SandboxDrainingError,
    SandboxError,
    SandboxExistsError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxPausedError,
    SnapshotError,
    SnapshotLockTimeoutError,
    SnapshotNotFoundError,
    UnsafeHostPathError,
)

if TYPE_CHECKING:
    from ._remote import RemoteSandbox, RemoteSandboxFs, SandboxHandle
    from ._remote_stream import RemoteExecHandle, RemotePtySession
    from ._state import SandboxStatus
    from .agent.results import DirEntry, Exited, FileKind, FileStat, Started, Stderr, Stdout
    from .boot import boot_identity
    from .config import Image, SandboxConfig, Volume
    from .images import ImageConfig, Patch, RegistryAuth, pull_image
    from .network import NetworkEvent, NetworkPolicy, Rule, Secret
    from .progress import BuildEvent, subscribe_progress
    from .pty import PtySession
    from .sandbox import ExecHandle, ExecOutput, Sandbox, SandboxFs, SandboxMetrics
    from .sync import (
        SyncExecHandle,
        SyncPtySession,
        SyncRemoteSandbox,
        SyncRemoteSandboxFs,
        SyncSandbox,
        SyncSandboxFs,
    )

__all__ = [
    "AgentBuildError",
    "BackendUnavailableError",
    "BootError",
    "BuildEvent",
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
    "Image",
    "ImageConfig",
    "ImageError",
    "ImageInUseError",
    "ImageNotFoundError",
    "ImagePlatformError",
    "KernelNotFoundError",
    "LockTimeoutError",
    "NetworkEvent",
    "NetworkPolicy",
    "OutputLimitError",
    "Patch",
    "PathNotFoundError",
    "ProtocolError",
    "PtySession",
    "RegistryAuth",
    "RegistryAuthError",
    "RegistryUnreachableError",
    "RemoteExecHandle",
    "RemotePtySession",
    "RemoteSandbox",
    "RemoteSandboxFs",
    "Rule",
    "Sandbox",
    "SandboxConfig",
    "SandboxDrainingError",
    "SandboxError",
    "SandboxExistsError",
    "SandboxFs",
    "SandboxHandle",
    "SandboxMetrics",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxPausedError",
    "SandboxStatus",
    "Secret",
    "SnapshotError",
    "SnapshotLockTimeoutError",
    "SnapshotNotFoundError",
    "Started",
    "Stderr",
    "Stdout",
    "SyncExecHandle",
    "SyncPtySession",
    "SyncRemoteSandbox",
    "SyncRemoteSandboxFs",
    "SyncSandbox",
    "SyncSandboxFs",
    "UnsafeHostPathError",
    "Volume",
    "boot_identity",
    "pull_image",
    "subscribe_progress",
]

_WHERE = {
    "DirEntry": ".agent.results",
    "ExecHandle": ".sandbox",
    "ExecOutput": ".sandbox",
    "Exited": ".agent.results",
    "FileKind": ".agent.results",
    "FileStat": ".agent.results",
    "PtySession": ".pty",
    "RemoteExecHandle": "._remote_stream",
    "RemotePtySession": "._remote_stream",
    "RemoteSandbox": "._remote",
    "RemoteSandboxFs": "._remote",
    "Image": ".config",
    "ImageConfig": ".images",
    "Patch": ".images",
    "RegistryAuth": ".images",
    "pull_image": ".images",
    "NetworkEvent": ".network",
    "NetworkPolicy": ".network",
    "Rule": ".network",
    "Secret": ".network",
    "Sandbox": ".sandbox",
    "SandboxHandle": "._remote",
    "SandboxStatus": "._state",
    "SyncRemoteSandbox": ".sync",
    "SyncRemoteSandboxFs": ".sync",
    "SandboxConfig": ".config",
    "SandboxFs": ".sandbox",
    "SandboxMetrics": ".sandbox",
    "Started": ".agent.results",
    "Stderr": ".agent.results",
    "Stdout": ".agent.results",
    "SyncExecHandle": ".sync",
    "SyncPtySession": ".sync",
    "SyncSandbox": ".sync",
    "SyncSandboxFs": ".sync",
    "Volume": ".config",
    "boot_identity": ".boot",
    "BuildEvent": ".progress",
    "subscribe_progress": ".progress",
}


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, globals(), __all__)
