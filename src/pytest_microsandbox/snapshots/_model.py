"""Snapshot metadata (``meta.json``): what a restore needs and what is checked on use."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FORMAT_VERSION", "DiskMeta", "EntryDigests", "SnapshotMeta"]

#: Bumped whenever the on-disk layout or the clone's device set changes: a
#: template of another format is rebuilt, a named snapshot refused.
FORMAT_VERSION = 2


class DiskMeta(BaseModel):
    """A read-only root layer attached by serial; the same file in every clone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serial: str
    path: str
    size: int
    format: str = "raw"


class SnapshotMeta(BaseModel):
    """Everything needed to start a clone with the exact device set of the capture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT_VERSION
    kind: Literal["template", "snapshot"]
    name: str  # the template key, or the snapshot's name
    template: str  # the template this memory descends from
    created: float
    qemu_version: str
    accel: Literal["kvm", "tcg"]
    cpus: int
    memory_mib: int
    kernel: str
    kernel_size: int
    initrd: str
    initrd_size: int
    cmdline: str
    disks: tuple[DiskMeta, ...]
    volume_slots: int  # spare 9p devices for bind volumes (SandboxConfig.volume_slots)
    state_size: int
    config: str  # SandboxConfig JSON of the captured sandbox
    #: env var -> placeholder of each secret of the captured sandbox: the guest
    #: holds them, a restore keeps them. Never a secret's value.
    secret_placeholders: dict[str, str] = {}
    #: The TCG ``-cpu`` model the memory was made on, which its clones run on
    #: (entries made before the model was recorded ran on ``max``).
    cpu_model: str = "max"


_SHA256 = r"^[0-9a-f]{64}$"


class EntryDigests(BaseModel):
    """``integrity.json``: the SHA-256 of an entry's files and of what it boots
    from, recorded when the entry was made (the memory file's own digest and
    verified stamp are in its ``memory.digest`` record).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["sha256"] = "sha256"
    meta: str = Field(pattern=_SHA256)  # meta.json
    state: str = Field(pattern=_SHA256)
    #: The initramfs and each disk image, by path: their contents when the
    #: entry's guest read them (its page cache is in the memory file).
    inputs: dict[str, str]
