"""pytest-microsandbox: run tests in microVMs.

The names below are imported lazily, so ``import pytest_microsandbox`` stays
cheap (it runs inside guests under emulation too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fixtures import SandboxFactory
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
    "SandboxFactory": ".fixtures",
    "Snapshot": ".snapshots",
    "SyncSandbox": ".runtime",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_microsandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
