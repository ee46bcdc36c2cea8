"""The on-disk snapshot store: one directory per template key or snapshot name.

Layout under ``<cache>/snapshots/``::

    templates/<key>/{memory,state,meta.json,  built once per key, under <key>.lock
                     memory.digest,integrity.json}
    named/<name>/{...the same}                 sandbox.snapshot(name); zygotes are built
                                               under <name>.lock
    spare.img                                  backing of the spare virtio-blk device

A ``<entry>.lock`` file (see :mod:`pytest_microsandbox.runtime._locks`) is deleted with its entry,
and :func:`prune` sweeps those whose entry is gone, unless a build holds them.

Every entry is built in a ``.tmp-*`` sibling and renamed into place, so a
build killed halfway is never seen under its final name. Entries are checked
on use (:func:`check_entry`); ``last used`` is the directory's mtime, touched
on every restore, which is what :func:`prune` orders by.

Integrity: :func:`publish` records the SHA-256 of ``meta.json``, ``state``
and what the entry boots from (initramfs, disk images) in ``integrity.json``,
and the memory file's digest with its verified stamp in ``memory.digest`` (see
:mod:`pytest_microsandbox.runtime._integrity`). On use, the two small files
are hashed in full (~0.1 ms), the memory file and the inputs cost a ``stat``
each while their stamps hold. A clone maps the memory file privately and never
writes it, so its stamp holds across restores.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from pydantic import ValidationError

from ..runtime._cache import LOCK_SUFFIX, CacheEntry, CacheStore
from ..runtime._exceptions import SnapshotError, SnapshotLockTimeoutError, SnapshotNotFoundError
from ..runtime._integrity import (
    IntegrityMismatch,
    StaleStamp,
    record_digest,
    sha256_file,
    verify_file,
)
from ..runtime._locks import LOCK_TIMEOUT_ENV, remove_idle_lock_files
from ..runtime.paths import cache_dir
from ..runtime.qemu import find_qemu, qemu_version
from ._model import FORMAT_VERSION, EntryDigests, SnapshotMeta

__all__ = [
    "INTEGRITY",
    "MEMORY",
    "META",
    "STATE",
    "Entry",
    "SnapshotInfo",
    "acheck_entry",
    "check_entry",
    "check_free_space",
    "check_name",
    "clean_stale_temps",
    "current_qemu_version",
    "disk_error",
    "entry_lock_path",
    "get_snapshot",
    "list_snapshots",
    "named_root",
    "prune",
    "publish",
    "recorded_inputs",
    "remove_snapshot",
    "seal",
    "spare_disk",
    "store_root",
    "templates_root",
    "touch",
    "write_meta",
]

MEMORY = "memory"
STATE = "state"
META = "meta.json"
INTEGRITY = "integrity.json"

logger = logging.getLogger("pytest_microsandbox.snapshots")

_REBUILD_HINT = (
    "this entry cannot be used: take the snapshot again (templates and the "
    "plugin's zygotes are rebuilt on their own)"
)
#: Capacity of the spare disk (a sparse file: no blocks used). The guest reads
#: it once, at boot, so an image volume attached to a clone must fit in it: far
#: larger than any image, reads past an image's own end are never made.
SPARE_DISK_MIB = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Entry:
    """A published snapshot directory and its metadata."""

    path: Path
    meta: SnapshotMeta

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    @property
    def state(self) -> Path:
        return self.path / STATE


@dataclass(frozen=True)
class SnapshotInfo:
    """What :func:`list_snapshots` reports about one entry."""

    name: str
    kind: str
    path: Path
    created: float
    last_used: float
    disk_bytes: int  # blocks actually allocated (memory files are sparse)
    memory_mib: int


def store_root(cache: Path | None = None) -> Path:
    root = cache_dir(cache) / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    return root


def templates_root(cache: Path | None = None) -> Path:
    path = store_root(cache) / "templates"
    path.mkdir(exist_ok=True)
    return path


def named_root(cache: Path | None = None) -> Path:
    path = store_root(cache) / "named"
    path.mkdir(exist_ok=True)
    return path


def _cache_store(root: Path) -> CacheStore:
    """The entries of ``root`` (templates or named) as a cache: directories, last
    used when their mtime says, built under ``<entry>.lock``.
    """
    return CacheStore(
        root,
        "*",
        f"snapshot entry in {root}",
        directories=True,
        lock_timeout_env=LOCK_TIMEOUT_ENV,
        lock_error=SnapshotLockTimeoutError,
        logger=logger,
    )


#: The cache file remembering QEMU's version line per binary (:func:`current_qemu_version`).
QEMU_VERSION_FILE = "qemu-version"


@functools.lru_cache(maxsize=1)
def current_qemu_version() -> str:
    """QEMU's version line (a snapshot made by another QEMU is refused), remembered
    in the cache per binary: asking QEMU starts a process, ~15 ms on the way to
    a run's first restore. The binary's path, inode, size and times name it (an
    upgrade replaces the file); anything unreadable asks QEMU again.
    """
    try:
        binary = find_qemu()
        st = os.stat(binary)
    except Exception:  # no QEMU: as qemu_version() says it
        return qemu_version()
    stamp = f"{binary}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    memo = cache_dir() / QEMU_VERSION_FILE
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(memo.read_text())
        if (
            isinstance(known, dict)
            and known.get("stamp") == stamp
            and isinstance(known.get("version"), str)
        ):
            return str(known["version"])
    version = qemu_version(binary)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=f".tmp-{QEMU_VERSION_FILE}-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"stamp": stamp, "version": version}))
            os.replace(tmp, memo)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return version


def entry_lock_path(entry: Path) -> Path:
    """The build lock of the entry directory ``entry``: ``<entry>.lock`` beside it."""
    return entry.with_name(entry.name + LOCK_SUFFIX)


def check_name(name: str) -> str:
    """:raises SnapshotError: ``name`` is not a valid snapshot name."""
    if not _NAME_RE.match(name):
        raise SnapshotError(
            f"invalid snapshot name {name!r}: use 1-100 letters, digits, '_', '.', '-'"
        )
    return name


def spare_disk(cache: Path | None = None) -> Path:
    """A sparse, all-zero image backing the spare virtio-blk device (made once)."""
    path = store_root(cache) / "spare.img"
    if path.exists() and path.stat().st_size == SPARE_DISK_MIB << 20:
        return path
    tmp = path.with_name(f".tmp-spare-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.truncate(SPARE_DISK_MIB << 20)
    os.replace(tmp, path)
    return path


async def acheck_entry(path: Path) -> Entry:
    """:func:`check_entry` for async callers: a file whose verified stamp no
    longer holds is hashed in a worker thread, not on the event loop.
    """
    try:
        return check_entry(path, rehash=False)
    except StaleStamp:
        return await anyio.to_thread.run_sync(check_entry, path)


def check_entry(path: Path, *, rehash: bool = True) -> Entry:
    """Read and verify an entry: metadata, format, QEMU version, file sizes,
    and the digests recorded when it was made (``meta.json`` and ``state`` in
    full, the memory file and what the entry boots from by their verified
    stamps, hashed again when a stamp no longer holds).

    :raises SnapshotNotFoundError: there is no entry at ``path``.
    :raises SnapshotError: the entry is broken, corrupt (the message names the
        file) or was made by another QEMU.
    :raises StaleStamp: ``rehash`` is false and a file must be hashed again
        (:func:`acheck_entry` does that in a worker thread).
    """
    meta_path = path / META
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        raise SnapshotNotFoundError(f"no snapshot at {path}") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {meta_path}: {exc}") from exc
    # The format first: an older entry also lacks fields this version requires.
    with contextlib.suppress(ValueError, AttributeError):
        found = json.loads(raw).get("format")
        if found != FORMAT_VERSION:
            raise SnapshotError(
                f"{path} has format {found}, this version reads {FORMAT_VERSION} (the "
                "store layout or the clone device set changed): take the snapshot again "
                "(templates and the plugin's zygotes are rebuilt on their own)"
            )
    digests = _read_digests(path)
    if hashlib.sha256(raw).hexdigest() != digests.meta:
        raise _corrupt(path, IntegrityMismatch(meta_path, "its contents changed since it was made"))
    try:
        meta = SnapshotMeta.model_validate_json(raw)
    except ValidationError as exc:
        raise SnapshotError(f"{meta_path} is corrupt: {exc.errors()[0]['msg']}") from None
    qemu = current_qemu_version()
    if meta.qemu_version != qemu:
        raise SnapshotError(f"{path} was made by {meta.qemu_version!r}, this host has {qemu!r}")
    expect = [
        (path / MEMORY, meta.memory_mib << 20),
        (path / STATE, meta.state_size),
        (Path(meta.kernel), meta.kernel_size),
        (Path(meta.initrd), meta.initrd_size),
        *((Path(d.path), d.size) for d in meta.disks),
    ]
    for file, size in expect:
        try:
            actual = file.stat().st_size
        except OSError:
            raise SnapshotError(f"{path}: {file} is missing") from None
        if actual != size:
            raise SnapshotError(f"{path}: {file} has {actual} bytes, expected {size}")
    _check_digests(path, meta, digests, rehash=rehash)
    return Entry(path, meta)


def _read_digests(path: Path) -> EntryDigests:
    try:
        return EntryDigests.model_validate_json((path / INTEGRITY).read_bytes())
    except FileNotFoundError:
        raise SnapshotError(
            f"{path} has no {INTEGRITY} (it was made by a version that recorded no "
            f"digests, or its build was cut short); {_REBUILD_HINT}"
        ) from None
    except (OSError, ValidationError) as exc:
        unreadable = IntegrityMismatch(path / INTEGRITY, f"it cannot be read ({exc})")
        raise _corrupt(path, unreadable) from None


def _corrupt(path: Path, exc: IntegrityMismatch) -> SnapshotError:
    logger.warning("snapshot entry %s: %s", path, exc)
    return SnapshotError(f"{path}: {exc.path} is corrupt: {exc.reason}; {_REBUILD_HINT}")


def _check_digests(path: Path, meta: SnapshotMeta, digests: EntryDigests, *, rehash: bool) -> None:
    state = path / STATE
    try:
        if sha256_file(state) != digests.state:
            raise IntegrityMismatch(state, "its contents changed since it was made")
        verify_file(path / MEMORY, rehash=rehash)
        for input_path in (meta.initrd, *(d.path for d in meta.disks)):
            expected = digests.inputs.get(input_path)
            if expected is None:
                raise IntegrityMismatch(Path(input_path), f"{INTEGRITY} has no digest of it")
            verify_file(Path(input_path), expected=expected, rehash=rehash)
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path}: {exc.filename} is missing") from None
    except IntegrityMismatch as exc:
        raise _corrupt(path, exc) from None


def recorded_inputs(entry: Path) -> dict[str, str] | None:
    """The input digests ``entry`` recorded (None if it has no readable record):
    what a snapshot of one of its clones booted from, whatever is on disk now.
    """
    try:
        return dict(EntryDigests.model_validate_json((entry / INTEGRITY).read_bytes()).inputs)
    except (OSError, ValidationError):
        return None


def seal(directory: Path, inputs: Mapping[str, str] | None = None) -> None:
    """Record the digests of a fully written entry (before :func:`publish` renames
    it): ``memory.digest`` for the memory file, ``integrity.json`` for the rest.

    ``inputs``: the digests of the files it boots from as its guest read them
    (a snapshot inherits its origin's); by default the files' current ones,
    checked against their own records.

    :raises SnapshotError: a file the entry boots from is corrupt or has no record.
    """
    raw = (directory / META).read_bytes()
    meta = SnapshotMeta.model_validate_json(raw)
    wanted = (meta.initrd, *(d.path for d in meta.disks))
    if inputs is not None and all(p in inputs for p in wanted):
        inputs = {p: inputs[p] for p in wanted}
    else:
        inputs = {}
        for input_path in wanted:
            try:
                inputs[input_path] = verify_file(Path(input_path))
            except (OSError, IntegrityMismatch) as exc:
                raise SnapshotError(f"cannot record the digest of {input_path}: {exc}") from exc
    record_digest(directory / MEMORY)
    digests = EntryDigests(
        meta=hashlib.sha256(raw).hexdigest(),
        state=sha256_file(directory / STATE),
        inputs=inputs,
    )
    with open(directory / INTEGRITY, "w") as f:
        f.write(digests.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())


def write_meta(directory: Path, meta: SnapshotMeta) -> None:
    target = directory / META
    with open(target, "w") as f:
        f.write(meta.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path, inputs: Mapping[str, str] | None = None) -> None:
    """Record the digests of a fully written ``tmp`` entry (:func:`seal`, with
    ``inputs``; hashes the memory file, ~0.7 s per GiB: call it in a worker
    thread) and rename it to ``final`` (replacing a broken one).
    """
    seal(tmp, inputs)
    for name in (MEMORY, STATE):
        fd = os.open(tmp / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if final.exists():
        # Only reached under the entry's lock, after check_entry found it broken.
        graveyard = _cache_store(final.parent).temp_path(f"old-{final.name}")
        os.replace(final, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def clean_stale_temps(root: Path) -> None:
    """Remove ``.tmp-*`` directories left by builds whose process is gone."""
    _cache_store(root).sweep_temps()


def disk_error(
    exc: BaseException, where: Path, qemu_status: int | None = None
) -> SnapshotError | None:
    """A clear SnapshotError if ``exc`` (or its cause) is a full disk, else None.

    ``qemu_status`` is the exit status of a QEMU whose guest memory is a file
    under ``where``: killed by SIGBUS is how its write to a page the full
    filesystem cannot allocate ends, before any error reaches us.
    """
    hint = "nothing was kept (free space, or move the cache with $MICROSANDBOX_CACHE_DIR)"
    if qemu_status == -signal.SIGBUS:
        return SnapshotError(
            f"QEMU was killed by SIGBUS writing guest memory to a file under {where}: "
            f"that disk is most likely full; {hint}"
        )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return SnapshotError(f"the disk holding {where} is full; {hint}")
        seen = seen.__cause__ or seen.__context__
    return None


def check_free_space(where: Path, needed: int) -> None:
    """:raises SnapshotError: ``where``'s filesystem has less than ``needed`` bytes free."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise SnapshotError(
            f"not enough disk space for a snapshot in {where}: {free >> 20} MiB free, "
            f"{needed >> 20} MiB needed (free space, prune the cache, or move it with "
            "$MICROSANDBOX_CACHE_DIR)"
        )


