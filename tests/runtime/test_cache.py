"""The shared cache-store model, without a VM: real files in a temporary directory,
times set with ``os.utime``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime._cache import (
    GRACE_S,
    CacheEntry,
    CacheStore,
    snapshot_refs,
)
from pytest_microsandbox.runtime._exceptions import LockTimeoutError
from pytest_microsandbox.runtime._integrity import record_digest, record_path
from pytest_microsandbox.runtime._locks import EntryLock

HOUR = 3600.0


def _file(store: CacheStore, name: str, used: float, size: int = 4096) -> Path:
    """A published file entry (with its digest record) last used at ``used``."""
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = store.temp_path(name)
    tmp.write_bytes(b"x" * size)
    final = store.root / name
    store.publish_file(tmp, final)
    os.utime(record_path(final), (used, used))
    os.utime(final, (used, used))
    return final


def _dir(store: CacheStore, name: str, used: float) -> Path:
    path = store.root / name
    path.mkdir(parents=True)
    (path / "memory").write_bytes(b"m" * 8192)
    os.utime(path, (used, used))
    return path


@pytest.fixture
def files(tmp_path: Path) -> CacheStore:
    return CacheStore(tmp_path / "c", "*.img", "cached thing")


@pytest.fixture
def dirs(tmp_path: Path) -> CacheStore:
    return CacheStore(tmp_path / "d", "*", "entry", directories=True)


def test_scan_lists_entries_only_with_size_and_last_use(files: CacheStore) -> None:
    now = time.time()
    a = _file(files, "a.img", now - HOUR)
    (files.root / "b.img.lock").touch()
    (files.root / ".tmp-b.img-pid1-00").write_bytes(b"half")
    (files.root / "other.txt").touch()
    (entry,) = files.scan()
    assert entry.path == a and entry.disk_bytes >= 4096 and not entry.pinned
    assert entry.last_used == pytest.approx(now - HOUR, abs=1)
    # A use is marked on the digest record, never on the file (its verified stamp).
    mtime = a.stat().st_mtime
    files.mark_used(a)
    assert files.last_used(a) >= now - 1 and a.stat().st_mtime == mtime


def test_scan_applies_later_uses_and_pins(files: CacheStore) -> None:
    now = time.time()
    a = _file(files, "a.img", now - 3 * HOUR)
    b = _file(files, "b.img", now - 3 * HOUR)
    st = a.stat()
    by_name = {
        e.path: e for e in files.scan(uses={(st.st_dev, st.st_ino): now - 60}, pins=[b_id(b)])
    }
    assert by_name[a].last_used == pytest.approx(now - 60, abs=1) and not by_name[a].pinned
    assert by_name[b].pinned


def b_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino)


def test_prune_by_age_then_budget_in_lru_order(dirs: CacheStore) -> None:
    now = time.time()
    old = _dir(dirs, "old", now - 10 * HOUR)
    mid = _dir(dirs, "mid", now - 2 * HOUR)
    new = _dir(dirs, "new", now - HOUR)
    size = dirs.scan()[0].disk_bytes
    result = dirs.prune(max_age=5 * HOUR, max_bytes=size, grace=0)
    assert [e.path for e in result.removed] == [old, mid]
    assert new.exists() and not old.exists() and not mid.exists()
    assert (result.bytes_before, result.bytes_after) == (3 * size, size)
    assert not list(dirs.root.glob(".tmp-*")), "a removal leaves no temporary"


def test_grace_pins_and_keep_are_never_evicted(files: CacheStore) -> None:
    now = time.time()
    recent = _file(files, "recent.img", now - GRACE_S + 60)
    stale = _file(files, "stale.img", now - GRACE_S - 60)
    kept = _file(files, "kept.img", now - 10 * HOUR)
    pinned = _file(files, "pinned.img", now - 10 * HOUR)
    entries = files.scan(pins=[b_id(pinned)])
    result = files.prune(entries=entries, max_bytes=0, max_age=0, keep=[kept])
    assert [e.path for e in result.removed] == [stale]
    assert recent.exists() and kept.exists() and pinned.exists()
    assert not record_path(stale).exists(), "the digest record goes with its file"
    assert result.bytes_after > 0  # over budget, but nothing else may go


def test_keep_recent_counts_keep_first_and_not_pins(files: CacheStore) -> None:
    now = time.time()
    ages = [_file(files, f"{i}.img", now - (i + 1) * HOUR) for i in range(5)]
    just_built = _file(files, "new.img", now - 20 * HOUR)  # its last use lags: still first
    entries = files.scan(pins=[b_id(ages[1])])
    result = files.prune(entries=entries, keep_recent=3, keep=[just_built], grace=0)
    # Kept: just_built, then the two most recent unpinned (0, 2); 1 is pinned.
    assert sorted(e.path.name for e in result.removed) == ["3.img", "4.img"]


def test_an_entry_used_since_the_listing_is_spared(files: CacheStore) -> None:
    now = time.time()
    a = _file(files, "a.img", now - 2 * HOUR)
    b = _file(files, "b.img", now - HOUR)
    entries = files.scan()
    files.mark_used(a)  # handed out by another process after the listing
    result = files.prune(entries=entries, max_bytes=0)
    assert [e.path for e in result.removed] == [b] and a.exists()


def test_entries_vanishing_meanwhile_count_as_gone(files: CacheStore) -> None:
    now = time.time()
    a = _file(files, "a.img", now - 2 * HOUR)
    entries = files.scan()
    a.unlink()  # another process evicted it
    result = files.prune(entries=entries, max_bytes=0)
    assert result.removed == () and result.bytes_after == 0


def test_sweep_removes_orphans_and_spares_what_is_held(files: CacheStore) -> None:
    now = time.time()
    live = _file(files, "live.img", now)
    files.lock_path("live.img").touch()  # its entry exists: stays
    orphan_lock = files.lock_path("gone.img")
    orphan_lock.touch()
    held = EntryLock(files.lock_path("building.img"), "a build")
    assert held.try_acquire()
    orphan_record = record_path(files.root / "gone.img")
    orphan_record.write_text("{}")
    dead = files.root / ".tmp-x.img-pid999999999-ab"
    mine = files.temp_path("y.img")
    legacy_old, legacy_new = files.root / "x.img.tmp1", files.root / "y.img.tmp2"
    for tmp in (dead, mine, legacy_old, legacy_new):
        tmp.write_bytes(b"t")
    os.utime(legacy_old, (now - GRACE_S - 60,) * 2)
    try:
        files.sweep(legacy_temps=["*.img.tmp*"])
        assert held.path.exists(), "a build in progress keeps its lock"
    finally:
        held.release()
    assert files.lock_path("live.img").exists() and live.exists()
    assert not orphan_lock.exists() and not orphan_record.exists()
    assert not dead.exists() and not legacy_old.exists()
    assert mine.exists() and legacy_new.exists()  # a live process's; too young to judge


def test_sweep_keeps_an_orphan_lock_with_a_recent_record(files: CacheStore) -> None:
    """A builder's record in a lock file (a failed build, a project served
    without a snapshot) outlives other processes' prunes for GRACE_S.
    """
    now = time.time()
    recent, old, empty = (files.lock_path(f"{n}.img") for n in ("recent", "old", "empty"))
    files.root.mkdir(parents=True, exist_ok=True)
    for lock in (recent, old):
        lock.write_text('{"run": "r", "cause": "boom"}')
    empty.touch()
    os.utime(old, (now - GRACE_S - 60,) * 2)
    files.sweep(now=now)
    assert recent.exists()
    assert not old.exists() and not empty.exists()


def test_sweep_temps_under_the_lock_removes_all_of_the_group(files: CacheStore) -> None:
    files.root.mkdir()
    ours = files.temp_path("fam-1")  # this process is alive, but holds the lock
    other = files.temp_path("other-1")
    for tmp in (ours, other):
        tmp.write_bytes(b"t")
    files.sweep_temps("fam-", locked=True)
    assert not ours.exists() and other.exists()


def test_temp_names_parse_the_last_pid(dirs: CacheStore) -> None:
    dirs.root.mkdir()
    # An entry whose own name looks like a temporary's pid tag.
    tmp = dirs.temp_path("x-pid999999999-y")
    tmp.mkdir()
    dirs.sweep_temps()
    assert tmp.exists(), "its process (this one) is alive"


def test_remove_takes_the_idle_lock_file_and_leaves_a_held_one(dirs: CacheStore) -> None:
    now = time.time()
    a, b = _dir(dirs, "a", now), _dir(dirs, "b", now)
    dirs.lock_path("a").touch()
    held = EntryLock(dirs.lock_path("b"), "a build")
    assert held.try_acquire()
    try:
        assert dirs.remove(a) and dirs.remove(b)
        assert not dirs.remove(a), "already gone"
        assert not dirs.lock_path("a").exists() and dirs.lock_path("b").exists()
    finally:
        held.release()


def test_locks_name_the_store_timeout(files: CacheStore) -> None:
    files.root.mkdir()
    first = files.lock("fam", "the first build")
    assert first.try_acquire()

    async def second() -> None:
        async with files.hold("fam", "the second build", timeout=0.05):
            raise AssertionError("the lock was held")

    try:
        with pytest.raises(LockTimeoutError, match="MICROSANDBOX_CACHE_LOCK_TIMEOUT"):
            anyio.run(second)
    finally:
        first.release(delete=True)
    assert not files.lock_path("fam").exists()


def test_snapshot_refs_read_meta_raw(tmp_path: Path) -> None:
    files = CacheStore(tmp_path / "images", "*.img", "image")
    now = time.time()
    shared = _file(files, "shared.img", now - HOUR)
    only_zygote = _file(files, "z.img", now - HOUR)
    for kind, name, disks, used in [
        ("named", "mine", [shared], now - 300),
        ("named", "zygote-1", [only_zygote], now - 100),
        ("templates", "t", [shared], now - 50),
    ]:
        entry = tmp_path / "snapshots" / kind / name
        entry.mkdir(parents=True)
        (entry / "meta.json").write_text(json.dumps({"disks": [str(d) for d in disks]}))
        os.utime(entry, (used, used))
    (tmp_path / "snapshots/named/broken").mkdir()
    refs = snapshot_refs(tmp_path, lambda meta: meta.get("disks", []))
    assert refs.pinned == {b_id(shared)}
    assert refs.used[b_id(shared)] == pytest.approx(now - 50, abs=1)
    assert refs.used[b_id(only_zygote)] == pytest.approx(now - 100, abs=1)


def test_cache_entry_is_what_images_call_a_cached_image() -> None:
    from pytest_microsandbox.runtime.images._store import CachedImage

    assert CachedImage is CacheEntry


def test_one_grace_period_for_every_cache() -> None:
    from pytest_microsandbox.runtime.images._store import RECENT_USE_GRACE
    from pytest_microsandbox.runtime.initramfs import INITRAMFS_GRACE_S
    from pytest_microsandbox.snapshots._engine import AUTO_PRUNE_GRACE_S

    assert RECENT_USE_GRACE == INITRAMFS_GRACE_S == AUTO_PRUNE_GRACE_S == GRACE_S


def test_publish_records_the_digest(files: CacheStore) -> None:
    files.root.mkdir()
    tmp = files.temp_path("a.img")
    tmp.write_bytes(b"contents")
    files.publish_file(tmp, files.root / "a.img")
    assert not tmp.exists() and files.usable(files.root / "a.img")
    record_digest(files.root / "a.img")  # idempotent
    with open(files.root / "a.img", "r+b") as f:
        f.write(b"C")
    from pytest_microsandbox.runtime._integrity import forget

    forget(files.root / "a.img")
    assert not files.usable(files.root / "a.img")
