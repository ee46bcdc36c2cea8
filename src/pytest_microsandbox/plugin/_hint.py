"""Whether a run should start a VM before its collection (``HostRunner.prestart``).

A run cannot know, before it collects, whether it has ``process``-isolated
marked tests. A project whose last run served one from a live VM (the inner
loop: edit, run, edit, run) leaves a hint in the cache, a file named by a digest
of its root; a run of that project then restores the base VM and copies the
project in while pytest starts and collects. A run that finds no such test
drops the hint, so a project that stopped having them pays this at most once.
The hint holds the name of the base zygote that run used: its restore starts
at once, beside the digests that name the base (it is kept only if they name
the same one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "HINTS_MAX",
    "LIVE_ENV",
    "drop_live_hint",
    "has_live_hint",
    "live_enabled",
    "live_hint",
    "write_live_hint",
]

#: ``0``: snapshot a project's zygote before its first test even under process
#: isolation (the design before #16; kept to measure against).
LIVE_ENV = "MICROSANDBOX_LIVE_ZYGOTE"


def live_enabled() -> bool:
    """Whether ``_zygote.start_live`` may serve a project without snapshotting it."""
    return os.environ.get(LIVE_ENV, "1").strip() != "0"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_MAX = 128
#: Hints kept, newest first.
HINTS_MAX = 256


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


def live_hint(root: Path | None, cache: Path | None) -> str | None:
    """The base zygote's name the last run of the project at ``root`` used ("" if
    it did not say), or None without a hint.
    """
    path = _hint_path(root, cache)
    if path is None:
        return None
    try:
        text = path.read_text(errors="replace")[:_NAME_MAX]
    except OSError:
        return None
    return text if _NAME.fullmatch(text) else ""


def write_live_hint(root: Path | None, cache: Path | None, base: str = "") -> None:
    """Record that a run of the project at ``root`` served a test from a live VM
    restored from base zygote ``base``.
    """
    path = _hint_path(root, cache)
    if path is None:
        return
    with contextlib.suppress(OSError):
        if path.exists() and path.read_text(errors="replace") == base:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_text(base)
        partial.replace(path)
    _forget_oldest(path.parent)


def _forget_oldest(directory: Path) -> None:
    """Keep the :data:`HINTS_MAX` newest hints (one per project root ever run: temporary
    test projects would otherwise pile up).
    """
    with contextlib.suppress(OSError):
        hints = list(directory.glob("live-*"))
        if len(hints) <= HINTS_MAX:
            return
        for old in sorted(hints, key=_mtime)[: len(hints) - HINTS_MAX]:
            old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def drop_live_hint(root: Path | None, cache: Path | None) -> None:
    """Forget the hint: a run of the project at ``root`` had no test to start for."""
    path = _hint_path(root, cache)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
