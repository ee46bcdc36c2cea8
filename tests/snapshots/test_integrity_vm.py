"""Corrupt cache files under real VMs (issue #19, item 7): a template whose state
file or whose disk image was overwritten in place is rebuilt once and the create
succeeds with the right contents; clones never change the template's memory file.

A private cache in tmp_path (the provisioned kernel, agent and launcher are
shared through symlinks) and a busybox directory image: nothing in the user's
cache is touched, nothing large is imaged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import Sandbox, SandboxConfig
from pytest_microsandbox.runtime._integrity import FileStamp, read_record, sha256_file
from pytest_microsandbox.runtime.paths import cache_dir
from pytest_microsandbox.snapshots import _store, close_pools

pytestmark = pytest.mark.vm

PATTERN = b"integrity-" * 6554  # 64 KiB: in data blocks of the image, not inline


@pytest.fixture
def private_cache(tmp_path: Path) -> Path:
    shared = cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("kernel", "agent", "bin"):
        if (shared / name).exists():
            (cache / name).symlink_to(shared / name)
    return cache


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed on the host (apt-get install busybox-static)")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    (root / "data.bin").write_bytes(PATTERN)
    return root


def overwrite_in_place(path: Path, offset: int, length: int) -> None:
    """The issue's ``dd conv=notrunc``: random bytes, the same size."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(length), offset)
    finally:
        os.close(fd)


def test_corrupt_state_and_layer_are_rebuilt_once(private_cache: Path, rootfs: Path) -> None:
    config = SandboxConfig(
        name="integrity", image=str(rootfs), memory=256, accel="tcg", cache_dir=private_cache
    )

    def create_and_read() -> tuple[Path, bytes]:
        async def main() -> tuple[Path, bytes]:
            try:
                async with await Sandbox.create(config) as sb:
                    assert sb.session.origin is not None
                    return sb.session.origin.path, await sb.fs().read("/data.bin")
            finally:
                await close_pools()  # the next create starts afresh, as a new process

        return anyio.run(main)

    entry, data = create_and_read()
    assert data == PATTERN
    memory, state = entry / _store.MEMORY, entry / _store.STATE
    # Clones map the memory file privately and never write it: its verified
    # stamp (mtime and ctime included) still holds after a clone ran.
    assert read_record(memory).verified == FileStamp.of(memory.stat())

    # A same-size corrupt state file used to fail every create with
    # "QMP query-migrate failed ... Disconnected", nothing rebuilt.
    overwrite_in_place(state, state.stat().st_size // 2, 4096)
    corrupt = sha256_file(state)
    again, data = create_and_read()
    assert again == entry and data == PATTERN
    digests = json.loads((entry / _store.INTEGRITY).read_text())
    assert sha256_file(state) == digests["state"] != corrupt

    # 8 KiB overwritten in the image under /data.bin used to boot and read
    # other bytes, no error: the image is rebuilt, then the template (its
    # recorded input digest no longer matches).
    meta = json.loads((entry / _store.META).read_text())
    (disk,) = [Path(d["path"]) for d in meta["disks"] if "dir-" in Path(d["path"]).name]
    offset = disk.read_bytes().find(PATTERN[:4096])
    assert offset > 0
    overwrite_in_place(disk, offset, 8192)
    built = json.loads((entry / _store.INTEGRITY).read_text())
    again, data = create_and_read()
    assert data == PATTERN
    assert sha256_file(disk) == read_record(disk).sha256
    assert json.loads((entry / _store.INTEGRITY).read_text()) != built  # template rebuilt
