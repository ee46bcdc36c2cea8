"""Where pytest-microsandbox keeps its cache (kernel, agent, images, templates)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import platformdirs

__all__ = ["CACHE_DIR_ENV", "RUN_ROOT_PREFIX", "cache_dir", "make_run_dir", "run_root"]

#: Per-process directories for VM sockets and consoles: ``<tmp>/msb-run-<pid>``.
RUN_ROOT_PREFIX = "msb-run-"

_run_root_lock = threading.Lock()
_run_root: tuple[int, Path] | None = None

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


def run_root() -> Path:
    """This process's directory for VM run dirs (created on first use).

    Named after the pid, so run dirs of an owner that was SIGKILLed (its QEMUs
    die with it through pdeathsig) are found and removed by the next process
    that starts a VM; removed at exit.
    """
    global _run_root
    with _run_root_lock:
        if _run_root is not None and _run_root[0] == os.getpid():
            return _run_root[1]
        base = Path(tempfile.gettempdir())
        _sweep_stale(base)
        path = base / f"{RUN_ROOT_PREFIX}{os.getpid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        _run_root = (os.getpid(), path)
        atexit.register(_remove_run_root, os.getpid(), path)
        return path


def make_run_dir(name: str) -> Path:
    """A fresh private run dir for one VM (short: unix socket paths max 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=f"{name[:24]}-", dir=run_root()))


def _sweep_stale(base: Path) -> None:
    for entry in base.glob(f"{RUN_ROOT_PREFIX}*"):
        pid = entry.name[len(RUN_ROOT_PREFIX) :]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def _remove_run_root(pid: int, path: Path) -> None:
    if pid == os.getpid():
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
