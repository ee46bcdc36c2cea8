"""Disk images (raw, qcow2, vmdk) as the guest's root.

The file is copied into the image cache once per version (keyed by its path,
size, mtime and inode; ``copy_file_range`` shares blocks where the file
system can), because templates record and check a digest of every disk they
boot from beside it, and nothing may be written beside the user's file.
QEMU opens the copy read-only (its block layer reads qcow2 and vmdk); the
guest mounts the file system read-only under the tmpfs overlay, so each
sandbox writes into its own copy-on-write upper layer and the user's file is
never written. ``qemu-img info`` checks the file first: a qcow2 with a backing file
or an external data file, or a vmdk whose extents are other files, would make
QEMU open host files the user did not name, so they are refused.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal, cast

from .._exceptions import ImageError
from .._keys import digest_parts
from ._model import Layer
from ._partitions import HEAD_BYTES, SECTOR, Partition, linux_partitions, pick_partition
from ._store import ensure_image

__all__ = ["DISK_FORMATS", "DISK_FSTYPES", "disk_layer"]

DISK_FORMATS = ("raw", "qcow2", "vmdk")
#: What the guest kernel mounts read-only from our initramfs modules.
DISK_FSTYPES = ("auto", "ext4", "ext3", "ext2", "erofs")

_EXT_MAGIC_OFFSET = 0x438
_EROFS_MAGIC_OFFSET = 1024


def _qemu_img_info(path: Path) -> dict[str, Any]:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise ImageError(
            "qemu-img not found: disk images are inspected with it before a boot; "
            "apt-get install qemu-utils"
        )
    proc = subprocess.run(
        [qemu_img, "info", "--output=json", os.fspath(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageError(f"qemu-img cannot read disk image {path}: {proc.stderr.strip()[-400:]}")
    try:
        info = json.loads(proc.stdout)
    except ValueError as exc:
        raise ImageError(f"qemu-img info of {path} is not JSON: {exc}") from exc
    return cast(dict[str, Any], info)


def _check_self_contained(path: Path, info: dict[str, Any]) -> None:
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(
            f"disk image {path} has a backing file ({info.get('backing-filename')}): refused, "
            "as QEMU would open that host file too; flatten it first "
            "(qemu-img convert -O qcow2 IN OUT)"
        )
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise ImageError(
            f"disk image {path} has an external data file: refused; flatten it first "
            "(qemu-img convert -O qcow2 IN OUT)"
        )
    for extent in data.get("extents") or []:
        name = extent.get("filename") if isinstance(extent, dict) else None
        if name is not None and Path(name).resolve() != path:
            raise ImageError(
                f"disk image {path} has an extent in another file ({name}): refused; "
                "convert it to one file (qemu-img convert -O qcow2 IN OUT)"
            )


def _copy(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)


def _sniff_head(head: bytes) -> str:
    """ext* or erofs from the superblock at the start of ``head``; "auto" if unknown."""
    if head[_EXT_MAGIC_OFFSET : _EXT_MAGIC_OFFSET + 2] == b"\x53\xef":
        return "ext4"
    if head[_EROFS_MAGIC_OFFSET : _EROFS_MAGIC_OFFSET + 4] == b"\xe2\xe1\xf5\xe0":
        return "erofs"
    return "auto"


def _sniff_fstype(path: Path) -> str:
    """ext* or erofs from a raw image's superblock; "auto" if unknown."""
    try:
        with open(path, "rb") as f:
            return _sniff_head(f.read(HEAD_BYTES))
    except OSError:
        return "auto"


