"""The snapshot store without a VM: checks on use, atomic publish, list/remove/prune."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.plugin import _zygote
from pytest_microsandbox.runtime import SnapshotError, SnapshotNotFoundError, _integrity
from pytest_microsandbox.runtime._integrity import (
    StaleStamp,
    forget,
    read_record,
    record_digest,
    sha256_file,
)
from pytest_microsandbox.snapshots import Snapshot, SnapshotMeta, _store
from pytest_microsandbox.snapshots._engine import restore_snapshot


def _fake_entry(
    root: Path,
    name: str,
    kind: str = "snapshot",
    mib: int = 1,
    inputs: dict[str, str] | None = None,
) -> Path:
    tmp = root / f".tmp-{name}-pid{os.getpid()}-x"
    tmp.mkdir(parents=True)
    kernel = root / "kernel"
    kernel.write_bytes(b"k")
    record_digest(kernel)  # serves as the initrd: as an initramfs build records it
    (tmp / _store.MEMORY).write_bytes(b"\1" * (mib << 20))
    (tmp / _store.STATE).write_bytes(b"state")
    meta = SnapshotMeta(
        kind=kind,  # type: ignore[arg-type]
        name=name,
        template="t",
        created=time.time(),
        qemu_version=_store.current_qemu_version(),
        accel="tcg",
        cpus=1,
        memory_mib=mib,
        kernel=str(kernel),
        kernel_size=1,
        initrd=str(kernel),
        initrd_size=1,
        cmdline="",
        disks=(),
        volume_slots=0,
        state_size=5,
        config="{}",
    )
    _store.write_meta(tmp, meta)
    final = (_store.named_root(root) if kind == "snapshot" else _store.templates_root(root)) / name
    _store.publish(tmp, final, inputs)
    return final


def test_an_entry_keeps_the_cpu_model_it_was_made_on(tmp_path: Path) -> None:
    # Entries made before the TCG CPU model was recorded ran on `max`: their
    # clones keep running on it, whatever the default is now.
    entry = _store.check_entry(_fake_entry(tmp_path, "old"))
    assert entry.meta.cpu_model == "max"
    recorded = entry.meta.model_copy(update={"cpu_model": "max,-erms"})
    assert SnapshotMeta.model_validate_json(recorded.model_dump_json()).cpu_model == "max,-erms"


def test_publish_check_list_remove(tmp_path: Path) -> None:
    path = _fake_entry(tmp_path, "one")
    entry = _store.check_entry(path)
    assert entry.meta.name == "one" and entry.state == path / "state"
    assert [i.name for i in Snapshot.list(tmp_path)] == ["one"]
    assert Snapshot.get("one", tmp_path).path == path
    Snapshot.remove("one", tmp_path)
    assert Snapshot.list(tmp_path) == []
    with pytest.raises(SnapshotNotFoundError):
        Snapshot.get("one", tmp_path)
    with pytest.raises(SnapshotNotFoundError):
        Snapshot.remove("one", tmp_path)


def test_broken_entries_are_refused(tmp_path: Path) -> None:
    path = _fake_entry(tmp_path, "trunc")
    with open(path / _store.MEMORY, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SnapshotError, match="has 100 bytes"):
        _store.check_entry(path)
    path = _fake_entry(tmp_path, "garbled")
    (path / _store.META).write_text("{not json")
    with pytest.raises(SnapshotError, match="corrupt"):
        _store.check_entry(path)
    with pytest.raises(SnapshotError, match="invalid snapshot name"):
        Snapshot.get("../etc", tmp_path)
    # An entry of an older format (which also lacks newer fields) says so, not "corrupt".
    path = _fake_entry(tmp_path, "old-format")
    meta = json.loads((path / _store.META).read_text())
    meta["format"] = 1
    del meta["volume_slots"]
    (path / _store.META).write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match=r"has format 1, this version reads 2.*take the"):
        _store.check_entry(path)


def test_prune_by_age_then_size(tmp_path: Path) -> None:
    old = _fake_entry(tmp_path, "old")
    _fake_entry(tmp_path, "mid")
    _fake_entry(tmp_path, "new")
    now = time.time()
    os.utime(old, (now - 3600, now - 3600))
    os.utime(tmp_path / "snapshots/named/mid", (now - 60, now - 60))
    assert Snapshot.prune(tmp_path, max_age=600) == ["old"]
    # Each entry holds ~1 MiB: keeping 1.5 MiB drops the least recently used.
    assert Snapshot.prune(tmp_path, max_bytes=(3 << 20) // 2) == ["mid"]
    assert [i.name for i in Snapshot.list(tmp_path)] == ["new"]


def test_auto_prune_spares_user_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_microsandbox.snapshots._engine import CACHE_BUDGET_ENV, auto_prune

    now = time.time()
    for age, name in enumerate(["zygote-new", "zygote-old", "mine"]):
        path = _fake_entry(tmp_path, name)
        os.utime(path, (now - 3600 * age, now - 3600 * age))
    monkeypatch.setenv(CACHE_BUDGET_ENV, "1.5")  # MiB: room for one ~1 MiB entry
    assert auto_prune(tmp_path, kind="snapshot", prefix="zygote-") == ["zygote-old"]
    assert sorted(i.name for i in Snapshot.list(tmp_path)) == ["mine", "zygote-new"]


def test_auto_prune_spares_entries_used_within_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_microsandbox.snapshots._engine import (
        AUTO_PRUNE_GRACE_S,
        CACHE_BUDGET_ENV,
        auto_prune,
    )

    now = time.time()
    ages = {
        "zygote-a": 0.0,
        "zygote-b": AUTO_PRUNE_GRACE_S - 60,
        "zygote-c": AUTO_PRUNE_GRACE_S + 60,
    }
    for name, age in ages.items():
        os.utime(_fake_entry(tmp_path, name), (now - age, now - age))
    monkeypatch.setenv(CACHE_BUDGET_ENV, "0")
    # Over budget, but a and b were used moments ago (another process may be
    # restoring them): only c goes.
    assert auto_prune(tmp_path, kind="snapshot", prefix="zygote-") == ["zygote-c"]


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "lots"])
def test_bad_budget_is_a_clear_error_and_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    from pytest_microsandbox.runtime import SnapshotError
    from pytest_microsandbox.snapshots._engine import CACHE_BUDGET_ENV, auto_prune

    _fake_entry(tmp_path, "zygote-a")
    monkeypatch.setenv(CACHE_BUDGET_ENV, raw)
    with pytest.raises(SnapshotError, match=rf"\${CACHE_BUDGET_ENV}='{raw}' is not a number >= 0"):
        auto_prune(tmp_path, kind="snapshot", prefix="zygote-")
    assert [i.name for i in Snapshot.list(tmp_path)] == ["zygote-a"]


def test_stale_temps_of_dead_builders_are_removed(tmp_path: Path) -> None:
    root = _store.templates_root(tmp_path)
    dead = root / ".tmp-key-pid999999999-abc"
    live = root / f".tmp-key-pid{os.getpid()}-abc"
    dead.mkdir()
    live.mkdir()
    _store.clean_stale_temps(root)
    assert not dead.exists() and live.exists()


def test_free_space_check_is_clear(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not enough disk space"):
        _store.check_free_space(tmp_path, 1 << 60)


def test_disk_error_names_a_full_disk(tmp_path: Path) -> None:
    wrapped = SnapshotError("QEMU failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert "is full; nothing was kept" in str(_store.disk_error(wrapped, tmp_path))
    # QEMU killed by SIGBUS: its guest memory file could not grow.
    sigbus = _store.disk_error(SnapshotError("gone"), tmp_path, -signal.SIGBUS)
    assert sigbus is not None and "SIGBUS" in str(sigbus) and str(tmp_path) in str(sigbus)
    assert _store.disk_error(SnapshotError("gone"), tmp_path, -signal.SIGKILL) is None
    assert _store.disk_error(OSError(errno.EIO, "I/O error"), tmp_path) is None


def test_lock_files_go_with_their_entries(tmp_path: Path) -> None:
    from pytest_microsandbox.runtime._locks import EntryLock

    kept = _fake_entry(tmp_path, "kept")
    gone = _fake_entry(tmp_path, "gone")
    for entry in (kept, gone):
        _store.entry_lock_path(entry).touch()
    Snapshot.remove("gone", tmp_path)
    assert not _store.entry_lock_path(gone).exists()
    assert _store.entry_lock_path(kept).exists()

    templates, store = _store.templates_root(tmp_path), _store.store_root(tmp_path)
    orphan = templates / "0123abcd.lock"  # a build that failed, or an old entry's
    legacy = store / "zygote-0123.lock"  # where zygote locks used to live
    building = _store.named_root(tmp_path) / "zygote-new.lock"
    for lock in (orphan, legacy, building):
        lock.touch()
    held = EntryLock(building, "zygote zygote-new")  # a build in progress
    assert held.try_acquire()
    try:
        assert Snapshot.prune(tmp_path, max_age=3600) == []
    finally:
        held.release()
    assert not orphan.exists() and not legacy.exists()
    assert building.exists(), "a held lock file must survive the sweep"
    assert _store.entry_lock_path(kept).exists(), "its entry still exists"

    old = time.time() - 7200
    os.utime(kept, (old, old))
    assert Snapshot.prune(tmp_path, max_age=3600) == ["kept"]
    assert not _store.entry_lock_path(kept).exists() and not building.exists()


# -- integrity (issue #19 item 7) -------------------------------------------------------------


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """``dd conv=notrunc``: other bytes, the same size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    forget(path)  # as another process sees it (this one remembers its own checks)


