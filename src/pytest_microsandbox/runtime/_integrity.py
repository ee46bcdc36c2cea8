"""Cache integrity: a digest recorded when an artifact is built, checked on use.

Every cached artifact (erofs images, initramfs archives, a snapshot entry's
memory file) has a *digest record*: a small JSON sidecar ``<file>.digest``
written when the file was built, holding its SHA-256, its size and a
*verified stamp*: the file's identity ``(st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns)`` the last time its contents were hashed and
matched. Hashing the multi-GB images on every create is not affordable
(~1.5 GB/s here with SHA-NI, ~350 MB/s from a cold disk), so a use compares
the stamp (one ``stat``) and hashes again only when it differs.

What the stamp catches: any change made through the filesystem. A write, a
truncate, a ``chmod`` or a copy over the file changes ``st_ctime``, which user
space cannot set back (``utime`` sets ctime to now); a rebuilt or copied file
has another inode. What it does not: a change below the filesystem (a bit
flipped on the medium, a raw write to the block device) leaves the stamp
alone; :func:`verify_file` with ``full=True`` (``python -m
pytest_microsandbox.runtime.images verify``, or ``$MICROSANDBOX_VERIFY_CACHE=1``
for every use) hashes regardless.

Because the stamp includes mtime and ctime, nothing may touch a stamped file
to mark it used: the caches mark use on the sidecar instead (see
:func:`mark_used`, :func:`last_used`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._keys import sha256_file

__all__ = [
    "DIGEST_SUFFIX",
    "VERIFY_ENV",
    "DigestRecord",
    "FileStamp",
    "IntegrityMismatch",
    "StaleStamp",
    "always_full",
    "forget",
    "last_used",
    "mark_used",
    "read_record",
    "record_digest",
    "record_path",
    "remove_record",
    "sha256_file",
    "verify_file",
]

#: The sidecar's suffix: ``<artifact>.digest``.
DIGEST_SUFFIX = ".digest"

#: Set to ``1`` to hash every cached artifact in full on every use (slow: for
#: a suspected disk problem; the stamp check is the default).
VERIFY_ENV = "MICROSANDBOX_VERIFY_CACHE"

#: File times come from the kernel's coarse clock (one tick, 1-10 ms): a write
#: in the same tick as the stamped ctime would leave it unchanged. A stamp is
#: only taken once the file's ctime is this much in the past ("racy git").
_SETTLE_NS = 20_000_000


class FileStamp(NamedTuple):
    """A file's identity as ``stat`` sees it; any change through the filesystem changes it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestRecord(BaseModel):
    """The sidecar ``<artifact>.digest``: what the file held when it was built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["sha256"] = "sha256"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    #: The file's identity when its contents last hashed to ``sha256``.
    verified: FileStamp | None = None


class IntegrityMismatch(Exception):
    """An artifact does not match its record, or has no usable record.

    Internal: each cache turns it into a rebuild or its own error
    (``ImageError``, ``SnapshotError``) naming :attr:`path`.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class StaleStamp(Exception):
    """The stamp differs and ``rehash=False``: hash the file, in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} must be hashed again")


# Files this process verified: path -> (stamp, sha256). A hit costs the one
# stat, not even the sidecar read.
_memo: dict[str, tuple[FileStamp, str]] = {}
_memo_lock = threading.Lock()


def record_path(artifact: Path) -> Path:
    """The sidecar of ``artifact``: ``<artifact>.digest``."""
    return artifact.with_name(artifact.name + DIGEST_SUFFIX)


def always_full() -> bool:
    """Whether ``$MICROSANDBOX_VERIFY_CACHE`` asks for a full hash on every use."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _write_record(artifact: Path, record: DigestRecord) -> None:
    """Atomically (a unique temporary file renamed over it): a concurrent writer
    of the same record, another process re-verifying, leaves one whole file.
    """
    target = record_path(artifact)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(record.model_dump_json())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _settled_stat(path: Path) -> os.stat_result:
    """``stat(path)`` taken at least :data:`_SETTLE_NS` after its ctime, so that
    any later write lands in a later clock tick and changes the ctime.
    """
    st = os.stat(path)
    wait_ns = st.st_ctime_ns + _SETTLE_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(wait_ns / 1e9)
        st = os.stat(path)
    return st


def record_digest(artifact: Path, sha256: str | None = None) -> DigestRecord:
    """Record ``artifact``'s digest (hashed unless given) and its current stamp.

    Call it once the file is final, under its final name (a rename changes
    ctime on some filesystems, ext4 included).
    """
    st = _settled_stat(artifact)
    if sha256 is None:
        sha256 = sha256_file(artifact)
    record = DigestRecord(sha256=sha256, size=st.st_size, verified=FileStamp.of(st))
    _write_record(artifact, record)
    _remember(artifact, record.verified, sha256)
    return record