def touch(path: Path) -> None:
    """Mark the entry ``path`` used (its directory's mtime: what :func:`prune` orders by)."""
    _cache_store(path.parent).mark_used(path)


def _entries(cache: Path | None, kind: str | None = None) -> list[tuple[str, CacheEntry]]:
    out: list[tuple[str, CacheEntry]] = []
    for k, root in (("template", templates_root(cache)), ("snapshot", named_root(cache))):
        if kind is None or k == kind:
            entries = _cache_store(root).scan()
            out += [(k, e) for e in sorted(entries, key=lambda e: e.path.name)]
    return out


def _info(kind: str, entry: CacheEntry) -> SnapshotInfo | None:
    try:
        meta = SnapshotMeta.model_validate_json((entry.path / META).read_bytes())
    except (OSError, ValidationError):
        return None
    return SnapshotInfo(
        name=entry.path.name,
        kind=kind,
        path=entry.path,
        created=meta.created,
        last_used=entry.last_used,
        disk_bytes=entry.disk_bytes,
        memory_mib=meta.memory_mib,
    )


def list_snapshots(cache: Path | None = None, kind: str | None = None) -> list[SnapshotInfo]:
    """Templates and named snapshots in the store (``kind``: ``template``/``snapshot``)."""
    infos = [_info(k, e) for k, e in _entries(cache, kind)]
    return [i for i in infos if i is not None]


