"""Digest records and verified stamps (runtime/_integrity.py), on real files, no VM."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import _integrity
from pytest_microsandbox.runtime._integrity import (
    VERIFY_ENV,
    FileStamp,
    IntegrityMismatch,
    StaleStamp,
    forget,
    last_used,
    mark_used,
    read_record,
    record_digest,
    record_path,
    sha256_file,
    verify_file,
)

DATA = os.urandom(3 << 20)  # more than one read chunk


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every full hash :func:`verify_file` makes, by path."""
    seen: list[Path] = []
    real = _integrity.sha256_file

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(_integrity, "sha256_file", counting)
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    return seen


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "layer.erofs"
    path.write_bytes(DATA)
    record_digest(path)
    return path


def corrupt_in_place(path: Path, offset: int, data: bytes) -> None:
    """What the issue did: ``dd conv=notrunc`` over part of the file (same size)."""
    subprocess.run(
        ["dd", f"of={path}", "bs=1", f"seek={offset}", "conv=notrunc", "status=none"],
        input=data,
        check=True,
    )


def test_sha256_file_is_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(DATA)
    assert sha256_file(path) == hashlib.sha256(DATA).hexdigest()


def test_a_matching_stamp_costs_no_hash(artifact: Path, hashes: list[Path]) -> None:
    record = read_record(artifact)
    assert record.sha256 == hashlib.sha256(DATA).hexdigest() and record.size == len(DATA)
    assert record.verified == FileStamp.of(artifact.stat())
    assert verify_file(artifact) == record.sha256  # this process's memo
    forget(artifact)
    assert verify_file(artifact) == record.sha256  # the sidecar's stamp, as another process
    assert hashes == []


def test_same_size_overwrite_is_caught_even_with_mtime_set_back(
    artifact: Path, hashes: list[Path]
) -> None:
    before = artifact.stat()
    corrupt_in_place(artifact, 1 << 20, b"\0" * (8 << 10))
    os.utime(artifact, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime cannot be set back
    assert artifact.stat().st_size == before.st_size
    with pytest.raises(IntegrityMismatch, match="contents changed") as info:
        verify_file(artifact)
    assert info.value.path == artifact and hashes == [artifact]
    with pytest.raises(IntegrityMismatch):  # and stays refused: nothing renewed the stamp
        verify_file(artifact)


def test_an_unchanged_touched_file_is_hashed_once_and_its_stamp_renewed(
    artifact: Path, hashes: list[Path]
) -> None:
    os.utime(artifact)  # a new mtime and ctime, the same contents
    verify_file(artifact)
    assert hashes == [artifact]
    assert read_record(artifact).verified == FileStamp.of(artifact.stat())
    forget(artifact)
    verify_file(artifact)
    assert hashes == [artifact]  # the renewed stamp holds: no second hash


def test_rehash_false_leaves_the_hash_to_the_caller(artifact: Path, hashes: list[Path]) -> None:
    os.utime(artifact)
    with pytest.raises(StaleStamp):
        verify_file(artifact, rehash=False)
    assert hashes == []
    verify_file(artifact)  # what acheck_entry does next, in a worker thread


def test_full_and_the_env_var_hash_regardless(
    artifact: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    verify_file(artifact, full=True)
    monkeypatch.setenv(VERIFY_ENV, "1")
    verify_file(artifact)
    assert hashes == [artifact, artifact]


def test_missing_corrupt_or_wrong_size_records_are_refused(artifact: Path) -> None:
    corrupt_in_place(artifact, 0, b"x")  # changes the stamp, so the record is read
    sidecar = record_path(artifact)
    saved = sidecar.read_bytes()
    sidecar.unlink()
    with pytest.raises(IntegrityMismatch, match=r"no digest record \(layer.erofs.digest"):
        verify_file(artifact)
    sidecar.write_text("{garbage")
    with pytest.raises(IntegrityMismatch, match=r"digest record .* is corrupt"):
        verify_file(artifact)
    sidecar.write_bytes(saved)
    with open(artifact, "ab") as f:
        f.write(b"more")
    with pytest.raises(IntegrityMismatch, match=f"{len(DATA) + 4} bytes, {len(DATA)} were"):
        verify_file(artifact)
    with pytest.raises(FileNotFoundError):
        verify_file(artifact.with_name("absent"))


def test_expected_digest_recorded_elsewhere(artifact: Path) -> None:
    digest = read_record(artifact).sha256
    assert verify_file(artifact, expected=digest) == digest
    with pytest.raises(IntegrityMismatch, match="rebuilt or replaced since"):
        verify_file(artifact, expected="0" * 64)


def test_use_is_marked_on_the_record_never_on_the_file(artifact: Path, hashes: list[Path]) -> None:
    stamp = FileStamp.of(artifact.stat())
    old = artifact.stat().st_mtime - 3600
    os.utime(record_path(artifact), (old, old))
    assert last_used(artifact) == artifact.stat().st_mtime
    assert mark_used(artifact)
    assert FileStamp.of(artifact.stat()) == stamp
    assert last_used(artifact) >= artifact.stat().st_mtime
    forget(artifact)
    verify_file(artifact)
    assert hashes == []
    assert not mark_used(artifact.with_name("absent"))


def test_record_is_plain_json(artifact: Path) -> None:
    raw = json.loads(record_path(artifact).read_text())
    assert raw["algorithm"] == "sha256" and len(raw["verified"]) == 5
