"""pytest-microsandbox: run tests in microVMs.

The names below are imported lazily, so ``import pytest_microsandbox`` stays
cheap (it runs inside guests under emulation too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._extensions import install_extensions
from ._lazy import lazy_attributes

if TYPE_CHECKING:
    from .plugin import SandboxFactory
    from .runtime import (
        ExecOutput,
        Sandbox,
        SandboxConfig,
        SandboxError,
        SyncSandbox,
    )
    from .snapshots import Snapshot

__all__ = [
    "ExecOutput",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxFactory",
    "Snapshot",
    "SyncSandbox",
]

_WHERE = {
    "ExecOutput": ".runtime",
    "Sandbox": ".runtime",
    "SandboxConfig": ".runtime",
    "SandboxError": ".runtime",
    "SandboxFactory": ".plugin",
    "Snapshot": ".snapshots",
    "SyncSandbox": ".runtime",
}


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, globals(), __all__)


def _extensions() -> Any:
    """The layers above the runtime, plugged into it (``runtime/provision.py``):
    imported when the first sandbox needs them, not with this package.
    """
    from .runtime.provision import Extensions
    from .snapshots import SnapshotService, TemplateProvisioner

    return Extensions(templates=TemplateProvisioner(), snapshots=SnapshotService())


install_extensions(_extensions)
