"""Named volumes: one ext4 disk image per name in ``<cache>/volumes/<name>/``.

The quota is the disk's size, enforced by the guest's own file system (a full
volume gives the guest ENOSPC; the host file never grows past it). The guest
reaches the image through a 9p share of its directory and mounts it on a loop
device, so a volume needs no device of its own in a template. One sandbox at
a time: a sandbox holds the volume's lock file (``flock``) while it runs, as
two guests writing one ext4 image would corrupt it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ._exceptions import ConfigError, FilesystemError
from .paths import cache_dir as default_cache_dir

__all__ = [
    "DISK_NAME",
    "NamedVolumeInfo",
    "create_named_volume",
    "list_named_volumes",
    "lock_named_volume",
    "remove_named_volume",
    "volumes_dir",
]

DISK_NAME = "disk.ext4"
_META = "volume.json"
_LOCK = "lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MIN_QUOTA_MB = 8
_MAX_QUOTA_MB = 1 << 20


@dataclass(frozen=True)
class NamedVolumeInfo:
    """A named volume on disk: its quota, the bytes its image occupies, its last use."""

    name: str
    path: Path
    quota_mb: int
    disk_bytes: int
    last_used: float


def volumes_dir(cache_dir: Path | None = None) -> Path:
    """``<cache>/volumes``."""
    return default_cache_dir(cache_dir) / "volumes"


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"volume name {name!r} is not valid: 1-63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


def _read_meta(path: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def create_named_volume(name: str, quota_mb: int, cache_dir: Path | None = None) -> Path:
    """Return the directory of volume ``name``, creating its disk image if needed.

    :raises ConfigError: bad name or quota, or the volume exists with another quota.
    :raises FilesystemError: ``mkfs.ext4`` is missing or failed.
    """
    _check_name(name)
    if not _MIN_QUOTA_MB <= quota_mb <= _MAX_QUOTA_MB:
        raise ConfigError(
            f"volume {name!r}: quota_mb={quota_mb} is outside {_MIN_QUOTA_MB}..{_MAX_QUOTA_MB}"
        )
    root = volumes_dir(cache_dir)
    path = root / name
    meta = _read_meta(path)
    if meta is not None and (path / DISK_NAME).is_file():
        if meta.get("quota_mb") != quota_mb:
            raise ConfigError(
                f"volume {name!r} exists with quota_mb={meta.get('quota_mb')}, not {quota_mb}: "
                f"use that quota, or remove it first (Volume.remove({name!r})) to lose its data"
            )
        return path
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mkfs is None:
        raise FilesystemError("mkfs.ext4 not found: apt-get install e2fsprogs")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    try:
        disk = tmp / DISK_NAME
        with tempfile.TemporaryDirectory() as content:
            os.chmod(content, 0o1777)  # any guest user may write at the volume's top
            proc = subprocess.run(
                [mkfs, "-q", "-F", "-t", "ext4", "-m", "0", "-d", content, os.fspath(disk),
                 f"{quota_mb}M"],
                capture_output=True,
                text=True,
                check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            raise FilesystemError(
                f"creating volume {name!r}: mkfs.ext4 failed: {proc.stderr.strip()[-500:]}; "
                "free disk space in the cache directory and try again"
            )
        (tmp / _META).write_text(json.dumps({"name": name, "quota_mb": quota_mb}))
        (tmp / _LOCK).touch()
        try:
            os.rename(tmp, path)
        except OSError:
            if _read_meta(path) is None:  # not another process's volume of the same name
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _apply_volume_budget(cache_dir, keep=name)
    return create_named_volume(name, quota_mb, cache_dir)


def _apply_volume_budget(cache_dir: Path | None, keep: str) -> None:
    """``$MICROSANDBOX_VOLUME_BUDGET_MB``, when set: oldest unused volumes go."""
    raw = os.environ.get("MICROSANDBOX_VOLUME_BUDGET_MB", "").strip()
    if not raw:
        return
    try:
        budget = int(float(raw) * 2**20)
    except ValueError:
        raise ConfigError(
            f"$MICROSANDBOX_VOLUME_BUDGET_MB={raw!r} is not a number of MiB; fix or unset it"
        ) from None
    volumes = sorted(list_named_volumes(cache_dir), key=lambda v: v.last_used)
    total = sum(v.disk_bytes for v in volumes)
    for volume in volumes:
        if total <= budget:
            break
        if volume.name == keep:
            continue
        try:
            remove_named_volume(volume.name, cache_dir)
        except FilesystemError:
            continue
        total -= volume.disk_bytes


def lock_named_volume(path: Path) -> int:
    """Take volume ``path``'s lock for a sandbox's lifetime; return the fd to close.

    :raises FilesystemError: another sandbox (in any process) uses the volume.
    """
    fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FilesystemError(
            f"volume {path.name!r} is in use by another sandbox: a named volume is mounted "
            "by one sandbox at a time; stop that one first or use another volume"
        ) from None
    os.utime(path / _META, None)  # last use, for pruning
    return fd


def list_named_volumes(cache_dir: Path | None = None) -> list[NamedVolumeInfo]:
    """Every named volume, by name."""
    root = volumes_dir(cache_dir)
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        meta = _read_meta(path)
        if meta is None or path.name.startswith("."):
            continue
        quota = meta.get("quota_mb")
        try:
            st = (path / DISK_NAME).stat()
            last = (path / _META).stat().st_mtime
        except OSError:
            continue
        out.append(
            NamedVolumeInfo(
                path.name, path, quota if isinstance(quota, int) else 0, st.st_blocks * 512, last
            )
        )
    return out


def remove_named_volume(name: str, cache_dir: Path | None = None) -> bool:
    """Delete volume ``name`` and its data; False if there was none.

    :raises FilesystemError: a sandbox uses it.
    """
    _check_name(name)
    path = volumes_dir(cache_dir) / name
    if _read_meta(path) is None:
        return False
    fd = lock_named_volume(path)
    try:
        doomed = path.with_name(f".rm-{name}-{time.monotonic_ns()}")
        os.rename(path, doomed)
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    return True