def _read_head(path: Path, disk_format: str) -> bytes:
    """The disk's first :data:`HEAD_BYTES` as the guest would see them."""
    if disk_format == "raw":
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    with tempfile.TemporaryDirectory(prefix="msb-disk-head-") as tmp:
        out = Path(tmp) / "head"
        proc = subprocess.run(
            [
                "qemu-img", "dd", "-f", disk_format, "-O", "raw", f"bs={SECTOR}",
                f"count={HEAD_BYTES // SECTOR}", f"if={path}", f"of={out}",
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(f"qemu-img cannot read {path}: {proc.stderr.strip()[-400:]}")
        return out.read_bytes()


def _copy_partition(source: Path, disk_format: str, part: Partition, dest: Path) -> None:
    """The partition alone, as a sparse raw file (QEMU's raw driver with offset/size)."""
    inner: dict[str, Any] = {"driver": "file", "filename": os.fspath(source)}
    if disk_format != "raw":
        inner = {"driver": disk_format, "file": inner}
    spec = {"driver": "raw", "offset": part.offset, "size": part.size, "file": inner}
    proc = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), os.fspath(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageError(
            f"copying partition {part.number} of {source} failed: {proc.stderr.strip()[-400:]}"
        )


def disk_layer(
    path: Path,
    images: Path,
    *,
    fstype: str = "auto",
    disk_format: str | None = None,
    partition: int | None = None,
) -> Layer:
    """The layer for disk image ``path`` (its file system at the guest's ``/``).

    ``disk_format`` (raw, qcow2, vmdk) is detected by ``qemu-img`` when None;
    ``fstype`` ``auto`` reads the superblock, and otherwise lets the guest try
    ext4, then erofs. A disk with a partition table (MBR or GPT) and no file
    system at its start boots from its first Linux partition, or from
    ``partition`` (1-based) when given; that partition alone is copied into the
    cache (a sparse raw file cut out by QEMU's block layer).

    :raises ImageError: unreadable file, unsupported format or file system, a
        partition that does not exist, or an image that refers to other host files.
    """
    path = path.resolve()
    if fstype not in DISK_FSTYPES:
        raise ImageError(
            f"disk image {path}: fstype {fstype!r} is not supported "
            f"(one of {', '.join(DISK_FSTYPES)}); convert the image to ext4"
        )
    info = _qemu_img_info(path)
    detected = str(info.get("format", ""))
    chosen = disk_format or detected
    if chosen not in DISK_FORMATS:
        raise ImageError(
            f"disk image {path} is {detected!r}; supported formats are "
            f"{', '.join(DISK_FORMATS)} (qemu-img convert -O qcow2 IN OUT)"
        )
    if disk_format is not None and detected and detected != disk_format:
        raise ImageError(f"disk image {path} is {detected}, not {disk_format}: fix the format")
    _check_self_contained(path, info)
    head = _read_head(path, chosen)
    at_start = _sniff_head(head)
    part: Partition | None = None
    if partition is not None or (at_start == "auto" and linux_partitions(head)):
        virtual = int(info.get("virtual-size") or path.stat().st_size)
        part = pick_partition(head, partition, virtual, f"disk image {path}")
    elif fstype == "auto" and chosen == "raw":
        fstype = at_start
        if fstype == "auto":
            raise ImageError(
                f"{path} has no ext2/3/4 or erofs file system at its start and no partition "
                "table: a disk image root needs one; a directory image must be a directory"
            )
    elif fstype == "auto" and at_start != "auto":
        fstype = at_start
    st = path.stat()
    window = "" if part is None else f"{part.number}:{part.offset}:{part.size}"
    digest = digest_parts(
        "disk", os.fspath(path), str(st.st_size), str(st.st_mtime_ns), str(st.st_ino), chosen,
        fstype, window,
    )  # fmt: skip
    build = (
        functools.partial(_copy, path)
        if part is None
        else functools.partial(_copy_partition, path, chosen, part)
    )
    copy = ensure_image(
        images,
        f"disk-{digest_parts(os.fspath(path), length=12)}",
        digest,
        build,
        description=f"disk image {path}" + ("" if part is None else f" partition {part.number}"),
    )
    if part is not None:
        if fstype == "auto":
            fstype = _sniff_fstype(copy)
        return Layer(
            serial="l-disk",
            path=copy,
            digest=digest,
            description=f"{path} (partition {part.number} of a {chosen} disk image, {fstype})",
            fstype=fstype,
            format="raw",
        )
    return Layer(
        serial="l-disk",
        path=copy,
        digest=digest,
        description=f"{path} ({chosen} disk image, {fstype})",
        fstype=fstype,
        format=cast(Literal["raw", "qcow2", "vmdk"], chosen),
    )
