"""OCI layout directories and docker save archives as images (no VM, no registry)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from oci_helpers import busybox_entries, file, image_config, write_docker_archive, write_oci_layout

from pytest_microsandbox.runtime import SandboxConfig
from pytest_microsandbox.runtime.images import image_config_for, resolve_root_layers


def _files(image: Path, dest: Path) -> set[str]:
    subprocess.run(["fsck.erofs", f"--extract={dest}", str(image)], check=True, capture_output=True)
    return {str(p.relative_to(dest)) for p in dest.rglob("*")}


def test_oci_layout_dir(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    cfg = image_config(env=["PATH=/bin", "FROM=layout"], workdir="/srv")
    write_oci_layout(layout, [busybox_entries(), {"srv/x": file("x")}], cfg)
    assert SandboxConfig(image=str(layout)).image == str(layout)
    layers = resolve_root_layers(str(layout), cache_dir=tmp_path / "cache")
    assert [layer.serial for layer in layers] == ["l-oci1", "l-oci0", "l-skel"]
    assert "srv/x" in _files(layers[0].path, tmp_path / "x")
    config = image_config_for(str(layout), tmp_path / "cache")
    assert config is not None and (config.env["FROM"], config.workdir) == ("layout", "/srv")
    # Second use: the same layers from the pin, nothing rebuilt.
    assert resolve_root_layers(str(layout), cache_dir=tmp_path / "cache") == layers


def test_docker_save_archive(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(
        archive,
        [{"a/b": file("b")}, {"a/.wh.b": file(""), "c": file("c")}],
        image_config(user="1234"),
    )
    layers = resolve_root_layers(str(archive), cache_dir=tmp_path / "cache")
    top = _files(layers[0].path, tmp_path / "x")
    assert {"a/b", "c"} <= top  # a/b is the whiteout (a character device)
    assert (tmp_path / "x/a/b").is_char_device()
    config = image_config_for(str(archive), tmp_path / "cache")
    assert config is not None and config.user == "1234"