def read_record(artifact: Path) -> DigestRecord:
    """:raises IntegrityMismatch: the sidecar is missing or unreadable."""
    sidecar = record_path(artifact)
    try:
        raw = sidecar.read_bytes()
    except FileNotFoundError:
        raise IntegrityMismatch(
            artifact, f"it has no digest record ({sidecar.name} is missing)"
        ) from None
    except OSError as exc:
        raise IntegrityMismatch(
            artifact, f"its digest record {sidecar} is unreadable: {exc}"
        ) from exc
    try:
        return DigestRecord.model_validate_json(raw)
    except ValidationError:
        raise IntegrityMismatch(artifact, f"its digest record {sidecar} is corrupt") from None


def _remember(artifact: Path, stamp: FileStamp | None, sha256: str) -> None:
    with _memo_lock:
        if stamp is None:
            _memo.pop(os.fspath(artifact), None)
        else:
            _memo[os.fspath(artifact)] = (stamp, sha256)


def forget(artifact: Path) -> None:
    """Drop what this process remembers of ``artifact`` (it was removed or rebuilt)."""
    _remember(artifact, None, "")


def verify_file(
    artifact: Path,
    *,
    expected: str | None = None,
    rehash: bool = True,
    full: bool = False,
) -> str:
    """Check ``artifact`` against its record; return its SHA-256.

    A stamp equal to the recorded one (or to what this process last verified)
    costs one ``stat``. Otherwise, or with ``full`` (or
    ``$MICROSANDBOX_VERIFY_CACHE``), the file is hashed; a match renews the
    stamp in the sidecar (unless the cache is read-only for us), a mismatch
    raises. ``expected``: the digest must also equal this one (recorded
    elsewhere, e.g. by the snapshot entry that boots from the file).

    :raises FileNotFoundError: ``artifact`` does not exist.
    :raises IntegrityMismatch: no usable record, wrong size, wrong contents, or
        not ``expected``.
    :raises StaleStamp: the file must be hashed and ``rehash`` is false.
    """
    st = os.stat(artifact)
    stamp = FileStamp.of(st)
    full = full or always_full()
    if not full:
        memo = _memo.get(os.fspath(artifact))
        if memo is not None and memo[0] == stamp:
            return _expect(artifact, memo[1], expected)
    record = read_record(artifact)
    if record.size != st.st_size:
        forget(artifact)
        raise IntegrityMismatch(
            artifact, f"it has {st.st_size} bytes, {record.size} were recorded when it was built"
        )
    if record.verified == stamp and not full:
        _remember(artifact, stamp, record.sha256)
        return _expect(artifact, record.sha256, expected)
    if not rehash:
        raise StaleStamp(artifact)
    stamp = FileStamp.of(_settled_stat(artifact))
    actual = sha256_file(artifact)
    if actual != record.sha256:
        forget(artifact)
        raise IntegrityMismatch(
            artifact,
            f"its contents changed since it was built (sha256 {actual[:16]}…, "
            f"{record.sha256[:16]}… recorded)",
        )
    # The stamp as of before the hash: a change during it shows on the next use.
    if record.verified != stamp:
        # A cache shared read-only with this user: verified, not renewed.
        with contextlib.suppress(OSError):
            _write_record(artifact, record.model_copy(update={"verified": stamp}))
    _remember(artifact, stamp, actual)
    return _expect(artifact, actual, expected)


def _expect(artifact: Path, sha256: str, expected: str | None) -> str:
    if expected is not None and sha256 != expected:
        raise IntegrityMismatch(
            artifact,
            f"its contents (sha256 {sha256[:16]}…) are not the ones recorded "
            f"({expected[:16]}…): it was rebuilt or replaced since",
        )
    return sha256


def mark_used(artifact: Path) -> bool:
    """Mark ``artifact`` used by touching its sidecar (never the file: that would
    change the stamp); whether the sidecar exists.
    """
    try:
        os.utime(record_path(artifact))
    except FileNotFoundError:
        return False
    except OSError:
        return record_path(artifact).exists()  # a read-only cache: still counts
    return True


def last_used(artifact: Path, st: os.stat_result | None = None) -> float:
    """When ``artifact`` was last used: the later of its mtime and its sidecar's.

    :raises FileNotFoundError: ``artifact`` is gone.
    """
    mtime = (st or os.stat(artifact)).st_mtime
    try:
        return max(mtime, os.stat(record_path(artifact)).st_mtime)
    except OSError:
        return mtime


def remove_record(artifact: Path) -> None:
    """Delete ``artifact``'s sidecar (with the artifact, or orphaned) and forget it."""
    forget(artifact)
    record_path(artifact).unlink(missing_ok=True)
