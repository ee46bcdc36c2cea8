"""A corrupt cached image is caught and rebuilt (issue #19, item 7), on a small
directory image in a temporary cache: real mkfs.erofs, no VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._integrity import forget, read_record, record_path, sha256_file
from pytest_microsandbox.runtime.images import __main__ as cli
from pytest_microsandbox.runtime.images import resolve_root_layers
from pytest_microsandbox.runtime.paths import CACHE_DIR_ENV

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.erofs") and shutil.which("fsck.erofs")),
    reason="erofs-utils (mkfs.erofs, fsck.erofs) not installed",
)

PATTERN = b"integrity-" * 6554  # 64 KiB: stored in data blocks, not inline


def make_rootfs(root: Path) -> Path:
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (root / d).mkdir(parents=True)
    (root / "etc/data.bin").write_bytes(PATTERN)
    (root / "etc/hostname").write_text("guest\n")
    return root


def dd_over(image: Path, offset: int, length: int) -> None:
    """The issue's reproduction: random bytes over part of the image, same size."""
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={image}", "bs=1", f"seek={offset}", f"count={length}",
         "conv=notrunc", "status=none"],
        check=True,
    )  # fmt: skip


def test_a_corrupted_layer_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    cache = tmp_path / "cache"
    (layer,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    image = layer.path
    recorded = read_record(image)
    assert recorded.sha256 == sha256_file(image)
    original = image.read_bytes()
    offset = original.find(PATTERN[:4096])
    assert offset > 0
    size = image.stat().st_size
    dd_over(image, offset, 8192)
    assert image.stat().st_size == size
    corrupt = sha256_file(image)

    forget(image)  # as a new process would see it (this one remembers the build)
    (again,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert again.path == image
    assert "its contents changed since it was built" in caplog.text
    assert "rebuilding it" in caplog.text
    assert sha256_file(image) != corrupt
    assert sha256_file(image) == read_record(image).sha256
    # The file's data is whole again (mkfs lays the same tree out the same way).
    assert image.read_bytes()[offset : offset + 8192] == original[offset : offset + 8192]
    subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)


def test_an_image_without_a_digest_record_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An image built by a version that recorded no digests cannot be trusted."""
    rootfs = make_rootfs(tmp_path / "rootfs")
    cache = tmp_path / "cache"
    (layer,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    record_path(layer.path).unlink()
    forget(layer.path)
    (again,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert "has no digest record" in caplog.text and "rebuilding it" in caplog.text
    assert read_record(again.path).sha256 == sha256_file(again.path)


def test_verify_command_hashes_everything_and_names_the_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A change below the filesystem keeps the stamp: ``verify`` hashes regardless."""
    rootfs = make_rootfs(tmp_path / "rootfs")
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache))
    (layer,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert cli.main(["verify"]) == 0
    assert "1 files hashed" in capsys.readouterr().out
    st = layer.path.stat()
    dd_over(layer.path, st.st_size // 2, 4096)
    # Simulate a bit flip below the filesystem: the stamp still matches.
    record = read_record(layer.path)
    stamp = record.verified._replace(ctime_ns=layer.path.stat().st_ctime_ns)  # type: ignore[union-attr]
    stamp = stamp._replace(mtime_ns=layer.path.stat().st_mtime_ns)
    record_path(layer.path).write_text(
        record.model_copy(update={"verified": stamp}).model_dump_json()
    )
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {layer.path}" in out and "1 corrupt" in out
    assert os.path.exists(layer.path)  # left for the next use to rebuild
