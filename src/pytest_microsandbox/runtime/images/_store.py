"""The image cache: one erofs file per (layer source, digest), built once under a lock."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

__all__ = ["KEEP_PER_SOURCE", "ensure_image", "image_path", "logger"]

logger = logging.getLogger("pytest_microsandbox.images")

#: Images kept per layer source (older ones are pruned after a new build).
#: More than one so that a VM or a worker still using the previous project
#: image keeps it while the next edit's image is built.
KEEP_PER_SOURCE = 3

_SUFFIX = ".erofs"
_TMP_SUFFIX = ".tmp"


def image_path(images_dir: Path, family: str, digest: str) -> Path:
    """Where the image of ``family`` (one layer source) with ``digest`` lives."""
    return images_dir / f"{family}-{digest[:24]}{_SUFFIX}"


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
    (under the family's lock, so no builder can still own them).
    """
    final = image_path(images_dir, family, digest)
    if final.exists():  # fast path: no lock for the common case
        return final
    images_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(os.fspath(images_dir / f"{family}.lock")):
        if final.exists():  # another process built it while we waited
            return final
        for stale in images_dir.glob(f".{family}-*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        tmp = (
            images_dir
            / f".{family}-{digest[:24]}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        )
        started = time.monotonic()
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        size = final.stat().st_size
        logger.info(
            "built image %s (%s): %.2f s, %.1f MiB", final.name, description, elapsed, size / 2**20
        )
        _prune(images_dir, family, keep=final)
    return final


def _prune(images_dir: Path, family: str, *, keep: Path) -> None:
    images = sorted(
        (p for p in images_dir.glob(f"{family}-*{_SUFFIX}") if p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    # A running VM that still has a pruned image open keeps reading it: unlink
    # only drops the name.
    for old in images[KEEP_PER_SOURCE - 1 :]:
        logger.debug("pruning old image %s", old.name)
        old.unlink(missing_ok=True)
