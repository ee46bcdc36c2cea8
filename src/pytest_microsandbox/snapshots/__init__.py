"""Snapshot-backed sandboxes: templates built once per configuration, copy-on-write
clones, named snapshots of running sandboxes, forks, and a pool of pre-started
QEMUs so a restore pays only the state load and the first command.

It plugs into the runtime, which does not import it, as two extensions
(``runtime/provision.py``): :class:`TemplateProvisioner` (``Sandbox.create``
restores template clones) and :class:`SnapshotService` (``Sandbox.restore``,
``snapshot``, ``fork``); ``pytest_microsandbox/__init__.py`` installs them.
This package also offers the store API.
"""

from __future__ import annotations

from ._engine import (
    AUTO_PRUNE_GRACE_S,
    LOCK_TIMEOUT_ENV,
    POOL_MAX_ENV,
    POOL_MEMORY_ENV,
    POOL_SIZE_ENV,
    SnapshotService,
    TemplateProvisioner,
    auto_snapshot_budget_bytes,
    close_pools,
    ensure_template,
    expect_creates,
    fork_sandbox,
    prefill_pool,
    restore_snapshot,
    snapshot_sandbox,
    template_key,
)
from ._model import SnapshotMeta
from ._store import SnapshotInfo, get_snapshot, list_snapshots, prune, remove_snapshot
from ._usage import CacheUsage, KindUsage, cache_usage

__all__ = [
    "AUTO_PRUNE_GRACE_S",
    "LOCK_TIMEOUT_ENV",
    "POOL_MAX_ENV",
    "POOL_MEMORY_ENV",
    "POOL_SIZE_ENV",
    "CacheUsage",
    "KindUsage",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotMeta",
    "SnapshotService",
    "TemplateProvisioner",
    "auto_snapshot_budget_bytes",
    "cache_usage",
    "close_pools",
    "ensure_template",
    "expect_creates",
    "fork_sandbox",
    "prefill_pool",
    "restore_snapshot",
    "snapshot_sandbox",
    "template_key",
]


class Snapshot:
    """The snapshot store (names follow the issue: ``Snapshot.list/get/remove/prune``)."""

    list = staticmethod(list_snapshots)
    get = staticmethod(get_snapshot)
    remove = staticmethod(remove_snapshot)
    prune = staticmethod(prune)
