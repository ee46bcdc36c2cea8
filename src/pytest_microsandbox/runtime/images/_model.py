"""The public description of one read-only root-filesystem layer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SERIAL_PATTERN", "Layer"]

#: A virtio-blk serial holds at most 20 bytes; the agent finds each layer's
#: disk by this serial (``/sys/block/vdX/serial``), so keep it plain ASCII.
SERIAL_PATTERN = r"^[a-z0-9-]{1,20}$"


class Layer(BaseModel):
    """One erofs image whose paths start at ``/``; the guest stacks layers top first."""

    model_config = ConfigDict(frozen=True)

    #: virtio-blk serial, unique per VM (e.g. ``"l-usr"``).
    serial: str = Field(pattern=SERIAL_PATTERN)
    #: The erofs image file.
    path: Path
    #: Content identity (fingerprint based): equal digests mean equal trees.
    digest: str
    #: Human text, e.g. ``"/usr (host)"``.
    description: str
    #: File system the guest mounts it as (``auto``: the guest tries ext4, then erofs).
    fstype: str = Field(default="erofs", pattern=r"^[a-z0-9]{1,16}$")
    #: QEMU block format of the file (disk images may be qcow2 or vmdk).
    format: Literal["raw", "qcow2", "vmdk"] = "raw"
