"""Helpers shared by the caches that evict by last use (images, initramfs).

Both must spare what snapshot entries boot from, so both read the snapshot
store's ``meta.json`` files, raw: the snapshots package imports the runtime,
so the runtime must not import it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FileId", "SnapshotEntryRef", "file_id", "snapshot_entries"]

#: Named entries with this prefix are zygotes: rebuilt when a file they boot
#: from is missing (``check_entry`` fails), like templates, so they pin nothing.
_ZYGOTE_PREFIX = "zygote-"

FileId = tuple[int, int]  # (st_dev, st_ino)


def file_id(path: str | Path) -> FileId | None:
    """``(st_dev, st_ino)`` of ``path`` (symlinks followed), None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class SnapshotEntryRef:
    """One entry of the snapshot store, as the caches below it need to know it."""

    meta: dict[str, Any]  # its meta.json, unvalidated
    last_used: float  # its directory's mtime, touched on every restore
    pins: bool  # a named user snapshot: what it boots from cannot be rebuilt


def snapshot_entries(cache: Path) -> Iterator[SnapshotEntryRef]:
    """The template and named entries under ``<cache>/snapshots``.

    Layout as in ``snapshots/_store.py``: ``<cache>/snapshots/{templates,named}/
    <entry>/meta.json``; ``.tmp-*`` directories are builds or removals in
    progress. Entries removed meanwhile or broken (``check_entry`` refuses
    them anyway) are skipped.
    """
    for kind in ("templates", "named"):
        try:
            entries = list(os.scandir(cache / "snapshots" / kind))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(".lock"):
                continue
            try:
                last_used = entry.stat().st_mtime
                meta = json.loads((Path(entry.path) / "meta.json").read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict):
                pins = kind == "named" and not entry.name.startswith(_ZYGOTE_PREFIX)
                yield SnapshotEntryRef(meta=meta, last_used=last_used, pins=pins)
