"""newc writer, module selection and the archive cache, without a VM."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import KernelNotFoundError
from pytest_microsandbox.runtime._integrity import (
    forget,
    read_record,
    record_digest,
    record_path,
    sha256_file,
)
from pytest_microsandbox.runtime._locks import EntryLock
from pytest_microsandbox.runtime.initramfs import (
    CpioWriter,
    InitramfsSpec,
    build_initramfs,
    parse_modules_dep,
    prune_initramfs,
    resolve_modules,
)

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


def fake_spec(tmp_path: Path, agent_bytes: bytes) -> InitramfsSpec:
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    (modules / "modules.dep").write_text("")
    agent = tmp_path / f"agent-{agent_bytes.hex()}"
    agent.write_bytes(agent_bytes)
    return InitramfsSpec(agent=agent, modules_dir=modules, modules=())


def test_build_is_cached_and_leaves_no_lock_file(tmp_path: Path) -> None:
    out = tmp_path / "cache/initramfs"
    first = build_initramfs(fake_spec(tmp_path, b"agent-1"), out)
    old = time.time() - 3600
    os.utime(record_path(first), (old, old))
    assert build_initramfs(fake_spec(tmp_path, b"agent-1"), out) == first
    # Handing it out counts as a use, marked on its digest record (not the archive).
    assert record_path(first).stat().st_mtime > old + 3000
    assert sorted(p.name for p in out.iterdir()) == [first.name, record_path(first).name]


def make_archive(out: Path, name: str, used: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"initramfs-{name}.cpio"
    path.write_bytes(b"070701")
    os.utime(path, (used, used))
    return path


def test_prune_keeps_recent_pinned_and_in_grace(tmp_path: Path) -> None:
    out = tmp_path / "cache/initramfs"
    now = time.time()
    hours = [make_archive(out, f"{i:016x}", now - (i + 1) * 3600) for i in range(6)]
    in_grace = make_archive(out, "g" * 16, now - 60)
    pinned, zygote_only = hours[4], hours[5]
    for entry, archive in (("mine", pinned), ("zygote-0123", zygote_only)):
        d = tmp_path / "cache/snapshots/named" / entry
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"initrd": str(archive)}))
    (out / f"{hours[3].name}.lock").touch()  # left by an older version
    held = EntryLock(out / f"{hours[0].name}.lock", "a build")
    held.acquire(timeout=1)
    try:
        removed = prune_initramfs(out, now=now)
        assert held.path.exists()  # a build in progress keeps its lock
    finally:
        held.release()
    # Kept: the three most recently used (in_grace, hours 0-1), the pinned one.
    assert sorted(removed) == sorted([hours[2], hours[3], zygote_only])
    assert in_grace.exists() and hours[0].exists() and hours[1].exists() and pinned.exists()
    assert not (out / f"{hours[3].name}.lock").exists()


def test_a_build_prunes_old_archives(tmp_path: Path) -> None:
    out = tmp_path / "cache/initramfs"
    old = [make_archive(out, f"{i:016x}", time.time() - (i + 1) * 3600) for i in range(4)]
    new = build_initramfs(fake_spec(tmp_path, b"agent-2"), out)
    assert sorted(out.glob("*.cpio")) == sorted([new, old[0], old[1]])


def test_a_corrupt_archive_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue #19 item 7: a same-size overwrite of a cached archive used to be booted."""
    out = tmp_path / "cache/initramfs"
    spec = fake_spec(tmp_path, b"agent-3")
    archive = build_initramfs(spec, out)
    good = archive.read_bytes()
    with open(archive, "r+b") as f:  # dd conv=notrunc: same size, other bytes
        f.seek(16)
        f.write(b"\xff" * 64)
    forget(archive)  # as another process sees it
    assert build_initramfs(spec, out) == archive
    assert archive.read_bytes() == good  # the writer is reproducible
    assert "its contents changed since it was built" in caplog.text
    assert sha256_file(archive) == read_record(archive).sha256


def test_digest_records_go_with_their_archives(tmp_path: Path) -> None:
    out = tmp_path / "cache/initramfs"
    old = [make_archive(out, f"{i:016x}", time.time() - (i + 1) * 3600) for i in range(4)]
    for archive in old:
        record_digest(archive)
        os.utime(record_path(archive), (archive.stat().st_mtime,) * 2)
    orphan = out / "initramfs-0123456789abcdef.cpio.digest"
    orphan.write_text("{}")
    new = build_initramfs(fake_spec(tmp_path, b"agent-4"), out)
    assert sorted(out.glob("*.cpio")) == sorted([new, old[0], old[1]])
    assert sorted(out.glob("*.digest")) == sorted(record_path(p) for p in (new, old[0], old[1]))
