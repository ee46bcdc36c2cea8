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
from pathlib import Path
from typing import Any, Literal, cast

from .._exceptions import ImageError
from .._keys import digest_parts
from ._model import Layer
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


def _sniff_fstype(path: Path) -> str:
    """ext* or erofs from a raw image's superblock; "auto" if unknown."""
    try:
        with open(path, "rb") as f:
            f.seek(_EXT_MAGIC_OFFSET)
            ext = f.read(2)
            f.seek(_EROFS_MAGIC_OFFSET)
            erofs = f.read(4)
    except OSError:
        return "auto"
    if ext == b"\x53\xef":
        return "ext4"
    if erofs == b"\xe2\xe1\xf5\xe0":
        return "erofs"
    return "auto"


def disk_layer(
    path: Path, images: Path, *, fstype: str = "auto", disk_format: str | None = None
) -> Layer:
    """The layer for disk image ``path`` (its file system at the guest's ``/``).

    ``disk_format`` (raw, qcow2, vmdk) is detected by ``qemu-img`` when None;
    ``fstype`` ``auto`` reads a raw image's superblock, and otherwise lets the
    guest try ext4, then erofs.

    :raises ImageError: unreadable file, unsupported format or file system, or
        an image that refers to other host files.
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
    if fstype == "auto" and chosen == "raw":
        fstype = _sniff_fstype(path)
        if fstype == "auto":
            raise ImageError(
                f"{path} has no ext2/3/4 or erofs file system at its start: a disk image "
                "root needs one (a partitioned disk is not supported: extract the partition "
                "with dd); a directory image must be a directory"
            )
    st = path.stat()
    digest = digest_parts(
        "disk", os.fspath(path), str(st.st_size), str(st.st_mtime_ns), str(st.st_ino), chosen,
        fstype,
    )  # fmt: skip
    copy = ensure_image(
        images,
        f"disk-{digest_parts(os.fspath(path), length=12)}",
        digest,
        functools.partial(_copy, path),
        description=f"disk image {path}",
    )
    return Layer(
        serial="l-disk",
        path=copy,
        digest=digest,
        description=f"{path} ({chosen} disk image, {fstype})",
        fstype=fstype,
        format=cast(Literal["raw", "qcow2", "vmdk"], chosen),
    )
