"""Budgets for what images and volumes keep on disk beyond the erofs layers.

- The OCI store (``<cache>/oci``: pulled and imported blobs) has a byte budget,
  ``$MICROSANDBOX_OCI_BUDGET_MB`` (default 4096), applied after each pull:
  whole images (pins) go, least recently used first, then every blob no
  remaining pin reaches. A pin is used whenever an image is resolved through
  it; one used in the last :data:`.._cache.GRACE_S` seconds is never evicted.
  The erofs layers built from the blobs are in ``<cache>/images`` under the
  image budget (``$MICROSANDBOX_IMAGE_BUDGET_MB``) like every other layer.
- Named volumes hold user data: nothing is evicted unless asked.
  :func:`prune_volumes` removes the least recently used (never one a sandbox
  holds) by age or to fit a byte budget; ``$MICROSANDBOX_VOLUME_BUDGET_MB``,
  when set, is applied whenever a volume is created.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .._cache import GRACE_S
from .._envvars import env_number
from .._exceptions import FilesystemError, ImageError
from .._named_volumes import list_named_volumes, remove_named_volume
from ._oci import _blob_path, _is_index, oci_dir

__all__ = [
    "OCI_BUDGET_ENV",
    "VOLUME_BUDGET_ENV",
    "PruneSummary",
    "oci_budget_bytes",
    "prune_oci_store",
    "prune_volumes",
]

logger = logging.getLogger("pytest_microsandbox.images")

OCI_BUDGET_ENV = "MICROSANDBOX_OCI_BUDGET_MB"
DEFAULT_OCI_BUDGET_MB = 4096
VOLUME_BUDGET_ENV = "MICROSANDBOX_VOLUME_BUDGET_MB"


@dataclass(frozen=True)
class PruneSummary:
    """What a prune removed (names: pins or volumes) and the bytes freed."""

    removed: tuple[str, ...]
    freed_bytes: int


def oci_budget_bytes() -> int:
    """``$MICROSANDBOX_OCI_BUDGET_MB`` in bytes (default 4096 MiB).

    :raises ImageError: the variable is not a number >= 0.
    """
    mib = env_number(
        OCI_BUDGET_ENV,
        DEFAULT_OCI_BUDGET_MB,
        ImageError,
        what="a number of MiB >= 0 (the disk budget of pulled OCI blobs)",
    )
    return int(mib * 2**20)


def _referenced(store: Path, digest: str) -> set[str]:
    """The blobs an image (manifest or index) reaches, itself included."""
    out = {digest}
    try:
        doc = json.loads(_blob_path(store, digest).read_bytes())
    except (OSError, ValueError, ImageError):
        return out
    if not isinstance(doc, dict):
        return out
    if _is_index(doc):
        for entry in doc.get("manifests") or []:
            if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
                out |= _referenced(store, entry["digest"])
        return out
    for desc in [doc.get("config"), *(doc.get("layers") or [])]:
        if isinstance(desc, dict) and isinstance(desc.get("digest"), str):
            out.add(desc["digest"])
    return out


def prune_oci_store(
    cache_dir: Path | None = None,
    *,
    max_bytes: int | None = None,
    now: float | None = None,
    grace: float = GRACE_S,
) -> PruneSummary:
    """Fit the OCI blob store in ``max_bytes`` (default: the env budget)."""
    store = oci_dir(cache_dir)
    blobs_dir = store / "blobs" / "sha256"
    if not blobs_dir.is_dir():
        return PruneSummary((), 0)
    budget = oci_budget_bytes() if max_bytes is None else max_bytes
    now = time.time() if now is None else now
    for leftover in (*blobs_dir.glob(".tmp-*"), *store.glob(".layout-*")):
        # Downloads and imports killed halfway; a day is far past any live one.
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > 86400:
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
    sizes = {}
    for blob in blobs_dir.iterdir():
        if not blob.name.startswith("."):
            try:
                sizes[f"sha256:{blob.name}"] = blob.stat().st_size
            except OSError:
                continue
    if sum(sizes.values()) <= budget:
        return PruneSummary((), 0)
    pins: list[tuple[float, Path, set[str]]] = []
    for pin in (store / "pins").glob("*.json") if (store / "pins").is_dir() else []:
        try:
            digest = json.loads(pin.read_text())["digest"]
            pins.append((pin.stat().st_mtime, pin, _referenced(store, str(digest))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    pins.sort(key=lambda p: p[0])
    removed: list[str] = []
    for used, pin, _refs in pins:
        live = set().union(*(refs for _, p, refs in pins if p.exists()))
        if sum(size for d, size in sizes.items() if d in live) <= budget:
            break
        if now - used < grace:
            continue
        pin.unlink(missing_ok=True)
        removed.append(pin.name)
    live = set().union(*(refs for _, p, refs in pins if p.exists()))
    freed = 0
    for digest, size in sizes.items():
        if digest not in live:
            try:
                path = _blob_path(store, digest)
                if now - path.stat().st_mtime < grace:
                    continue  # a pull in progress may be about to pin it
                path.unlink()
                freed += size
            except OSError:
                continue
    if removed or freed:
        logger.info(
            "pruned %d pulled images (%.1f MiB) to fit the OCI budget (%.0f MiB)",
            len(removed),
            freed / 2**20,
            budget / 2**20,
        )
    return PruneSummary(tuple(removed), freed)


def prune_volumes(
    cache_dir: Path | None = None,
    *,
    max_bytes: int | None = None,
    older_than_s: float | None = None,
    now: float | None = None,
) -> PruneSummary:
    """Remove named volumes unused for ``older_than_s`` seconds, then the least
    recently used until the rest fit in ``max_bytes``. Volumes in use are kept.
    """
    now = time.time() if now is None else now
    volumes = sorted(list_named_volumes(cache_dir), key=lambda v: v.last_used)
    total = sum(v.disk_bytes for v in volumes)
    removed: list[str] = []
    freed = 0
    for volume in volumes:
        too_old = older_than_s is not None and now - volume.last_used > older_than_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        try:
            remove_named_volume(volume.name, cache_dir)
        except FilesystemError:
            continue  # in use
        removed.append(volume.name)
        freed += volume.disk_bytes
        total -= volume.disk_bytes
    return PruneSummary(tuple(removed), freed)
