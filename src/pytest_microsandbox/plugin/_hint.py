"""Whether a run should start a VM before its collection (``HostRunner.prestart``).

A run cannot know, before it collects, whether it has ``process``-isolated
marked tests. A project whose last run served one from a live VM (the inner
loop: edit, run, edit, run) leaves a hint in the cache, a file named by a digest
of its root; a run of that project then restores the base VM and copies the
project in while pytest starts and collects. A run that finds no such test
drops the hint, so a project that stopped having them pays this at most once.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

__all__ = ["drop_live_hint", "has_live_hint", "write_live_hint"]


def _hint_path(root: Path | None, cache: Path | None) -> Path | None:
    if root is None:
        return None
    from ..runtime.paths import cache_dir

    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir(cache) / "hints" / f"live-{digest}"


def has_live_hint(root: Path | None, cache: Path | None) -> bool:
    """Whether the last run of the project at ``root`` served a test from a live VM."""
    path = _hint_path(root, cache)
    return path is not None and path.exists()


def write_live_hint(root: Path | None, cache: Path | None) -> None:
    """Record that a run of the project at ``root`` served a test from a live VM."""
    path = _hint_path(root, cache)
    if path is None or path.exists():
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def drop_live_hint(root: Path | None, cache: Path | None) -> None:
    """Forget the hint: a run of the project at ``root`` had no test to start for."""
    path = _hint_path(root, cache)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