def test_publish_records_the_digests(tmp_path: Path) -> None:
    path = _fake_entry(tmp_path, "sealed")
    digests = json.loads((path / _store.INTEGRITY).read_text())
    assert digests["state"] == hashlib.sha256(b"state").hexdigest()
    assert digests["meta"] == hashlib.sha256((path / _store.META).read_bytes()).hexdigest()
    assert list(digests["inputs"]) == [str(tmp_path / "kernel")]
    assert read_record(path / _store.MEMORY).sha256 == sha256_file(path / _store.MEMORY)


@pytest.mark.parametrize(
    ("victim", "offset"), [(_store.STATE, 1), (_store.MEMORY, 4096), (_store.META, 2)]
)
def test_a_corrupt_named_snapshot_names_the_file(tmp_path: Path, victim: str, offset: int) -> None:
    """Same size, other bytes: refused with the file's name, by every way in."""
    path = _fake_entry(tmp_path, "precious")
    _store.check_entry(path)
    raw = (path / victim).read_bytes()
    _overwrite(path / victim, offset, bytes([raw[offset] ^ 0x20]))
    pattern = f"{path / victim} is corrupt: its contents changed.*take the snapshot again"
    with pytest.raises(SnapshotError, match=pattern):
        _store.check_entry(path)
    with pytest.raises(SnapshotError, match=pattern):
        Snapshot.get("precious", tmp_path)
    # The restore path refuses it before starting any VM.
    with pytest.raises(SnapshotError, match=pattern):
        anyio.run(functools.partial(restore_snapshot, "precious", cache=tmp_path))


