"""Image volumes (the templates' spare virtio-blk disk) against real QEMU VMs.

A clone restored from the shared default template gets its own image on the
spare disk and the guest mounts it after the restore; the image is larger than
the 64 MiB the spare disk used to have, and two clones of one template see
their own images.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import SandboxConfig, SnapshotError, SyncSandbox, Volume

pytestmark = pytest.mark.vm

BIG_MIB = 72  # over the spare disk's old 64 MiB capacity


def _erofs(tree: Path, image: Path) -> Path:
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name in ("a", "b"):
        tree = root / f"tree-{name}"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "which.txt").write_text(f"image {name}\n")
        out[name] = tree
    with open(out["a"] / "big.bin", "wb") as f:
        f.seek(BIG_MIB << 20)
        f.write(b"the end")
    return {name: _erofs(tree, root / f"{name}.erofs") for name, tree in out.items()}


def test_clones_mount_their_own_image_after_the_restore(images: dict[str, Path]) -> None:
    assert images["a"].stat().st_size > 64 << 20
    config_a = SandboxConfig(name="img-a", volumes={"/assets": Volume.image(images["a"])})
    config_b = SandboxConfig(name="img-b", volumes={"/assets": Volume.image(images["b"])})
    with SyncSandbox.create(config_a) as a, SyncSandbox.create(config_b) as b:
        assert a.async_sandbox.session.origin is not None  # a template clone, not a cold boot
        assert a.fs().read_text("/assets/sub/which.txt") == "image a\n"
        assert b.fs().read_text("/assets/sub/which.txt") == "image b\n"
        # The end of a file beyond the old capacity reads back intact.
        out = a.shell("tail -c 7 /assets/big.bin")
        assert out.stdout_text == "the end", out.stderr_text
        assert " /assets erofs ro" in a.fs().read_text("/proc/self/mounts")
        for script in ("echo x > /assets/new.txt", "mount -o remount,rw /assets"):
            out = a.shell(script)
            assert not out.success, script
        # Snapshots refuse: a restore could not reattach this clone's image.
        with pytest.raises(SnapshotError, match=r"volume /assets \(erofs image .*a\.erofs\)"):
            a.snapshot("never-made")


def test_cold_boot_mounts_the_image(images: dict[str, Path]) -> None:
    config = SandboxConfig(
        name="img-cold", cold_boot=True, volumes={"/assets": Volume.image(images["b"])}
    )
    with SyncSandbox.create(config) as sb:
        assert sb.fs().read_text("/assets/sub/which.txt") == "image b\n"


def test_restore_binds_an_image_to_a_named_snapshot(images: dict[str, Path]) -> None:
    with SyncSandbox.create(SandboxConfig(name="img-src")) as src:
        src.fs().write("/root/state.txt", "before the snapshot")
        src.snapshot("img-volume-test")
    try:
        with SyncSandbox.restore(
            "img-volume-test", volumes={"/assets": Volume.image(images["a"])}
        ) as sb:
            assert sb.fs().read_text("/root/state.txt") == "before the snapshot"
            assert sb.fs().read_text("/assets/sub/which.txt") == "image a\n"
    finally:
        from pytest_microsandbox.snapshots import Snapshot

        Snapshot.remove("img-volume-test")


def test_a_wrong_fstype_names_the_volume(images: dict[str, Path]) -> None:
    config = SandboxConfig(
        name="img-bad", volumes={"/assets": Volume.image(images["a"], fstype="ext4")}
    )
    with pytest.raises(Exception, match=r"mounting volume /assets \(ext4 image .*a\.erofs\)"):
        SyncSandbox.create(config)
