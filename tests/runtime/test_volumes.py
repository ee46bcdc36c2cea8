"""Volumes without a VM: QEMU arguments of the 9p devices, mounted-share reporting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import ConfigError, SandboxConfig, Volume
from pytest_microsandbox.runtime.config import MAX_VOLUMES
from pytest_microsandbox.runtime.volumes import describe_mounted_volumes, volume_device_args
from pytest_microsandbox.snapshots._engine import _device_args


def _fsdevs(argv: tuple[str, ...]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-fsdev"]


def test_volumes_take_the_first_slots_spares_stay_empty_and_readonly(tmp_path: Path) -> None:
    host = tmp_path / "host,dir"  # a comma must be doubled in QEMU's option syntax
    host.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ro, rw = Volume.bind(host, readonly=True), Volume.bind(host)
    argv = volume_device_args((ro, rw), run_dir, 4)
    fsdevs = _fsdevs(argv)
    assert fsdevs[0] == (f"local,id=vol0,path={tmp_path}/host,,dir,security_model=none,readonly=on")
    assert fsdevs[1].endswith(",readonly=off") and "id=vol1" in fsdevs[1]
    assert fsdevs[2] == f"local,id=vol2,path={run_dir}/vol2,security_model=none,readonly=on"
    assert (run_dir / "vol2").is_dir() and (run_dir / "vol3").is_dir()
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices == [f"virtio-9p-device,fsdev=vol{i},mount_tag=msb.vol{i}" for i in range(4)]
    with pytest.raises(ConfigError):
        volume_device_args((ro, rw), run_dir, 1)


def test_clone_device_set_is_the_templates_whatever_the_volumes(tmp_path: Path) -> None:
    """Same devices, ids and tags with or without volumes: only host paths differ,
    so a clone with volumes loads the template's migrated device state.
    """
    (tmp_path / "v").mkdir()
    spare = tmp_path / "spare.img"
    spare.touch()
    image = tmp_path / "fs.erofs"
    image.write_bytes(b"\0" * 4096)
    template = _device_args(tmp_path, spare, MAX_VOLUMES)
    clone = _device_args(
        tmp_path, spare, MAX_VOLUMES, (Volume.bind(tmp_path / "v"), Volume.image(image))
    )
    assert len(_fsdevs(template)) == MAX_VOLUMES

    def strip(args: tuple[str, ...]) -> list[str]:
        return [
            a.split(",path=")[0] if a.startswith("local,") else a.split(",file=")[0] for a in args
        ]

    assert strip(template) == strip(clone)
    assert _fsdevs(clone)[0] == (
        f"local,id=vol0,path={tmp_path / 'v'},security_model=none,readonly=off"
    )
    assert f"id=spare0,file={spare},format=raw,if=none,readonly=on" in template
    assert f"id=spare0,file={image},format=raw,if=none,readonly=on" in clone


def test_vanished_host_directory_is_reported(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    volume = Volume.bind(tmp_path / "v")
    (tmp_path / "v").rmdir()
    with pytest.raises(ConfigError, match="no longer exists"):
        volume_device_args((volume,), tmp_path, 1)


def test_describe_mounted_volumes(tmp_path: Path) -> None:
    config = SandboxConfig(volumes={"/data": str(tmp_path), "/my dir": str(tmp_path)})
    mounts = (
        "overlay / overlay rw 0 0\n"
        "msb.vol1 /my\\040dir 9p rw,trans=virtio 0 0\n"
        "guestshare /mnt/share 9p ro 0 0\n"
    )
    assert describe_mounted_volumes(mounts, config.volumes) == [
        f"volume /my dir (host directory {tmp_path})",
        "9p share guestshare at /mnt/share",
    ]
    assert describe_mounted_volumes("overlay / overlay rw 0 0\n", config.volumes) == []


def test_host_process_double_refuses_volumes(tmp_path: Path) -> None:
    from pytest_microsandbox.runtime import Sandbox
    from pytest_microsandbox.runtime.hostproc import HostProcessBackend

    async def body() -> None:
        with pytest.raises(ConfigError, match="boots no guest"):
            await Sandbox.create(
                SandboxConfig(volumes={"/data": str(tmp_path)}), backend=HostProcessBackend()
            )

    anyio.run(body)


def test_volume_slots_follow_the_bind_volumes_unless_set(tmp_path: Path) -> None:
    """9p spares cost ~1.2 MiB of host memory each: only templates for sandboxes
    with bind volumes (or an explicit volume_slots) carry them.
    """
    image = tmp_path / "fs.erofs"
    image.write_bytes(b"\0" * 4096)
    assert SandboxConfig().volume_slot_count() == 0
    assert SandboxConfig(volumes={"/img": Volume.image(image)}).volume_slot_count() == 0
    assert SandboxConfig(volumes={"/d": str(tmp_path)}).volume_slot_count() == MAX_VOLUMES
    assert SandboxConfig(volume_slots=1, volumes={"/d": str(tmp_path)}).volume_slot_count() == 1
    assert SandboxConfig(volume_slots=2).volume_slot_count() == 2
    with pytest.raises(ConfigError, match="volume_slots=1 leaves no room for 2 bind volumes"):
        SandboxConfig(volume_slots=1, volumes={"/a": str(tmp_path), "/b": str(tmp_path)})
    with pytest.raises(ConfigError, match="volume_slots"):
        SandboxConfig(volume_slots=MAX_VOLUMES + 1)
    spare = tmp_path / "spare.img"
    spare.touch()
    assert _fsdevs(_device_args(tmp_path, spare, 0)) == []
    with pytest.raises(ConfigError, match="1 volumes but only 0 9p devices"):
        _device_args(tmp_path, spare, 0, (Volume.bind(tmp_path),))


def test_named_volume_store(tmp_path: Path) -> None:
    """Named volumes without a VM: created once, quota checked, listed, locked, pruned."""
    from pytest_microsandbox.runtime import FilesystemError, Volume
    from pytest_microsandbox.runtime.images import prune_volumes
    from pytest_microsandbox.runtime.volumes import lock_volumes

    vol = Volume.named("cache", quota_mb=8, cache_dir=tmp_path)
    assert vol.host_path is not None and (vol.host_path / "disk.ext4").stat().st_size == 8 << 20
    assert Volume.named("cache", quota_mb=8, cache_dir=tmp_path) == vol
    with pytest.raises(ConfigError, match="quota_mb=8"):
        Volume.named("cache", quota_mb=16, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="not valid"):
        Volume.named("../x", cache_dir=tmp_path)
    fds = lock_volumes({"/data": vol})
    try:
        with pytest.raises(FilesystemError, match="in use"):
            lock_volumes({"/other": vol})
        assert prune_volumes(tmp_path, older_than_s=0).removed == ()  # in use: kept
    finally:
        for fd in fds:
            os.close(fd)
    assert [v.name for v in Volume.list(cache_dir=tmp_path)] == ["cache"]
    assert prune_volumes(tmp_path, older_than_s=0, now=time.time() + 10).removed == ("cache",)
    assert Volume.list(cache_dir=tmp_path) == []
    assert Volume.tmpfs(size_mb=4).size_mb == 4


def test_named_and_tmpfs_volumes_in_config(tmp_path: Path) -> None:
    named = Volume.named("db", quota_mb=8, cache_dir=tmp_path)
    config = SandboxConfig(volumes={"/data": named, "/scratch": Volume.tmpfs(size_mb=16)})
    assert config.volume_slot_count() == MAX_VOLUMES  # the named volume rides on a 9p slot
    again = SandboxConfig.from_json(config.to_json())
    assert again.volumes == config.volumes
    with pytest.raises(ConfigError):
        Volume.tmpfs(size_mb=0)
