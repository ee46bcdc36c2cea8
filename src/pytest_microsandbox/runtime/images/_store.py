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
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._cachefiles import FileId, file_id, snapshot_entries
from .._envvars import env_number
from .._exceptions import ImageError
from .._integrity import (
    DIGEST_SUFFIX,
    IntegrityMismatch,
    last_used,
    mark_used,
    record_digest,
    remove_record,
    sha256_file,
    verify_file,
)
from .._locks import cache_lock, cache_lock_timeout, remove_idle_lock_files

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

#: Seconds after its last use during which an image is never evicted: a VM or
#: a build in another process may be about to open it (one that already has it
#: open keeps reading it after an unlink, one about to open it would fail).
#: Much longer than ``_resolve.STABLE_LAYER_TTL`` (60 s), the time a process
#: reuses a layer it resolved without calling :func:`ensure_image` again.
RECENT_USE_GRACE = 600.0

_SUFFIX = ".erofs"
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class CachedImage:
    """One final image in the cache, as :func:`prune_images` weighs it."""

    path: Path
    #: Blocks actually allocated (``st_blocks * 512``).
    disk_bytes: int
    #: Latest of the image's mtime and the last restore of a snapshot entry using it.
    last_used: float
    #: Referenced by a named (user) snapshot: never evicted automatically.
    pinned: bool