def test_a_changed_input_is_refused(tmp_path: Path) -> None:
    """The initramfs (or a disk image) an entry boots from was rebuilt with other bytes."""
    path = _fake_entry(tmp_path, "stale")
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"K")
    record_digest(kernel)  # a consistent record of the new contents
    with pytest.raises(SnapshotError, match=f"{kernel} is corrupt: .*rebuilt or replaced since"):
        _store.check_entry(path)


def test_an_entry_without_digests_is_refused_and_a_zygote_rebuilt(tmp_path: Path) -> None:
    path = _fake_entry(tmp_path, "zygote-0123")
    assert anyio.run(_zygote._exists, "zygote-0123", tmp_path)
    (path / _store.INTEGRITY).unlink()
    with pytest.raises(SnapshotError, match=r"has no integrity.json .*take the snapshot again"):
        _store.check_entry(path)
    assert not anyio.run(_zygote._exists, "zygote-0123", tmp_path)  # so it is built again


def test_a_stale_stamp_is_hashed_off_the_event_loop(tmp_path: Path) -> None:
    path = _fake_entry(tmp_path, "touched")
    memory = path / _store.MEMORY
    os.utime(memory)  # a new ctime, the same contents
    forget(memory)
    with pytest.raises(StaleStamp):
        _store.check_entry(path, rehash=False)
    threads: list[bool] = []
    real = _integrity.sha256_file

    def spy(p: Path) -> str:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(p)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_integrity, "sha256_file", spy)
        assert anyio.run(_store.acheck_entry, path).path == path
    assert threads == [False]  # the memory file was hashed once, in a worker thread
    forget(memory)
    _store.check_entry(path, rehash=False)  # the renewed stamp holds