def get_snapshot(name: str, cache: Path | None = None) -> Entry:
    """A named snapshot, checked.

    :raises SnapshotNotFoundError: there is none called ``name``.
    :raises SnapshotError: it is broken.
    """
    return check_entry(named_root(cache) / check_name(name))


def remove_snapshot(name: str, cache: Path | None = None) -> None:
    """Delete a named snapshot (renamed away first, so a concurrent restore sees
    either the whole entry or nothing) and its lock file unless a build holds it.

    :raises SnapshotNotFoundError: there is none called ``name``.
    """
    path = named_root(cache) / check_name(name)
    if not path.is_dir():
        raise SnapshotNotFoundError(f"no snapshot named {name!r} in {path.parent}")
    _cache_store(path.parent).remove(path)


def prune(
    cache: Path | None = None,
    *,
    max_age: float | None = None,
    max_bytes: int | None = None,
    kind: str | None = None,
    prefix: str | None = None,
    min_idle: float = 0.0,
) -> list[str]:
    """Delete entries unused for ``max_age`` seconds, then the least recently
    used until the store holds at most ``max_bytes``. Returns the names removed.
    Entries used in the last ``min_idle`` seconds are kept whatever the limits
    (automatic pruning passes the cache-wide grace period, ``runtime._cache.GRACE_S``).

    A clone maps its template's memory file; deleting the entry unlinks the
    file but running clones keep their mapping, so pruning is safe while they run.
    The lock files of removed entries go too, and orphan lock files of entries
    that no longer exist, except those a build in progress holds.
    """
    entries = [e for k, e in _entries(cache, kind) if _info(k, e) is not None]
    if prefix is not None:
        entries = [e for e in entries if e.path.name.startswith(prefix)]
    # Both kinds remove the same way (a directory renamed away): one store does.
    result = _cache_store(templates_root(cache)).prune(
        entries=entries, max_age=max_age, max_bytes=max_bytes, grace=min_idle
    )
    # Zygote locks used to live in the store's root, where no entry ever is.
    remove_idle_lock_files(store_root(cache).glob(f"*{LOCK_SUFFIX}"))
    for root in (templates_root(cache), named_root(cache)):
        _cache_store(root).sweep(temps=False)
    return [e.path.name for e in result.removed]
