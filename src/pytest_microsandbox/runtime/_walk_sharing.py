"""Since when another process's walk of a host tree counts as fresh (see
:mod:`.images._walks`). A module of its own, free of imports, so that the
plugin can set it at every session start without importing the image code.
"""

from __future__ import annotations

import math
import os
import threading

__all__ = ["SHARE_WALKS_ENV", "share_walks_since", "walk_sharing_enabled", "walks_fresh_since"]

#: ``0``: every process of a run walks the venv and Python prefix itself.
SHARE_WALKS_ENV = "MICROSANDBOX_SHARE_WALKS"

_lock = threading.Lock()
_fresh_since: float | None = None


def share_walks_since(started: float | None) -> None:
    """Reuse walks that started (``time.time()``) at or after ``started``, and
    record this process's walks for the others; ``None`` (the default) turns
    sharing off.

    :raises ValueError: ``started`` is not a finite number.
    """
    if started is not None and not math.isfinite(started):
        raise ValueError(f"a walk freshness bound is a finite time, got {started!r}")
    global _fresh_since
    with _lock:
        _fresh_since = started


def walks_fresh_since() -> float | None:
    """The bound :func:`share_walks_since` set, or ``None`` (sharing off)."""
    with _lock:
        return _fresh_since


def walk_sharing_enabled() -> bool:
    """Whether ``$MICROSANDBOX_SHARE_WALKS`` leaves sharing on (anything but ``0``)."""
    return os.environ.get(SHARE_WALKS_ENV, "1").strip() != "0"
