"""Host-directory volumes: QEMU virtio-9p shares the guest mounts once it runs.

A QEMU 9p share's host directory is fixed when QEMU starts, and a share
mounted in the guest blocks migration. So every template and clone carries
:data:`~.config.MAX_VOLUMES` spare 9p devices (tags ``msb.vol0`` ...) that the
template never mounts; a clone with volumes starts QEMU with those fsdevs
pointed at its volume directories (the guest-visible device, hence the
migrated state, is the same) and the agent mounts them after the restore. A
cold-booted sandbox gets one device per volume, same tags.

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

from collections.abc import Mapping, Sequence
from pathlib import Path

from ._exceptions import ConfigError, FilesystemError
from .agent.client import AgentClient
from .config import Volume

__all__ = [
    "VOLUME_MOUNT_OPTIONS",
    "describe_mounted_volumes",
    "mount_volumes",
    "volume_device_args",
    "volume_tag",
]

#: 9p mount options of a volume; ``cache=none`` so host-side changes show at once.
VOLUME_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=none"


def volume_tag(slot: int) -> str:
    """The 9p mount tag of volume device ``slot``."""
    return f"msb.vol{slot}"


def _qemu_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


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
            if not path.is_dir():
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
    """Mount each volume at its guest path (slot order = ``volumes`` order).

    :raises FilesystemError: the guest refused a mount; the message names the volume.
    """
    for slot, (guest_path, volume) in enumerate(volumes.items()):
        try:
            await agent.mount(
                volume_tag(slot), guest_path, "9p", VOLUME_MOUNT_OPTIONS,
                readonly=volume.readonly, timeout=timeout,
            )  # fmt: skip
        except FilesystemError as exc:
            raise FilesystemError(
                f"mounting volume {guest_path} (host directory {volume.host_path}) in the "
                f"guest failed: {exc.message}",
                errno=exc.errno or 0,
                path=guest_path,
            ) from exc


def describe_mounted_volumes(mounts: str, volumes: Mapping[str, Volume]) -> list[str]:
    """Describe the 9p shares mounted in the guest, from its ``/proc/self/mounts``."""
    by_tag = {volume_tag(i): (g, v) for i, (g, v) in enumerate(volumes.items())}
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[2] != "9p":
            continue
        tag, where = fields[0], fields[1].replace("\\040", " ")
        if tag in by_tag:
            guest_path, volume = by_tag[tag]
            found.append(f"volume {guest_path} (host directory {volume.host_path})")
        elif tag.startswith("msb.vol"):
            found.append(f"volume device {tag} at {where}")
        else:
            found.append(f"9p share {tag} at {where}")
    return found
