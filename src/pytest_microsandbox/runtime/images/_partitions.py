"""Partition tables (MBR, GPT) of a disk image: where its Linux partitions are.

Only the table is read, from the first sectors of the disk as QEMU's block
layer presents them (so qcow2 and vmdk work alike); the bytes are the user's
file, parsed with bounds on every count and offset. No partitioning tool is
needed on the host (sfdisk is not installed everywhere, and it would only
read these same few fields).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from .._exceptions import ImageError

__all__ = ["HEAD_BYTES", "Partition", "linux_partitions", "pick_partition"]

SECTOR = 512
#: Bytes of the disk's start read to find the table: MBR, GPT header and 128
#: GPT entries of 128 bytes (LBA 2-33).
HEAD_BYTES = 34 * SECTOR
_MBR_LINUX = 0x83
_MBR_GPT = 0xEE
#: GPT types holding a Linux file system: "Linux filesystem" and "Linux root (x86-64)".
_GPT_LINUX = {
    uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4"),
    uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
}


@dataclass(frozen=True)
class Partition:
    """One partition: its 1-based number in the table, byte offset and size."""

    number: int
    offset: int
    size: int
    linux: bool


def _mbr(head: bytes) -> list[Partition] | None:
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return None
    out = []
    for n in range(4):
        entry = head[446 + 16 * n : 462 + 16 * n]
        kind = entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if kind == 0 or count == 0:
            continue
        if kind == _MBR_GPT:
            return None  # protective MBR: the GPT says
        out.append(Partition(n + 1, start * SECTOR, count * SECTOR, kind == _MBR_LINUX))
    return out


def _gpt(head: bytes) -> list[Partition] | None:
    header = head[SECTOR : 2 * SECTOR]
    if header[:8] != b"EFI PART":
        return None
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if entries_lba != 2 or size < 128 or count * size > len(head) - 2 * SECTOR:
        raise ImageError(
            "the disk's GPT places its partition entries outside its first 34 sectors "
            f"(LBA {entries_lba}, {count} x {size} bytes): not supported; extract the "
            "partition with dd"
        )
    out = []
    for n in range(count):
        entry = head[2 * SECTOR + n * size : 2 * SECTOR + (n + 1) * size]
        kind = uuid.UUID(bytes_le=bytes(entry[:16]))
        if kind.int == 0:
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            continue
        out.append(
            Partition(n + 1, first * SECTOR, (last - first + 1) * SECTOR, kind in _GPT_LINUX)
        )
    return out


def linux_partitions(head: bytes) -> list[Partition] | None:
    """Every partition of the table at the start of ``head`` (None: no table)."""
    table = _mbr(head)
    return table if table is not None else _gpt(head)


def pick_partition(head: bytes, number: int | None, disk_size: int, what: str) -> Partition:
    """Partition ``number`` (1-based), or the first Linux one when None.

    :raises ImageError: no table, no such partition, or one past the disk's end.
    """
    table = linux_partitions(head)
    if not table:
        raise ImageError(
            f"{what} has no partition table (MBR or GPT) with a partition in it; a "
            "disk image root needs a file system at its start or in a partition"
        )
    if number is None:
        chosen = next((p for p in table if p.linux), None)
        if chosen is None:
            raise ImageError(
                f"{what} has no Linux partition (partitions {[p.number for p in table]}); "
                "name one with Image.disk(path, partition=N)"
            )
    else:
        chosen = next((p for p in table if p.number == number), None)
        if chosen is None:
            raise ImageError(
                f"{what} has no partition {number} (it has {[p.number for p in table]})"
            )
    if chosen.offset + chosen.size > disk_size:
        raise ImageError(f"partition {chosen.number} of {what} ends past the disk's end")
    return chosen
