"""Volumes: host directories (QEMU virtio-9p shares) and file-system images (a
virtio-blk disk), which the guest mounts once it runs.

An image volume is the spare virtio-blk disk every template carries (serial
:data:`IMAGE_VOLUME_SERIAL`, backed by an empty sparse file there): a clone's
QEMU opens the image instead, read-only, and the agent mounts the disk found by
its serial. See :func:`image_disk_args` for why that is safe after a restore.

A QEMU 9p share's host directory is fixed when QEMU starts, and a share
mounted in the guest blocks migration. So a template for sandboxes with bind
volumes (:meth:`~.config.SandboxConfig.volume_slot_count`) carries spare 9p
devices (tags ``msb.vol0`` ...) that the template never mounts; a clone with
volumes starts QEMU with those fsdevs pointed at its volume directories (the
guest-visible device, hence the migrated state, is the same) and the agent
mounts them after the restore. A cold-booted sandbox gets one device per
volume, same tags.

Security of a share (QEMU ``local`` fsdev, ``security_model=none``, QEMU 7.2):

- Confinement. Paths are resolved by the guest kernel: a symlink in the share
  (made by the guest or already on the host) is returned to the guest as a
  link and followed in the guest's own namespace, never by QEMU. QEMU opens
  every path element with ``openat(..., O_NOFOLLOW)`` relative to the export
  root's file descriptor (the CVE-2016-9602 fix, QEMU >= 2.9) and refuses
  ``..`` above the root in a walk (CVE-2016-7116), so a hostile guest cannot
  make QEMU touch a host file outside the directory. The directory itself is
  resolved once, here (``Volume.host_path`` is stored with symlinks resolved).
- What it does not limit. ``security_model=none`` creates real files with the
  modes the guest asks for, as QEMU's host user: when QEMU runs as root, guest
  root can leave setuid-root programs or device nodes in a read-write volume.
  They cannot hurt the host unless something on the host executes or opens
  them, so do not run host programs out of a read-write volume a hostile guest
  wrote, or bind it ``readonly``. A file system mounted below the directory on
  the host is visible too (QEMU crosses host mount points). Read-only is
  enforced by QEMU (``readonly=on``: writes fail with EROFS whatever the guest
  does) and by the guest mount (``ro``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._exceptions import ConfigError, FilesystemError
from ._named_volumes import DISK_NAME, lock_named_volume
from .agent.client import AgentClient
from .config import Volume

__all__ = [
    "IMAGE_VOLUME_SERIAL",
    "NAMED_SHARE_ROOT",
    "VOLUME_MOUNT_OPTIONS",
    "bind_volumes",
    "describe_mounted_volumes",
    "image_disk_args",
    "image_volume",
    "lock_volumes",
    "mount_volumes",
    "volume_device_args",
    "volume_tag",
]

#: Serial of the virtio-blk disk an image volume is (the templates' spare disk).
IMAGE_VOLUME_SERIAL = "msb.spare0"

#: 9p mount options of a volume; ``cache=none`` so host-side changes show at once.
VOLUME_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=none"


def volume_tag(slot: int) -> str:
    """The 9p mount tag of volume device ``slot``."""
    return f"msb.vol{slot}"


def _qemu_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def bind_volumes(volumes: Mapping[str, Volume]) -> dict[str, Volume]:
    """The volumes on a 9p device, in order: volume ``i`` is on 9p slot ``i``
    (bind volumes, and named volumes: the directory of their disk image).
    """
    return {g: v for g, v in volumes.items() if v.kind in ("bind", "named")}


#: Where the guest mounts a named volume's 9p share (its disk image's directory).
NAMED_SHARE_ROOT = "/.msb/volumes"


def image_volume(volumes: Mapping[str, Volume]) -> tuple[str, Volume] | None:
    """The image volume (guest path, volume), if any: at most one is allowed."""
    return next(((g, v) for g, v in volumes.items() if v.kind == "image"), None)


def image_disk_args(drive_id: str, image: Path) -> tuple[str, ...]:
    """QEMU arguments for the read-only disk :data:`IMAGE_VOLUME_SERIAL` backed by ``image``.

    Templates carry it backed by an empty sparse file far larger than any image:
    the guest reads a disk's capacity once, at probe, so a clone's image must
    fit in what the template's guest saw. Nothing in the template opens that
    disk, so the guest caches none of its blocks (the kernel drops a block
    device's page cache on its last close), and the image a clone's QEMU opens
    in its place is read fresh.

    :raises ConfigError: the image file is gone.
    """
    if not image.is_file():
        raise ConfigError(
            f"volumes: image file {str(image)!r} no longer exists (it did when the "
            "configuration was made): recreate it or drop the volume"
        )
    return (
        "-drive", f"id={drive_id},file={_qemu_opt(str(image))},format=raw,if=none,readonly=on",
        "-device", f"virtio-blk-device,drive={drive_id},serial={IMAGE_VOLUME_SERIAL}",
    )  # fmt: skip


def volume_device_args(volumes: Sequence[Volume], run_dir: Path, slots: int) -> tuple[str, ...]:
    """QEMU arguments for ``slots`` 9p devices, volume ``i`` on slot ``i``.

    Slots without a volume export an empty read-only directory under ``run_dir``.

    :raises ConfigError: more volumes than slots, or a volume's directory is gone.
    """
    if len(volumes) > slots:
        raise ConfigError(f"{len(volumes)} volumes but only {slots} 9p devices")
    args: list[str] = []
    for slot in range(slots):
        if slot < len(volumes):
            path, readonly = volumes[slot].host_path, volumes[slot].readonly
            if path is None or not path.is_dir():
                raise ConfigError(
                    f"volumes: host directory {str(path)!r} no longer exists (it did when "
                    "the configuration was made): recreate it or drop the volume"
                )
        else:
            path, readonly = run_dir / f"vol{slot}", True
            path.mkdir(exist_ok=True)
        ro = "on" if readonly else "off"
        args += [
            "-fsdev",
            f"local,id=vol{slot},path={_qemu_opt(str(path))},security_model=none,readonly={ro}",
            "-device",
            f"virtio-9p-device,fsdev=vol{slot},mount_tag={volume_tag(slot)}",
        ]
    return tuple(args)


async def mount_volumes(
    agent: AgentClient, volumes: Mapping[str, Volume], timeout: float | None
) -> None:
    """Mount each volume at its guest path (bind volumes in slot order, then the image).

    :raises FilesystemError: the guest refused a mount; the message names the volume.
    """
    mounts: list[tuple[str, Volume, str, str, str, bool]] = []
    for slot, (guest_path, volume) in enumerate(bind_volumes(volumes).items()):
        if volume.kind == "named":
            share = f"{NAMED_SHARE_ROOT}/{slot}"
            mounts.append((share, volume, volume_tag(slot), "9p", VOLUME_MOUNT_OPTIONS, False))
            disk = f"loop:{share}/{DISK_NAME}"
            mounts.append((guest_path, volume, disk, "ext4", "", volume.readonly))
        else:
            opts = VOLUME_MOUNT_OPTIONS
            mounts.append((guest_path, volume, volume_tag(slot), "9p", opts, volume.readonly))
    image = image_volume(volumes)
    if image is not None:
        guest_path, volume = image
        source = f"serial:{IMAGE_VOLUME_SERIAL}"
        mounts.append((guest_path, volume, source, volume.fstype, "", volume.readonly))
    for guest_path, volume in volumes.items():
        if volume.kind == "tmpfs":
            opts = f"size={volume.size_mb}m,mode=1777"
            mounts.append((guest_path, volume, "tmpfs", "tmpfs", opts, volume.readonly))
    for guest_path, volume, source, fstype, options, readonly in mounts:
        try:
            await agent.mount(
                source, guest_path, fstype, options, readonly=readonly, timeout=timeout
            )
        except FilesystemError as exc:
            raise FilesystemError(
                f"mounting volume {guest_path} ({_describe(volume)}) in the guest failed: "
                f"{exc.message}",
                errno=exc.errno or 0,
                path=guest_path,
            ) from exc


def lock_volumes(volumes: Mapping[str, Volume]) -> list[int]:
    """Take the lock of every named volume (one sandbox at a time); the fds to close.

    :raises FilesystemError: another sandbox uses one of them (none stays locked).
    """
    fds: list[int] = []
    try:
        for volume in volumes.values():
            if volume.kind == "named" and volume.host_path is not None:
                fds.append(lock_named_volume(volume.host_path))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _describe(volume: Volume) -> str:
    if volume.kind == "named":
        return f"named volume {volume.name!r} ({volume.quota_mb} MiB)"
    if volume.kind == "tmpfs":
        return f"tmpfs of {volume.size_mb} MiB"
    if volume.kind == "image":
        return f"{volume.fstype} image {volume.host_path}"
    return f"host directory {volume.host_path}"


def describe_mounted_volumes(mounts: str, volumes: Mapping[str, Volume]) -> list[str]:
    """Describe the volumes and other 9p shares mounted in the guest, from its
    ``/proc/self/mounts`` (what blocks a snapshot: a restore could not reattach them).
    """
    by_tag = {volume_tag(i): (g, v) for i, (g, v) in enumerate(bind_volumes(volumes).items())}
    image = image_volume(volumes)
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        tag, where = fields[0], fields[1].replace("\\040", " ")
        if image is not None and where == image[0] and tag.startswith("/dev/vd"):
            found.append(f"volume {image[0]} ({_describe(image[1])})")
            continue
        if fields[2] != "9p":
            continue
        if tag in by_tag:
            guest_path, volume = by_tag[tag]
            found.append(f"volume {guest_path} ({_describe(volume)})")
        elif tag.startswith("msb.vol"):
            found.append(f"volume device {tag} at {where}")
        else:
            found.append(f"9p share {tag} at {where}")
    return found
