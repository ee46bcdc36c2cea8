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
