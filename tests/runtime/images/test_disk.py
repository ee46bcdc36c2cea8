"""Disk images as roots: format and file system detection, refusal of images
that name other host files (no VM).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import ConfigError, Image, SandboxConfig
from pytest_microsandbox.runtime._exceptions import ImageError
from pytest_microsandbox.runtime.images import resolve_root_layers
from pytest_microsandbox.runtime.images._disk import disk_layer


def make_ext4(path: Path, tree: Path, size_mb: int = 16) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), f"{size_mb}M"], check=True)
    return path


def test_raw_ext4_detected(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    disk = make_ext4(tmp_path / "root.img", tmp_path / "tree")
    layer = disk_layer(disk, tmp_path / "images")
    assert (layer.format, layer.fstype, layer.serial) == ("raw", "ext4", "l-disk")
    layers = resolve_root_layers(str(disk), cache_dir=tmp_path / "cache")
    assert [lay.serial for lay in layers] == ["l-disk", "l-skel"]


def test_qcow2_detected_and_backing_refused(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    raw = make_ext4(tmp_path / "root.img", tmp_path / "tree")
    qcow = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    layer = disk_layer(qcow, tmp_path / "images", fstype="ext4")
    assert (layer.format, layer.fstype) == ("qcow2", "ext4")
    child = tmp_path / "child.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(qcow), str(child)],
        check=True,
    )
    with pytest.raises(ImageError, match="backing file"):
        disk_layer(child, tmp_path / "images")


def test_image_disk_in_config(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    disk = make_ext4(tmp_path / "root.img", tmp_path / "tree")
    config = SandboxConfig(image=Image.disk(disk, fstype="ext4"))
    assert (config.image, config.disk_fstype) == (str(disk), "ext4")
    assert SandboxConfig.from_json(config.to_json()).disk_fstype == "ext4"
    oci = SandboxConfig(image=Image.oci("127.0.0.1:5000/a/b:1", pull_policy="never"))
    assert (oci.image, oci.pull_policy) == ("127.0.0.1:5000/a/b:1", "never")
    with pytest.raises(ConfigError):
        SandboxConfig(image=Image.disk(disk, fstype="xfs"))  # type: ignore[arg-type]


# -- partitioned disks ------------------------------------------------------------------------

_LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


def _partitioned(path: Path, tree: Path, table: str) -> Path:
    """A 48 MiB disk: partition 1 (8 MiB, not Linux) then partition 2, ext4 with ``tree``."""
    import struct
    import uuid

    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(48 * mib)
    parts = [(1 * mib, 8 * mib, False), (16 * mib, 24 * mib, True)]
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-E", f"offset={16 * mib}", "-d", str(tree), str(path),
         f"{24 * mib // 1024}k"],
        check=True,
    )  # fmt: skip
    head = bytearray(34 * 512)
    if table == "mbr":
        for n, (offset, size, linux) in enumerate(parts):
            entry = struct.pack("<B3xB3xII", 0, 0x83 if linux else 0x0C, offset // 512, size // 512)
            head[446 + 16 * n : 462 + 16 * n] = entry
    else:
        head[446:462] = struct.pack("<B3xB3xII", 0, 0xEE, 1, 48 * mib // 512 - 1)
        head[512:520] = b"EFI PART"
        head[512 + 72 : 512 + 88] = struct.pack("<QII", 2, 128, 128)
        for n, (offset, size, linux) in enumerate(parts):
            kind = uuid.UUID(_LINUX_FS if linux else _ESP).bytes_le
            first, last = offset // 512, (offset + size) // 512 - 1
            head[1024 + 128 * n : 1024 + 128 * n + 48] = (
                kind + bytes(16) + struct.pack("<QQ", first, last)
            )
    head[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(head)
    return path


@pytest.mark.parametrize(("table", "fmt"), [("mbr", "raw"), ("gpt", "qcow2")])
def test_partitioned_disk_boots_its_first_linux_partition(
    tmp_path: Path, table: str, fmt: str
) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "hello").write_text("from the partition")
    disk = _partitioned(tmp_path / "disk.img", tmp_path / "tree", table)
    if fmt == "qcow2":
        qcow = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(qcow)], check=True)
        disk = qcow
    before = disk.read_bytes()
    layer = disk_layer(disk, tmp_path / "images")
    assert (layer.format, layer.fstype) == ("raw", "ext4")
    assert "partition 2" in layer.description
    assert layer.path.stat().st_size == 24 << 20  # the partition alone
    out = subprocess.run(
        ["debugfs", "-R", "cat /hello", str(layer.path)], capture_output=True, text=True
    )
    assert out.stdout == "from the partition"
    assert disk.read_bytes() == before  # the user's file is never written
    # Named explicitly; a number the table does not have is refused.
    with pytest.raises(ImageError, match="has no partition 3"):
        disk_layer(disk, tmp_path / "images", partition=3)
    again = disk_layer(disk, tmp_path / "images", partition=2)
    assert again.path == layer.path  # the same cached copy
    config = SandboxConfig(image=Image.disk(disk, partition=2))
    assert config.disk_partition == 2
    layers = resolve_root_layers(str(disk), cache_dir=tmp_path / "cache", disk_partition=2)
    assert layers[0].description == layer.description
