"""The image cache: one erofs file per (layer source, digest), built once under a lock.

Two limits keep it bounded: at most :data:`KEEP_PER_SOURCE` images per family
(one layer source, e.g. one project directory), and a disk budget over all
families (``$MICROSANDBOX_IMAGE_BUDGET_MB``), because every *different* source
(every temporary project a test suite images) is a family of its own that the
first limit never removes. Both run after each build and evict by last use: an
image's digest record (``<image>.digest``) is touched whenever :func:`ensure_image`
hands it out, and a template, zygote or snapshot restore (which touches its
entry directory in ``<cache>/snapshots``) counts as a use of the images that
entry boots from.

Every image is checked against the SHA-256 recorded when it was built (see
:mod:`.._integrity`): one ``stat`` per use while its verified stamp holds, a
full hash when it does not. An image whose contents changed, or that has no
record (built by an older version), is rebuilt. The image file itself is never
touched after its build: that would change the stamp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._cache import GRACE_S, CacheEntry, CacheStore, PruneResult, snapshot_refs
from .._envvars import env_number
from .._exceptions import ImageError
from .._integrity import IntegrityMismatch, sha256_file, verify_file
from .._locks import cache_lock_timeout
from ..progress import stage

__all__ = [
    "DEFAULT_IMAGE_BUDGET_MB",
    "IMAGE_BUDGET_ENV",
    "KEEP_PER_SOURCE",
    "RECENT_USE_GRACE",
    "CachedImage",
    "ImagePruneResult",
    "cached_images",
    "ensure_image",
    "image_budget_bytes",
    "image_intact",
    "image_path",
    "logger",
    "prune_images",
    "usable_image",
    "verify_images",
]

logger = logging.getLogger("pytest_microsandbox.images")

#: Images kept per layer source (older ones are pruned after a new build).
#: More than one so that a VM or a worker still using the previous project
#: image keeps it while the next edit's image is built.
KEEP_PER_SOURCE = 3

#: Disk budget, in MiB, for all images together; the least recently used go
#: beyond it (never those in :data:`RECENT_USE_GRACE` or pinned by a named snapshot).
IMAGE_BUDGET_ENV = "MICROSANDBOX_IMAGE_BUDGET_MB"
DEFAULT_IMAGE_BUDGET_MB = 4096

#: Seconds after its last use during which an image is never evicted by the
#: budget: the cache-wide grace period (see :data:`.._cache.GRACE_S`).
RECENT_USE_GRACE = GRACE_S

_SUFFIX = ".erofs"

#: One final image in the cache, as :func:`prune_images` weighs it: its last use
#: is the latest of its own and the last restore of a snapshot entry using it;
#: ``pinned`` if a named (user) snapshot boots from it.
CachedImage = CacheEntry
#: What :func:`prune_images` did: the images it removed and the totals around it.
ImagePruneResult = PruneResult


def _store(images_dir: Path) -> CacheStore:
    return CacheStore(images_dir, f"*{_SUFFIX}", "cached image", logger=logger)


def image_path(images_dir: Path, family: str, digest: str) -> Path:
    """Where the image of ``family`` (one layer source) with ``digest`` lives."""
    return images_dir / f"{family}-{digest[:24]}{_SUFFIX}"


def image_budget_bytes() -> int:
    """The image disk budget: ``$MICROSANDBOX_IMAGE_BUDGET_MB`` MiB, default 4096.

    :raises ImageError: the variable is set to something other than a finite
        number >= 0 (naming the variable, so the user knows what to fix).
    """
    mib = env_number(
        IMAGE_BUDGET_ENV,
        DEFAULT_IMAGE_BUDGET_MB,
        ImageError,
        what="a number of MiB >= 0 (the disk budget of cached images; unset it for the "
        f"default {DEFAULT_IMAGE_BUDGET_MB})",
    )
    return int(mib * 2**20)


def ensure_image(
    images_dir: Path,
    family: str,
    digest: str,
    build: Callable[[Path], None],
    *,
    description: str,
) -> Path:
    """Return the cached image, building it with ``build(tmp_path)`` if absent.

    The build writes a temporary file in the same directory that is renamed
    over the final name only on success, so an interrupted build never looks
    like an image; leftovers are removed by the next build of the family
    (under the family's lock, so no builder can still own them). Returning an
    existing image marks it used (its digest record's mtime): eviction goes by
    last use, not by build. An existing image is checked against the digest
    recorded at its build (:func:`usable_image`); a corrupt or unrecorded one is
    rebuilt, once, under the family's lock.

    :raises ImageError: the build failed, or ``$MICROSANDBOX_IMAGE_BUDGET_MB`` is invalid.
    """
    final = image_path(images_dir, family, digest)
    if usable_image(final):  # fast path: no lock for the common case
        return final
    budget = image_budget_bytes()  # a bad value fails before a build, not after
    images_dir.mkdir(parents=True, exist_ok=True)
    store = _store(images_dir)
    # Deleted on release (see _locks): one lock file per family, every
    # temporary project a family of its own, would otherwise pile up. A
    # generous timeout: flock dies with its holder, and a /usr build is slow.
    lock = store.lock(family, f"the root image {family} ({description})")
    lock.acquire(timeout=cache_lock_timeout(1800))
    try:
        if store.usable(final, log=True):  # another process built it while we waited
            return final
        store.remove(final)  # corrupt or unrecorded (usable_image said why): rebuilt below
        # Under the family's lock every temporary of the family is a dead build's.
        store.sweep_temps(f"{family}-", locked=True, legacy=[f".{family}-*.tmp"])
        tmp = store.temp_path(f"{family}-{digest[:24]}")
        started = time.monotonic()
        try:
            with stage("layer", f"root layer {description}") as progress:
                build(tmp)
                progress.step("recording its digest")
                progress.size = tmp.stat().st_size
                store.publish_file(tmp, final, sha256_file(tmp))  # in the page cache still
        finally:
            tmp.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        size = final.stat().st_size
        logger.info(
            "built image %s (%s): %.2f s, %.1f MiB", final.name, description, elapsed, size / 2**20
        )
        # Only this family's lock is held: other families' builds and prunes (in
        # other processes) run concurrently, hence the tolerance of vanished files.
        _prune_family(store, family, keep=final)
        prune_images(images_dir, max_bytes=budget, keep=final)
    finally:
        lock.release(delete=True)
    return final


def image_intact(path: Path) -> bool:
    """Whether the image at ``path`` exists and matches its digest record (no
    use is marked). Hashes it only when its verified stamp no longer holds.
    """
    try:
        verify_file(path)
    except (FileNotFoundError, IntegrityMismatch):
        return False
    return True


def usable_image(path: Path, *, log: bool = False) -> bool:
    """Whether the image at ``path`` exists and matches its digest record; a
    usable one is marked used. Hashes it (a worker thread's time: callers run
    in one) only when its verified stamp no longer matches the file.

    ``log``: say why a present image is not usable (under the family lock,
    where it is about to be rebuilt; outside it, a build may be finishing).
    """
    return _store(path.parent).usable(path, log=log)


def verify_images(images_dir: Path) -> list[tuple[Path, str | None]]:
    """Hash every image in ``images_dir`` in full against its record (for a
    suspected disk problem: the stamp check on use does not see changes below
    the filesystem). Returns ``(path, problem or None)`` per image; a corrupt
    image is left in place and rebuilt on its next use.
    """
    out: list[tuple[Path, str | None]] = []
    for image in sorted(_store(images_dir).scan(), key=lambda i: i.path.name):
        try:
            verify_file(image.path, full=True)
        except FileNotFoundError:
            continue  # evicted meanwhile
        except IntegrityMismatch as exc:
            out.append((image.path, exc.reason))
        else:
            out.append((image.path, None))
    return out


def _prune_family(store: CacheStore, family: str, *, keep: Path) -> None:
    """Keep the :data:`KEEP_PER_SOURCE` most recently used images of ``family``.

    Images of named snapshots neither go nor count: an old project image is
    all a snapshot taken before the last few edits has to restore from. No
    grace period here: the images kept are the ones a VM or a worker may still
    use, and one that still has a pruned image open keeps reading it (unlink
    only drops the name).
    """
    mine = [i for i in cached_images(store.root) if i.path.name.startswith(f"{family}-")]
    result = store.prune(entries=mine, keep_recent=KEEP_PER_SOURCE, keep=[keep], grace=0.0)
    for old in result.removed:
        logger.debug("pruning old image %s", old.path.name)


def _disk_paths(meta: dict[str, Any]) -> list[str]:
    """The image paths a snapshot entry boots from (``disks[].path``); anything
    unexpected reads as no disks.
    """
    disks = meta.get("disks")
    if not isinstance(disks, list):
        return []
    return [d["path"] for d in disks if isinstance(d, dict) and isinstance(d.get("path"), str)]


def cached_images(images_dir: Path) -> list[CachedImage]:
    """The final images in ``images_dir`` with their size and last use.

    Only ``*.erofs`` names count: the ``.tmp-*`` files of builds in progress
    (in any process) and lock files are never considered. A restore of a
    snapshot entry booting from an image counts as a use of it; the images of
    named user snapshots are pinned (never auto-pruned, and not restorable
    without their images).
    """
    refs = snapshot_refs(images_dir.parent, _disk_paths)
    return _store(images_dir).scan(uses=refs.used, pins=refs.pinned)


def prune_images(
    images_dir: Path,
    *,
    max_bytes: int,
    keep: Path | None = None,
    now: float | None = None,
    grace: float = RECENT_USE_GRACE,
) -> ImagePruneResult:
    """Evict the least recently used images until all of them fit in ``max_bytes``.

    Never evicted: ``keep`` (the image just built), images used in the last
    ``grace`` seconds (another process may be about to open them), images
    pinned by a named snapshot. If those alone exceed the budget, they stay.
    Safe to run in several processes at once: files that vanish count as gone,
    and an image touched since the listing is spared. Also removes lock files
    nobody holds (left by versions that kept them), and digest records whose
    image is gone.
    """
    store = _store(images_dir)
    # Temporaries are swept under their family's lock only (ensure_image).
    store.sweep(temps=False)
    result = store.prune(
        entries=cached_images(images_dir),
        max_bytes=max_bytes,
        keep=() if keep is None else [keep],
        grace=grace,
        now=now,
    )
    for image in result.removed:
        logger.debug("evicted image %s (least recently used)", image.path.name)
    if result.removed:
        logger.info(
            "evicted %d least recently used images (%.1f MiB) to fit the image budget (%.0f MiB)",
            len(result.removed),
            sum(i.disk_bytes for i in result.removed) / 2**20,
            max_bytes / 2**20,
        )
    return result
