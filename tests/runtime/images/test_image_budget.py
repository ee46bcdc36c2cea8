"""The image cache's disk budget: LRU eviction by last use, with the images a
VM may be about to open (recent use) or that a named snapshot needs kept.

Real files in a temporary cache, times set with ``os.utime``; no VM, no mkfs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._exceptions import ImageError
from pytest_microsandbox.runtime._integrity import record_digest, record_path
from pytest_microsandbox.runtime._locks import EntryLock
from pytest_microsandbox.runtime.images import __main__ as cli
from pytest_microsandbox.runtime.images._resolve import STABLE_LAYER_TTL
from pytest_microsandbox.runtime.images._store import (
    DEFAULT_IMAGE_BUDGET_MB,
    IMAGE_BUDGET_ENV,
    KEEP_PER_SOURCE,
    RECENT_USE_GRACE,
    cached_images,
    ensure_image,
    image_budget_bytes,
    image_path,
    prune_images,
)
from pytest_microsandbox.snapshots._model import DiskMeta, SnapshotMeta
from pytest_microsandbox.snapshots._store import named_root, templates_root, write_meta

MiB = 2**20
HOUR = 3600.0


@pytest.fixture(autouse=True)
def _default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IMAGE_BUDGET_ENV, raising=False)


def digest_of(family: str) -> str:
    return hashlib.sha256(family.encode()).hexdigest()


def make_image(images: Path, family: str, *, used: float, mib: float = 1) -> Path:
    """A fake final image of ``mib`` MiB (really allocated) last used at ``used``."""
    images.mkdir(parents=True, exist_ok=True)
    path = image_path(images, family, digest_of(family))
    path.write_bytes(b"\xe2" * int(mib * MiB))
    os.utime(path, (used, used))
    record_digest(path)  # as a build does; last use is the record's mtime
    os.utime(record_path(path), (used, used))
    return path


def write_bytes_build(mib: float) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        tmp.write_bytes(b"\xe2" * int(mib * MiB))

    return build


def never_build(tmp: Path) -> None:
    raise AssertionError("a cached image was rebuilt")


def add_entry(root: Path, name: str, disks: list[Path], *, used: float) -> Path:
    """A snapshot store entry (real SnapshotMeta) booting from ``disks``, last used at ``used``."""
    entry = root / name
    entry.mkdir()
    meta = SnapshotMeta(
        kind="template" if root.name == "templates" else "snapshot",
        name=name,
        template="t" * 24,
        created=used,
        qemu_version="QEMU emulator version 7.2.0",
        accel="tcg",
        cpus=1,
        memory_mib=256,
        kernel="/nonexistent/vmlinux",
        kernel_size=1,
        initrd="/nonexistent/initrd",
        initrd_size=1,
        cmdline="console=hvc0",
        disks=tuple(
            DiskMeta(serial=f"l-{i}", path=str(d), size=d.stat().st_size)
            for i, d in enumerate(disks)
        ),
        volume_slots=0,
        state_size=1,
        config="{}",
    )
    write_meta(entry, meta)
    os.utime(entry, (used, used))  # the directory's mtime is its last restore
    return entry


def names(paths: Iterable[Path]) -> set[str]:
    return {p.name for p in paths}


def test_lru_order_follows_use_not_build(tmp_path: Path) -> None:
    images = tmp_path / "cache/images"
    now = time.time()
    first = make_image(images, "dir-aaaaaaaaaaaa", used=now - 3 * HOUR)
    second = make_image(images, "dir-bbbbbbbbbbbb", used=now - 2 * HOUR)
    third = make_image(images, "dir-cccccccccccc", used=now - 1 * HOUR)
    # The oldest build is handed out again: the fast path touches it (no build).
    digest = digest_of("dir-aaaaaaaaaaaa")
    assert ensure_image(images, "dir-aaaaaaaaaaaa", digest, never_build, description="a") == first
    assert record_path(first).stat().st_mtime >= now - 1
    size = max(i.disk_bytes for i in cached_images(images))
    # Two hours later (no grace in play), room for two: the least recently used goes.
    result = prune_images(images, max_bytes=2 * size, now=now + 2 * HOUR)
    assert names([i.path for i in result.removed]) == {second.name}
    assert first.exists() and third.exists() and not second.exists()


def test_build_evicts_down_to_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "cache/images"
    now = time.time()
    old = [make_image(images, f"dir-{i:012d}", used=now - (i + 1) * HOUR) for i in range(5)]
    monkeypatch.setenv(IMAGE_BUDGET_ENV, "3.5")
    built = ensure_image(
        images, "dir-ffffffffffff", "f" * 24, write_bytes_build(1), description="new"
    )
    left = cached_images(images)
    assert sum(i.disk_bytes for i in left) <= 3.5 * MiB
    # The new image and the two most recently used old ones (1 and 2 hours ago).
    assert names([i.path for i in left]) == {built.name, old[0].name, old[1].name}


def test_budget_totals_are_reported(tmp_path: Path) -> None:
    images = tmp_path / "cache/images"
    now = time.time()
    for i in range(4):
        make_image(images, f"dir-{i:012d}", used=now - (i + 1) * HOUR, mib=0.5)
    before = sum(i.disk_bytes for i in cached_images(images))
    result = prune_images(images, max_bytes=MiB)
    after = sum(i.disk_bytes for i in cached_images(images))
    assert (result.bytes_before, result.bytes_after) == (before, after)
    assert after <= MiB < before
    assert len(result.removed) == 2
    assert all(i.last_used <= now - 3 * HOUR for i in result.removed)  # the two oldest


def test_recently_used_and_kept_images_are_never_evicted(tmp_path: Path) -> None:
    images = tmp_path / "cache/images"
    now = time.time()
    recent = make_image(images, "dir-aaaaaaaaaaaa", used=now - RECENT_USE_GRACE + 60)
    stale = make_image(images, "dir-bbbbbbbbbbbb", used=now - RECENT_USE_GRACE - 60)
    keep = make_image(images, "dir-cccccccccccc", used=now - 10 * HOUR)
    future = make_image(images, "dir-dddddddddddd", used=now + HOUR)  # clock skew
    result = prune_images(images, max_bytes=0, keep=keep)
    assert names([i.path for i in result.removed]) == {stale.name}
    assert recent.exists() and keep.exists() and future.exists()
    assert result.bytes_after > 0  # over budget, but nothing else may go


def test_grace_outlasts_the_layer_memo() -> None:
    # A process reuses a resolved layer for STABLE_LAYER_TTL without touching it.
    assert RECENT_USE_GRACE >= 5 * STABLE_LAYER_TTL


def test_named_snapshot_pins_its_images_templates_and_zygotes_do_not(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images = cache / "images"
    old = time.time() - 10 * HOUR
    user = make_image(images, "project-aaaaaaaaaaaa", used=old)
    shared = make_image(images, "usr-bbbbbbbbbbbb", used=old)
    tmpl = make_image(images, "project-cccccccccccc", used=old)
    zygote = make_image(images, "project-dddddddddddd", used=old)
    add_entry(named_root(cache), "prepared", [user, shared], used=old)
    add_entry(templates_root(cache), "e" * 24, [tmpl, shared], used=old)
    add_entry(named_root(cache), "zygote-" + "f" * 24, [zygote], used=old)
    broken = named_root(cache) / "broken"  # unreadable meta: ignored, not fatal
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (named_root(cache) / "odd").mkdir()
    (named_root(cache) / "odd/meta.json").write_text('{"disks": [{"path": 3}, "x"]}')
    (named_root(cache) / "prepared.lock").touch()

    assert {i.path.name for i in cached_images(images) if i.pinned} == {user.name, shared.name}
    result = prune_images(images, max_bytes=0)
    assert names([i.path for i in result.removed]) == {tmpl.name, zygote.name}
    assert user.exists() and shared.exists()


def test_family_prune_spares_named_snapshot_images(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images = cache / "images"
    now = time.time()
    old = [make_image(images, f"dir-aaaaaaaaaaaa-{i}", used=now - (i + 1) * HOUR) for i in range(4)]
    add_entry(named_root(cache), "before-the-edits", [old[3]], used=now - 5 * HOUR)
    new = ensure_image(images, "dir-aaaaaaaaaaaa", "a" * 24, write_bytes_build(1), description="x")
    kept = {new.name, old[3].name, *(p.name for p in old[: KEEP_PER_SOURCE - 1])}
    assert names(images.glob("*.erofs")) == kept


def test_restoring_a_snapshot_entry_counts_as_use(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images = cache / "images"
    now = time.time()
    in_use = make_image(images, "project-aaaaaaaaaaaa", used=now - 10 * HOUR)
    unused = make_image(images, "project-bbbbbbbbbbbb", used=now - 10 * HOUR)
    # Its template was restored a minute ago (restores touch the entry directory).
    add_entry(templates_root(cache), "e" * 24, [in_use], used=now - 60)
    add_entry(templates_root(cache), "f" * 24, [unused], used=now - 9 * HOUR)
    (last_used,) = [i.last_used for i in cached_images(images) if i.path == in_use]
    assert last_used == pytest.approx(now - 60, abs=1)
    result = prune_images(images, max_bytes=0)
    assert names([i.path for i in result.removed]) == {unused.name}
    assert in_use.exists()


@pytest.mark.parametrize("via_build", [False, True])
def test_files_vanishing_meanwhile_are_tolerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, via_build: bool
) -> None:
    images = tmp_path / "cache/images"
    now = time.time()
    for i in range(4):  # four of the family being built (its own prune runs too), four others
        make_image(images, f"dir-aaaaaaaaaaaa-{i}", used=now - (i + 1) * HOUR)
        make_image(images, f"dir-{i:012d}", used=now - (i + 1) * HOUR)
    # Another family's build in progress (and its lock): never ours to delete.
    building = images / f".dir-eeeeeeeeeeee-{'e' * 24}.999.abcd.tmp"
    building.write_bytes(b"\xe2" * MiB)
    os.utime(building, (now - 10 * HOUR, now - 10 * HOUR))
    other_build = EntryLock(images / "dir-eeeeeeeeeeee.lock", "image dir-eeeeeeeeeeee")
    other_build.acquire(timeout=1)
    final = image_path(images, "dir-aaaaaaaaaaaa", "a" * 24)

    real_unlink = Path.unlink
    raced: list[Path] = []

    def racing_unlink(self: Path, missing_ok: bool = False) -> None:
        # Another process evicts every other image just before our first
        # eviction: this one and those we listed but have not reached yet
        # vanish under us.
        if self.suffix == ".erofs" and not raced:
            raced.append(self)
            for other in images.glob("*.erofs"):
                if other != final:
                    real_unlink(other)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", racing_unlink)
    request.addfinalizer(other_build.release)
    if via_build:
        monkeypatch.setenv(IMAGE_BUDGET_ENV, "0")
        got = ensure_image(
            images, "dir-aaaaaaaaaaaa", "a" * 24, write_bytes_build(1), description="x"
        )
        assert got == final and final.exists()
    else:
        result = prune_images(images, max_bytes=0)
        assert result.removed == ()
        assert result.bytes_after == 0
    assert raced, "the race was not exercised"
    assert names(images.glob("*.erofs")) == ({final.name} if via_build else set())
    assert building.exists() and (images / "dir-eeeeeeeeeeee.lock").exists()


def test_image_used_during_the_prune_is_spared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "cache/images"
    now = time.time()
    oldest = make_image(images, "dir-aaaaaaaaaaaa", used=now - 3 * HOUR)
    handed_out = make_image(images, "dir-bbbbbbbbbbbb", used=now - 2 * HOUR)
    newest = make_image(images, "dir-cccccccccccc", used=now - 1 * HOUR)
    real_unlink = Path.unlink

    def unlink_while_another_process_uses(self: Path, missing_ok: bool = False) -> None:
        if self == oldest:  # meanwhile ensure_image hands ``handed_out`` to a VM
            digest = digest_of("dir-bbbbbbbbbbbb")
            ensure_image(images, "dir-bbbbbbbbbbbb", digest, never_build, description="b")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink_while_another_process_uses)
    result = prune_images(images, max_bytes=0)
    assert names([i.path for i in result.removed]) == {oldest.name, newest.name}
    assert handed_out.exists()


@pytest.mark.parametrize("raw", ["lots", "4 GB", "nan", "inf", "1e999", "-1"])
def test_bad_budget_value_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv(IMAGE_BUDGET_ENV, raw)
    with pytest.raises(ImageError, match=rf"\${IMAGE_BUDGET_ENV}=.*not a number of MiB"):
        image_budget_bytes()
    built: list[Path] = []
    with pytest.raises(ImageError, match=IMAGE_BUDGET_ENV):
        ensure_image(tmp_path / "images", "dir-a", "a" * 24, built.append, description="x")
    assert built == []  # refused before building, not after


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", DEFAULT_IMAGE_BUDGET_MB * MiB), (" 0.5 ", MiB // 2), ("0", 0), ("100", 100 * MiB)],
)
def test_budget_values(monkeypatch: pytest.MonkeyPatch, raw: str, expected: int) -> None:
    monkeypatch.setenv(IMAGE_BUDGET_ENV, raw)
    assert image_budget_bytes() == expected


def test_prune_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MICROSANDBOX_CACHE_DIR", str(cache))
    now = time.time()
    gone = make_image(cache / "images", "dir-aaaaaaaaaaaa", used=now - HOUR)
    fresh = make_image(cache / "images", "dir-bbbbbbbbbbbb", used=now)
    assert cli.main(["prune", "--max-mb", "0"]) == 0
    out = capsys.readouterr().out
    assert f"removed {gone.name}" in out
    assert "2.0 MiB before, 1.0 MiB after (budget 0 MiB); 1 removed, 1 kept" in out
    assert "still over budget: 1 images were used in the last 10 minutes" in out
    assert not gone.exists() and fresh.exists()

    monkeypatch.setenv(IMAGE_BUDGET_ENV, "plenty")
    assert cli.main(["prune"]) == 1
    assert IMAGE_BUDGET_ENV in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", "--max-mb", "-1"])


def test_builds_leave_no_lock_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for family in ("project-a", "project-b"):
        ensure_image(images, family, digest_of(family), write_bytes_build(1), description="t")
    assert not list(images.glob("*.lock"))


def test_failed_build_leaves_no_lock_file(tmp_path: Path) -> None:
    images = tmp_path / "images"

    def failing(tmp: Path) -> None:
        raise ImageError("mkfs.erofs failed")

    with pytest.raises(ImageError):
        ensure_image(images, "project-a", digest_of("x"), failing, description="t")
    assert not list(images.glob("*.lock")) and not list(images.iterdir())


def test_prune_removes_idle_lock_files_and_spares_held_ones(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    idle = images / "project-old.lock"  # left by a version that kept its lock files
    idle.touch()
    held = EntryLock(images / "project-building.lock", "image project-building")
    held.acquire(timeout=1)
    try:
        prune_images(images, max_bytes=1 << 40)
        assert not idle.exists()
        assert held.path.exists()
    finally:
        held.release()
