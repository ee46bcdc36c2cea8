"""Helpers shared by the caches that evict by last use (images, initramfs)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["touch_used"]


def touch_used(path: Path) -> bool:
    """Mark ``path`` used (mtime = now); whether it exists.

    One ``utime`` call doubles as the existence check of a cache's fast path.
    A cache shared read-only with this user cannot be touched: it still counts.
    """
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        return path.exists()
    return True
