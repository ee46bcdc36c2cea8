"""The one model of a cache directory, shared by the snapshot store (templates,
zygotes, named snapshots), the root-image cache and the initramfs cache.

A :class:`CacheStore` is a directory of *entries* (files, or directories for
the snapshot store). Each entry has

* a **last use**: the entry's mtime, or, for a file with a digest record
  (``<file>.digest``, :mod:`._integrity`), the later of its mtime and the
  record's: the file itself is never touched once built, that would change its
  verified stamp. :meth:`CacheStore.mark_used` sets it to now;
* a **size**: blocks actually allocated (memory files are sparse);
* a **pin**: never evicted automatically. Named user snapshots pin what they
  boot from (it cannot be rebuilt the way they saw it); see :func:`snapshot_refs`;
* a **lock**: an :class:`~._locks.EntryLock` on ``<name>.lock`` beside it, held
  while it is built (waited for without blocking an event loop), deleted with
  the entry, and swept when idle and its entry is gone;
* an **atomic publish**: built under a temporary name (:meth:`CacheStore.temp_path`,
  ``.tmp-<name>-pid<PID>-<random>``), renamed into place when complete, so a
  build killed halfway is never seen under its final name. Temporaries whose
  process is dead are swept.

:meth:`CacheStore.prune` evicts by last use, with each store's own policy as
parameters: an age limit, the N most recent of a set kept, a byte budget. What
it never evicts: pinned entries, the ``keep`` ones (just built) and any entry
used within the **grace period** :data:`GRACE_S`.

The snapshot package imports the runtime, so the runtime must not import it
back: the image and initramfs caches read the snapshot store's ``meta.json``
files raw (:func:`snapshot_refs`) to know what snapshot entries boot from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import LockTimeoutError
from ._integrity import (
    DIGEST_SUFFIX,
    IntegrityMismatch,
    mark_used,
    record_digest,
    remove_record,
    verify_file,
)
from ._integrity import last_used as record_last_used
from ._locks import (
    CACHE_LOCK_TIMEOUT_ENV,
    EntryLock,
    hold,
    remove_idle_lock_files,
    remove_lock_file,
)

__all__ = [
    "GRACE_S",
    "LOCK_SUFFIX",
    "TEMP_PREFIX",
    "CacheEntry",
    "CacheStore",
    "FileId",
    "PruneResult",
    "SnapshotEntryRef",
    "SnapshotRefs",
    "file_id",
    "snapshot_entries",
    "snapshot_refs",
]

#: Seconds after its last use during which no cache entry is evicted by a
#: budget, an age limit or a keep-the-N-most-recent rule: another process may
#: have just found it (checked a template exists, been handed an image or an
#: archive) and be about to open it. A process that has it open already keeps
#: reading it after an unlink; one about to open it would fail. Much longer
#: than the 60 s a process reuses a resolved image layer without marking it
#: used again (``images._resolve.STABLE_LAYER_TTL``). Temporaries that name no
#: live process are swept once this old.
GRACE_S = 600.0

#: ``<entry>.lock``: the build lock of an entry (or of a group, e.g. an image family).
LOCK_SUFFIX = ".lock"
#: Temporaries (builds and removals in progress) start with this; entry names never do.
TEMP_PREFIX = ".tmp-"
#: The process a temporary belongs to: the last ``-pid<PID>-`` (an entry's name may hold one).
_TEMP_PID = re.compile(r"-pid(\d+)-[^-]*$")

FileId = tuple[int, int]  # (st_dev, st_ino)


def file_id(path: str | Path) -> FileId | None:
    """``(st_dev, st_ino)`` of ``path`` (symlinks followed), None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class CacheEntry:
    """One entry of a cache, as :meth:`CacheStore.prune` weighs it."""

    path: Path
    #: Blocks actually allocated (``st_blocks * 512``; summed over a directory's files).
    disk_bytes: int
    #: When it was last used (see :meth:`CacheStore.last_used`).
    last_used: float
    #: Never evicted automatically (a named snapshot needs it).
    pinned: bool = False


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`CacheStore.prune` did: the entries it removed and the totals around it."""

    removed: tuple[CacheEntry, ...]
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class CacheStore:
    """A cache directory ``root`` whose entries are the names matching ``pattern``
    (a glob; names starting with ``.`` never are), files or, with ``directories``,
    directories. ``what`` names an entry in messages ("cached image").

    Lock timeouts raise ``lock_error`` naming ``lock_timeout_env``.
    """

    root: Path
    pattern: str
    what: str
    directories: bool = False
    lock_timeout_env: str = CACHE_LOCK_TIMEOUT_ENV
    lock_error: type[LockTimeoutError] = LockTimeoutError
    logger: logging.Logger = field(default=logging.getLogger("pytest_microsandbox.cache"))

    # -- entries --------------------------------------------------------------------------------

    def scan(
        self,
        *,
        uses: Mapping[FileId, float] | None = None,
        pins: Collection[FileId] = (),
    ) -> list[CacheEntry]:
        """The published entries (never temporaries or lock files), with their size
        and last use. ``uses``: later uses by file identity (a snapshot restore
        counts as a use of what it boots from); ``pins``: identities never evicted.
        Entries vanishing meanwhile (another process's prune) are skipped.
        """
        out: list[CacheEntry] = []
        try:
            paths = list(self.root.glob(self.pattern))
        except OSError:
            return out
        for path in paths:
            if path.name.startswith(".") or path.name.endswith((LOCK_SUFFIX, DIGEST_SUFFIX)):
                continue
            try:
                st = path.stat(follow_symlinks=False)
                if self.directories != stat.S_ISDIR(st.st_mode):
                    continue
                used = self._last_used(path, st)
                size = _dir_bytes(path) if self.directories else st.st_blocks * 512
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if uses is not None:
                used = max(used, uses.get(key, used))
            out.append(CacheEntry(path, size, used, key in pins))
        return out

    def last_used(self, path: Path) -> float:
        """When ``path`` was last used: a directory's mtime, the later of a file's
        mtime and its digest record's.

        :raises FileNotFoundError: it is gone.
        """
        return self._last_used(path, path.stat(follow_symlinks=False))

    def _last_used(self, path: Path, st: os.stat_result) -> float:
        return st.st_mtime if self.directories else record_last_used(path, st)

    def mark_used(self, path: Path) -> None:
        """Mark ``path`` used now (a file's digest record, never the file: see
        :mod:`._integrity`). A read-only cache is left as it is.
        """
        if self.directories:
            with contextlib.suppress(OSError):
                os.utime(path)
        else:
            mark_used(path)

    def usable(self, path: Path, *, log: bool = False) -> bool:
        """Whether the file entry ``path`` exists and matches its digest record; a
        usable one is marked used. Hashes it only when its verified stamp no longer
        holds (a worker thread's time: callers run in one).

        ``log``: say why a present entry is not usable (under its lock, where it is
        about to be rebuilt; outside it, a build may be finishing).
        """
        try:
            verify_file(path)
        except FileNotFoundError:
            return False
        except IntegrityMismatch as exc:
            if log:
                self.logger.warning("%s %s: %s; rebuilding it", self.what, path, exc.reason)
            return False
        self.mark_used(path)
        return True

    # -- building and publishing ----------------------------------------------------------------

    def lock_path(self, name: str) -> Path:
        """The lock file of entry (or group) ``name``: ``<root>/<name>.lock``."""
        return self.root / f"{name}{LOCK_SUFFIX}"

    def lock(self, name: str, what: str) -> EntryLock:
        """An unheld :class:`EntryLock` on :meth:`lock_path` of ``name``."""
        return EntryLock(
            self.lock_path(name), what, timeout_env=self.lock_timeout_env, error=self.lock_error
        )

    @contextlib.asynccontextmanager
    async def hold(self, name: str, what: str, timeout: float) -> AsyncIterator[EntryLock]:
        """``async with store.hold(name, what, timeout):`` the entry's lock is held
        (waited for without blocking the event loop; see :func:`._locks.hold`).
        """
        async with hold(
            self.lock_path(name),
            what,
            timeout,
            timeout_env=self.lock_timeout_env,
            error=self.lock_error,
        ) as lock:
            yield lock

    def temp_path(self, name: str) -> Path:
        """A fresh temporary path beside the entries, to build ``name`` in (not
        created): ``.tmp-<name>-pid<PID>-<random>``, swept once its process is gone.
        """
        return self.root / f"{TEMP_PREFIX}{name[:60]}-pid{os.getpid()}-{secrets.token_hex(4)}"

    def publish_file(self, tmp: Path, final: Path, sha256: str | None = None) -> None:
        """Rename the complete file ``tmp`` to ``final`` and record its digest
        (``sha256``, hashed if not given) and verified stamp.
        """
        os.replace(tmp, final)
        record_digest(final, sha256)  # after the rename: it changes ctime

    # -- removing -------------------------------------------------------------------------------

    def remove(self, path: Path) -> bool:
        """Delete the entry ``path`` (a directory is first renamed away, so a
        concurrent reader sees all of it or nothing), its digest record and its
        lock file unless a build holds it. False if it was not deleted (gone
        already: another process evicted it; or it could not be).
        """
        removed = False
        if self.directories:
            doomed = self.temp_path(f"rm-{path.name}")
            try:
                os.replace(path, doomed)
            except FileNotFoundError:
                pass
            else:
                shutil.rmtree(doomed, ignore_errors=True)
                removed = True
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.logger.warning("cannot remove %s %s: %s", self.what, path, exc)
                return False
            else:
                removed = True
            try:
                remove_record(path)
            except OSError as exc:
                self.logger.warning("cannot remove the digest record of %s: %s", path, exc)
        with contextlib.suppress(OSError):
            remove_lock_file(path.with_name(path.name + LOCK_SUFFIX))
        return removed

    def prune(
        self,
        *,
        entries: Iterable[CacheEntry] | None = None,
        max_age: float | None = None,
        keep_recent: int | None = None,
        max_bytes: int | None = None,
        grace: float = GRACE_S,
        keep: Collection[Path] = (),
        now: float | None = None,
    ) -> PruneResult:
        """Evict ``entries`` (default: :meth:`scan`) by last use, in three passes:

        1. ``max_age``: those unused for longer;
        2. ``keep_recent``: all but the N most recently used (``keep`` first;
           pinned entries neither go nor count: an old entry a named snapshot
           needs takes no place among the recent ones);
        3. ``max_bytes``: the least recently used until the total fits.

        Never evicted: pinned entries, ``keep``, entries used in the last
        ``grace`` seconds (:data:`GRACE_S`). If those alone exceed the budget,
        they stay. Safe to run in several processes at once: an entry's last use
        is read again just before it goes (one handed out since the listing is
        spared) and entries that vanish count as gone.
        """
        now = time.time() if now is None else now
        listed = self.scan() if entries is None else list(entries)
        kept_paths = set(keep)
        before = sum(e.disk_bytes for e in listed)
        total = before
        removed: list[CacheEntry] = []
        gone: set[Path] = set()

        def spared(entry: CacheEntry) -> bool:
            return (
                entry.pinned
                or entry.path in kept_paths
                or entry.path in gone
                or now - entry.last_used < grace
            )

        def evict(entry: CacheEntry) -> None:
            nonlocal total
            try:
                used = self.last_used(entry.path)
            except FileNotFoundError:
                pass  # evicted by another process since the listing: counts as gone
            else:
                if now - used < grace:
                    return  # handed out since we listed it
                if self.remove(entry.path):
                    removed.append(entry)
                elif os.path.lexists(entry.path):
                    return  # could not be removed (logged)
            gone.add(entry.path)
            total -= entry.disk_bytes

        oldest_first = sorted(listed, key=lambda e: (e.last_used, e.path.name))
        if max_age is not None:
            for entry in oldest_first:
                if not spared(entry) and now - entry.last_used > max_age:
                    evict(entry)
        if keep_recent is not None:
            newest_first = sorted(
                (e for e in listed if not e.pinned and e.path not in gone),
                key=lambda e: (e.path in kept_paths, e.last_used, e.path.name),
                reverse=True,
            )
            for entry in newest_first[keep_recent:]:
                if not spared(entry):
                    evict(entry)
        if max_bytes is not None:
            for entry in oldest_first:
                if total <= max_bytes:
                    break
                if not spared(entry):
                    evict(entry)
        return PruneResult(removed=tuple(removed), bytes_before=before, bytes_after=total)

    # -- sweeping what builds and older versions left -------------------------------------------

    def sweep(
        self, *, temps: bool = True, legacy_temps: Iterable[str] = (), now: float | None = None
    ) -> None:
        """Remove idle lock files whose entry is gone, digest records whose file is
        gone and (with ``temps``) temporaries of dead processes (:meth:`sweep_temps`,
        with ``legacy_temps``).

        A lock file with content (a builder's record of its outcome, such as the
        plugin's failed-build and served-live records) is kept for :data:`GRACE_S`
        after it was written: another process's prune must not make a run build
        again what it just saw fail.
        """
        now = time.time() if now is None else now
        try:
            locks = list(self.root.glob(f"*{LOCK_SUFFIX}"))
        except OSError:
            return
        remove_idle_lock_files(
            p
            for p in locks
            if not os.path.lexists(p.with_name(p.name[: -len(LOCK_SUFFIX)]))
            and not _recent_record(p, now)
        )
        if not self.directories:
            for record in self.root.glob(f"{self.pattern}{DIGEST_SUFFIX}"):
                artifact = record.with_name(record.name[: -len(DIGEST_SUFFIX)])
                if not artifact.exists():
                    with contextlib.suppress(OSError):
                        remove_record(artifact)
        if temps:
            self.sweep_temps(legacy=legacy_temps, now=now)

    def sweep_temps(
        self,
        name_prefix: str = "",
        *,
        locked: bool = False,
        legacy: Iterable[str] = (),
        now: float | None = None,
    ) -> None:
        """Remove the temporaries of entries named ``name_prefix...`` left by builds
        or removals that did not finish: those whose process (``-pid<PID>-`` in
        the name) is dead, and those naming none (older versions' ``legacy``
        globs included) once older than :data:`GRACE_S`. With ``locked`` the
        caller holds the lock every writer of these temporaries holds: all are stale.
        """
        now = time.time() if now is None else now
        candidates = [(p, True) for p in self.root.glob(f"{TEMP_PREFIX}{name_prefix}*")]
        for pattern in legacy:
            candidates += [(p, False) for p in self.root.glob(pattern)]
        for tmp, ours in candidates:
            match = _TEMP_PID.search(tmp.name[len(TEMP_PREFIX) :]) if ours else None
            if not locked:
                if match is not None:
                    if _alive(int(match.group(1))):
                        continue
                else:
                    try:
                        if now - tmp.lstat().st_mtime < GRACE_S:
                            continue
                    except FileNotFoundError:
                        continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def _dir_bytes(path: Path) -> int:
    total = 0
    for file in path.iterdir():
        with contextlib.suppress(OSError):
            total += file.stat(follow_symlinks=False).st_blocks * 512
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- what snapshot entries boot from ------------------------------------------------------------

#: Named entries with this prefix are zygotes: rebuilt when a file they boot
#: from is missing (``check_entry`` fails), like templates, so they pin nothing.
_ZYGOTE_PREFIX = "zygote-"


@dataclass(frozen=True)
class SnapshotEntryRef:
    """One entry of the snapshot store, as the caches below it need to know it."""

    meta: dict[str, Any]  # its meta.json, unvalidated
    last_used: float  # its directory's mtime, touched on every restore
    pins: bool  # a named user snapshot: what it boots from cannot be rebuilt


def snapshot_entries(cache: Path) -> Iterator[SnapshotEntryRef]:
    """The template and named entries under ``<cache>/snapshots``.

    Layout as in ``snapshots/_store.py``: ``<cache>/snapshots/{templates,named}/
    <entry>/meta.json``; ``.tmp-*`` directories are builds or removals in
    progress. Entries removed meanwhile or broken (``check_entry`` refuses
    them anyway) are skipped.
    """
    for kind in ("templates", "named"):
        try:
            entries = list(os.scandir(cache / "snapshots" / kind))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(LOCK_SUFFIX):
                continue
            try:
                last_used = entry.stat().st_mtime
                meta = json.loads((Path(entry.path) / "meta.json").read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict):
                pins = kind == "named" and not entry.name.startswith(_ZYGOTE_PREFIX)
                yield SnapshotEntryRef(meta=meta, last_used=last_used, pins=pins)


@dataclass(frozen=True)
class SnapshotRefs:
    """The files snapshot entries boot from, by identity: the latest restore of
    an entry using each, and those a named user snapshot pins.
    """

    used: dict[FileId, float]
    pinned: set[FileId]


def snapshot_refs(cache: Path, paths_of: Callable[[dict[str, Any]], Iterable[str]]) -> SnapshotRefs:
    """:class:`SnapshotRefs` of the files ``paths_of(meta)`` names in each entry's
    ``meta.json`` (unvalidated: return nothing for anything unexpected).
    """
    used: dict[FileId, float] = {}
    pinned: set[FileId] = set()
    for entry in snapshot_entries(cache):
        for path in paths_of(entry.meta):
            key = file_id(path)
            if key is None:
                continue
            used[key] = max(used.get(key, entry.last_used), entry.last_used)
            if entry.pins:
                pinned.add(key)
    return SnapshotRefs(used=used, pinned=pinned)


def _recent_record(lock: Path, now: float) -> bool:
    """Whether lock file ``lock`` holds a record written less than GRACE_S ago."""
    try:
        st = lock.stat()
    except OSError:
        return False
    return st.st_size > 0 and now - st.st_mtime < GRACE_S
