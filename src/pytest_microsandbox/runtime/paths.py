"""Where pytest-microsandbox keeps its cache (kernel, agent, images, templates)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["CACHE_DIR_ENV", "cache_dir"]

#: Environment variable that moves the cache directory.
CACHE_DIR_ENV = "MICROSANDBOX_CACHE_DIR"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return (and create) the cache directory.

    Precedence: ``override``, then ``$MICROSANDBOX_CACHE_DIR``, then the user
    cache dir (``~/.cache/pytest-microsandbox`` on Linux).
    """
    raw = override or os.environ.get(CACHE_DIR_ENV)
    if raw:
        path = Path(raw).expanduser()
    else:
        path = Path(platformdirs.user_cache_dir("pytest-microsandbox"))
    path.mkdir(parents=True, exist_ok=True)
    return path
