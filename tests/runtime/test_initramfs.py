"""newc writer and module selection, without a VM."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import KernelNotFoundError
from pytest_microsandbox.runtime.initramfs import CpioWriter, parse_modules_dep, resolve_modules

DEP = """\
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/net/9p/9pnet-virtio.ko: kernel/net/9p/9pnet.ko
kernel/net/9p/9pnet.ko:
"""


def test_dependencies_come_first() -> None:
    order = resolve_modules(parse_modules_dep(DEP), ["virtio_mmio", "erofs", "9pnet_virtio"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_mmio.ko")
    assert names.index("libcrc32c.ko") < names.index("erofs.ko")
    assert names.index("9pnet.ko") < names.index("9pnet-virtio.ko")
    assert len(names) == len(set(names))


def test_missing_module_names_the_fix() -> None:
    with pytest.raises(KernelNotFoundError, match="cloud"):
        resolve_modules(parse_modules_dep(DEP), ["9p"])


def test_cpio_is_readable_by_cpio(tmp_path: Path) -> None:
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add_file("init", b"#!/bin/sh\n", mode=0o755)
    writer.add_file("modules/a/b.ko", b"\x7fELF" + bytes(1000))
    writer.add_symlink("bin/sh", "/init")
    writer.finish()
    data = buf.getvalue()
    assert len(data) % 512 == 0
    archive = tmp_path / "a.cpio"
    archive.write_bytes(data)
    out = subprocess.run(
        ["cpio", "-t", "-v"], input=data, capture_output=True, check=True
    ).stdout.decode()
    assert "modules/a/b.ko" in out and "init" in out and "bin/sh -> /init" in out
    (tmp_path / "x").mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet"], input=data, cwd=tmp_path / "x", check=True)
    assert (tmp_path / "x/modules/a/b.ko").read_bytes() == b"\x7fELF" + bytes(1000)
    assert (tmp_path / "x/init").stat().st_mode & 0o777 == 0o755
