"""A disk image (raw ext4, and the same as qcow2) as the guest's root: each
sandbox writes into its own overlay, the user's file is never written.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import Image, SandboxConfig, SyncSandbox

pytestmark = pytest.mark.vm


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_disk_root_copy_on_write(tmp_path: Path, fmt: str) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (tree / "bin/busybox").chmod(0o755)
    for applet in ("sh", "cat", "echo"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc").mkdir()
    (tree / "etc/release").write_text("disk image\n")
    disk = tmp_path / "root.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk), "32M"], check=True)
    if fmt == "qcow2":
        qcow = tmp_path / "root.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(qcow)], check=True)
        disk = qcow
    before = _sha(disk)
    config = SandboxConfig(name=f"disk-{fmt}", image=Image.disk(disk), env={"PATH": "/bin"})
    with SyncSandbox.create(config) as sb:
        assert sb.exec("cat", ["/etc/release"]).stdout_text == "disk image\n"
        sb.exec("sh", ["-c", "echo changed > /etc/release"])
        assert sb.exec("cat", ["/etc/release"]).stdout_text == "changed\n"
    with SyncSandbox.create(config) as sb:  # a new sandbox: the change is gone
        assert sb.exec("cat", ["/etc/release"]).stdout_text == "disk image\n"
    assert _sha(disk) == before


def test_partitioned_qcow2_boots_its_linux_partition(tmp_path: Path) -> None:
    from test_disk import _partitioned

    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (tree / "bin/busybox").chmod(0o755)
    for applet in ("sh", "cat"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc").mkdir()
    (tree / "etc/release").write_text("partition 2\n")
    raw = _partitioned(tmp_path / "disk.img", tree, "gpt")
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    before = _sha(disk)
    config = SandboxConfig(name="disk-part", image=Image.disk(disk), env={"PATH": "/bin"})
    with SyncSandbox.create(config) as sb:
        assert sb.exec("cat", ["/etc/release"]).stdout_text == "partition 2\n"
    assert _sha(disk) == before