@dataclass(frozen=True)
class ImagePruneResult:
    """What :func:`prune_images` did: the images it removed and the totals around it."""

    removed: tuple[CachedImage, ...]
    bytes_before: int
    bytes_after: int


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
    # Deleted on release (see _locks): one lock file per family, every
    # temporary project a family of its own, would otherwise pile up. A
    # generous timeout: flock dies with its holder, and a /usr build is slow.
    lock = cache_lock(images_dir / f"{family}.lock", f"the root image {family} ({description})")
    lock.acquire(timeout=cache_lock_timeout(1800))
    try:
        if usable_image(final, log=True):  # another process built it while we waited
            return final
        _unlink(final)  # corrupt or unrecorded (usable_image said why): rebuilt below
        for stale in images_dir.glob(f".{family}-*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        tmp = (
            images_dir
            / f".{family}-{digest[:24]}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        )
        started = time.monotonic()
        try:
            build(tmp)
            sha256 = sha256_file(tmp)  # in the page cache still: ~1.5 GB/s
            os.replace(tmp, final)
            record_digest(final, sha256)  # after the rename: it changes ctime
        finally:
            tmp.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        size = final.stat().st_size
        logger.info(
            "built image %s (%s): %.2f s, %.1f MiB", final.name, description, elapsed, size / 2**20
        )
        # Only this family's lock is held: other families' builds and prunes (in
        # other processes) run concurrently, hence the tolerance of vanished files.
        _prune_family(cached_images(images_dir), family, keep=final)
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
    try:
        verify_file(path)
    except FileNotFoundError:
        return False
    except IntegrityMismatch as exc:
        if log:
            logger.warning("cached image %s: %s; rebuilding it", path, exc.reason)
        return False
    mark_used(path)
    return True


def verify_images(images_dir: Path) -> list[tuple[Path, str | None]]:
    """Hash every image in ``images_dir`` in full against its record (for a
    suspected disk problem: the stamp check on use does not see changes below
    the filesystem). Returns ``(path, problem or None)`` per image; a corrupt
    image is left in place and rebuilt on its next use.
    """
    out: list[tuple[Path, str | None]] = []
    for image in sorted(cached_images(images_dir), key=lambda i: i.path.name):
        try:
            verify_file(image.path, full=True)
        except FileNotFoundError:
            continue  # evicted meanwhile
        except IntegrityMismatch as exc:
            out.append((image.path, exc.reason))
        else:
            out.append((image.path, None))
    return out


def _prune_family(images: Iterable[CachedImage], family: str, *, keep: Path) -> None:
    """Keep the :data:`KEEP_PER_SOURCE` most recently used images of ``family``.

    Images of named snapshots neither go nor count: an old project image is
    all a snapshot taken before the last few edits has to restore from.
    """
    mine = sorted(
        (
            i
            for i in images
            if i.path != keep and not i.pinned and i.path.name.startswith(f"{family}-")
        ),
        key=lambda i: i.last_used,
        reverse=True,
    )
    # A running VM that still has a pruned image open keeps reading it: unlink
    # only drops the name.
    for old in mine[KEEP_PER_SOURCE - 1 :]:
        logger.debug("pruning old image %s", old.path.name)
        _unlink(old.path)


def _unlink(path: Path) -> bool:
    """Delete ``path`` and its digest record; False if the image was not deleted
    (already gone, or not ours).
    """
    try:
        path.unlink()
    except FileNotFoundError:
        removed = False  # another process evicted it first
    except OSError as exc:
        logger.warning("cannot remove image %s: %s", path, exc)
        return False
    else:
        removed = True
    try:
        remove_record(path)
    except OSError as exc:
        logger.warning("cannot remove digest record of %s: %s", path, exc)
    return removed


def _disk_paths(meta: dict[str, Any]) -> list[str]:
    """The image paths a snapshot entry boots from (``disks[].path``); anything
    unexpected reads as no disks.
    """
    disks = meta.get("disks")
    if not isinstance(disks, list):
        return []
    return [d["path"] for d in disks if isinstance(d, dict) and isinstance(d.get("path"), str)]


def _snapshot_uses(cache: Path) -> tuple[dict[FileId, float], set[FileId]]:
    """For the images that snapshot entries boot from: the latest use of such an
    entry, and the images pinned by named user snapshots (never auto-pruned,
    and not restorable without their images).
    """
    used: dict[FileId, float] = {}
    pinned: set[FileId] = set()
    for entry in snapshot_entries(cache):
        for path in _disk_paths(entry.meta):
            key = file_id(path)
            if key is None:
                continue
            used[key] = max(used.get(key, entry.last_used), entry.last_used)
            if entry.pins:
                pinned.add(key)
    return used, pinned


def cached_images(images_dir: Path) -> list[CachedImage]:
    """The final images in ``images_dir`` with their size and last use.

    Only ``*.erofs`` names count: the ``.*.tmp`` files of builds in progress
    (in any process) and lock files are never considered.
    """
    uses, pinned = _snapshot_uses(images_dir.parent)
    out: list[CachedImage] = []
    try:
        entries = list(os.scandir(images_dir))
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(_SUFFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # evicted by another process since the listing
        key = (st.st_dev, st.st_ino)
        used = last_used(Path(entry.path), st)
        out.append(
            CachedImage(
                path=Path(entry.path),
                disk_bytes=st.st_blocks * 512,
                last_used=max(used, uses.get(key, used)),
                pinned=key in pinned,
            )
        )
    return out


def _remove_orphan_records(images_dir: Path) -> None:
    """Digest records whose image is gone (evicted by a version without records)."""
    for sidecar in images_dir.glob(f"*{_SUFFIX}{DIGEST_SUFFIX}"):
        image = sidecar.with_name(sidecar.name[: -len(DIGEST_SUFFIX)])
        if not image.exists():
            try:
                remove_record(image)
            except OSError:
                continue


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
    now = time.time() if now is None else now
    remove_idle_lock_files(images_dir.glob("*.lock"))
    _remove_orphan_records(images_dir)
    images = cached_images(images_dir)
    before = sum(i.disk_bytes for i in images)
    total = before
    removed: list[CachedImage] = []
    candidates = sorted(
        (i for i in images if i.path != keep and not i.pinned and now - i.last_used >= grace),
        key=lambda i: (i.last_used, i.path.name),
    )
    for image in candidates:
        if total <= max_bytes:
            break
        try:
            recent = now - last_used(image.path) < grace
        except FileNotFoundError:
            total -= image.disk_bytes  # evicted by another process
            continue
        if recent:
            continue  # handed out since we listed it
        if _unlink(image.path):
            logger.debug("evicted image %s (least recently used)", image.path.name)
            removed.append(image)
            total -= image.disk_bytes
        elif not image.path.exists():
            total -= image.disk_bytes
    if removed:
        logger.info(
            "evicted %d least recently used images (%.1f MiB) to fit the image budget (%.0f MiB)",
            len(removed),
            sum(i.disk_bytes for i in removed) / 2**20,
            max_bytes / 2**20,
        )
    return ImagePruneResult(removed=tuple(removed), bytes_before=before, bytes_after=total)