def test_a_snapshot_records_what_its_origin_booted_from(tmp_path: Path) -> None:
    """A snapshot inherits its origin's input digests: if the image was rebuilt
    since the origin booted, the snapshot is refused by name, not silently mixed.
    """
    origin = _fake_entry(tmp_path, "origin")
    inputs = _store.recorded_inputs(origin)
    kernel = str(tmp_path / "kernel")
    assert inputs == {kernel: sha256_file(Path(kernel))}
    assert _store.recorded_inputs(tmp_path / "nowhere") is None
    path = _fake_entry(tmp_path, "child", inputs={kernel: "0" * 64})
    with pytest.raises(SnapshotError, match="rebuilt or replaced since"):
        _store.check_entry(path)


def test_a_snapshot_named_like_a_temporary_is_still_listed_and_pruned(tmp_path: Path) -> None:
    # Temporaries are the names starting with "."; "tmp-" inside a name used
    # to hide the snapshot from list and prune.
    path = _fake_entry(tmp_path, "before-tmp-cleanup")
    assert [i.name for i in Snapshot.list(tmp_path)] == ["before-tmp-cleanup"]
    old = time.time() - 7200
    os.utime(path, (old, old))
    assert Snapshot.prune(tmp_path, max_age=3600) == ["before-tmp-cleanup"]


def test_qemu_version_is_remembered_per_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked once per binary: a later process reads the cache, a replaced
    binary (or a damaged record) is asked again.
    """
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\necho 'QEMU emulator version 1.0'\n")
    binary.chmod(0o755)
    monkeypatch.setenv("MICROSANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_store, "find_qemu", lambda: str(binary))
    asked: list[str] = []
    real = _store.qemu_version
    monkeypatch.setattr(_store, "qemu_version", lambda q=None: asked.append(q or "") or real(q))

    def version() -> str:
        _store.current_qemu_version.cache_clear()  # as a new process
        return _store.current_qemu_version()

    try:
        assert version() == "QEMU emulator version 1.0"
        assert version() == "QEMU emulator version 1.0"
        assert len(asked) == 1
        memo = tmp_path / "cache" / _store.QEMU_VERSION_FILE
        assert [p.name for p in memo.parent.iterdir()] == [memo.name]  # no temporary left
        binary.write_text("#!/bin/sh\necho 'QEMU emulator version 2.0'\n")  # an upgrade
        assert version() == "QEMU emulator version 2.0"
        memo.write_text("{not json")
        assert version() == "QEMU emulator version 2.0"
        memo.write_text("[]")  # JSON, but not a record
        assert version() == "QEMU emulator version 2.0"
        assert len(asked) == 4
    finally:
        _store.current_qemu_version.cache_clear()
