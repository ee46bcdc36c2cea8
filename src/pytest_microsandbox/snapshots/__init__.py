"""Snapshot-backed sandboxes: templates built once per configuration, copy-on-write
clones, named snapshots of running sandboxes, forks, and a pool of pre-started
QEMUs so a restore pays only the state load and the first command.

``Sandbox.create`` uses templates on its own; this package adds the store API.
"""

from __future__ import annotations

from ._engine import (
    LOCK_TIMEOUT_ENV,
    POOL_SIZE_ENV,
    close_pools,
    ensure_template,
    fork_sandbox,
    restore_snapshot,
    snapshot_sandbox,
    template_key,
)
from ._model import SnapshotMeta
from ._store import SnapshotInfo, get_snapshot, list_snapshots, prune, remove_snapshot

__all__ = [
    "LOCK_TIMEOUT_ENV",
    "POOL_SIZE_ENV",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotMeta",
    "close_pools",
    "ensure_template",
    "fork_sandbox",
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
