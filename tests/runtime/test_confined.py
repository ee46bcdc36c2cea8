"""The confined writer of guest data on the host: names, planted links, temporaries, budgets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import CopyLimitError, UnsafeHostPathError
from pytest_microsandbox.runtime._confined import (
    ConfinedDir,
    CopyBudget,
    check_entry_name,
    entry_name_problem,
)


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "/etc/x", "../../escape", "nul\0byte", b"..", b"x/y"]
)
def test_names_that_are_not_one_component_are_refused(name: str | bytes) -> None:
    assert entry_name_problem(name) is not None
    if isinstance(name, str):
        with pytest.raises(UnsafeHostPathError, match="one plain path component"):
            check_entry_name(name, "/dst")


@pytest.mark.parametrize("name", ["a", "...", ".hidden", "a b", "..x", "x..", "\udcff"])
def test_plain_names_pass(name: str) -> None:
    assert entry_name_problem(name) is None


def test_file_is_written_whole_with_its_mode_less_setuid(tmp_path: Path) -> None:
    with ConfinedDir.parent_of(tmp_path / "out.bin") as (parent, name):
        assert name == "out.bin"
        with parent.new_file(name, 0o4755) as out:
            out.write(b"abc")
            out.write(b"def")
            # Not visible under its name until complete; only the random temporary exists.
            (tmp,) = listing(tmp_path)
            assert tmp.startswith(".msb-") and tmp.endswith(".partial")
    assert (tmp_path / "out.bin").read_bytes() == b"abcdef"
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o755
    assert listing(tmp_path) == ["out.bin"]


def test_parent_of_creates_the_users_parent_and_follows_the_users_links(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "mine").symlink_to(real)
    with ConfinedDir.parent_of(tmp_path / "mine" / "new" / "f") as (parent, name):
        assert parent.path == str(tmp_path / "mine" / "new")
        with parent.new_file(name, 0o644) as out:
            out.write(b"x")
    assert (real / "new" / "f").read_bytes() == b"x"
    with pytest.raises(UnsafeHostPathError, match="names no file"), ConfinedDir.parent_of("/"):
        pass


def test_planted_symlink_at_the_final_name_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("host secret\n")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "out.txt").symlink_to(victim)
    # The old code's predictable temporary name, planted as a link too.
    (dst / ".out.txt.msb-partial").symlink_to(victim)
    with ConfinedDir.parent_of(dst / "out.txt") as (parent, name):
        assert name == "out.txt"
        with parent.new_file(name, 0o644) as out:
            out.write(b"guest bytes")
    assert victim.read_text() == "host secret\n"
    assert not (dst / "out.txt").is_symlink()
    assert (dst / "out.txt").read_bytes() == b"guest bytes"


def test_failure_removes_the_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    with ConfinedDir.parent_of(tmp_path / "f") as (parent, name):
        assert name == "f"
        with pytest.raises(RuntimeError), parent.new_file(name, 0o644) as out:
            out.write(b"new, partial")
            raise RuntimeError("transfer broke")
    assert listing(tmp_path) == ["f"]
    assert (tmp_path / "f").read_bytes() == b"old"


def test_a_directory_at_the_final_name_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with ConfinedDir.parent_of(tmp_path / "d") as (parent, name):
        assert name == "d"
        with pytest.raises(IsADirectoryError), parent.new_file(name, 0o644) as out:
            out.write(b"x")
    assert listing(tmp_path) == ["d"] and listing(tmp_path / "d") == []


@pytest.mark.parametrize("planted", ["symlink-to-dir", "symlink-to-file", "dangling", "file"])
def test_subdir_never_enters_a_link_or_non_directory(tmp_path: Path, planted: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    sub = dst / "sub"
    if planted == "symlink-to-dir":
        sub.symlink_to(elsewhere)
    elif planted == "symlink-to-file":
        sub.symlink_to(tmp_path / "file")
        (tmp_path / "file").write_text("x")
    elif planted == "dangling":
        sub.symlink_to(tmp_path / "nowhere")
    else:
        sub.write_text("a file")
    with ConfinedDir(os.open(dst, os.O_RDONLY | os.O_DIRECTORY), str(dst)) as top:
        with pytest.raises(UnsafeHostPathError, match=r"sub: it (is a symlink|exists and is not)"):
            top.subdir("sub")
        with pytest.raises(UnsafeHostPathError):
            top.descend(["sub"])
    assert listing(elsewhere) == []
    assert not (tmp_path / "nowhere").exists()


def test_descend_walks_component_by_component(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "a" / "link").symlink_to(tmp_path / "x")
    with ConfinedDir(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), str(tmp_path)) as top:
        with top.descend(["a", "b"]) as b, b.new_file("f", 0o600) as out:
            out.write(b"deep")
        with top.descend([]) as same, same.new_file("g", 0o600) as out:
            out.write(b"top")
        with pytest.raises(UnsafeHostPathError, match="is a symlink"):
            top.descend(["a", "link"])
        with pytest.raises(UnsafeHostPathError, match="one plain path component"):
            top.descend(["a", ".."])
    assert (tmp_path / "a" / "b" / "f").read_bytes() == b"deep"
    assert (tmp_path / "g").read_bytes() == b"top"
    assert listing(tmp_path / "x") == []


def test_symlinks_are_created_as_links_and_replace_without_following(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    with ConfinedDir(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), str(tmp_path)) as top:
        top.symlink("root", "/")
        top.symlink("loop", "loop")
        (tmp_path / "planted").symlink_to(victim)
        top.symlink("planted", "../elsewhere")
        with pytest.raises(UnsafeHostPathError, match="target"):
            top.symlink("bad", "a\0b")
        with pytest.raises(UnsafeHostPathError):
            top.symlink("../up", "x")
    assert os.readlink(tmp_path / "root") == "/"
    assert os.readlink(tmp_path / "loop") == "loop"
    assert os.readlink(tmp_path / "planted") == "../elsewhere"
    assert victim.read_text() == "keep"
    assert listing(tmp_path) == ["loop", "planted", "root", "victim"]


def test_temporary_names_are_unpredictable_and_exclusive(tmp_path: Path) -> None:
    names = set()
    with ConfinedDir(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), str(tmp_path)) as top:
        for _ in range(20):
            with top.new_file("f", 0o644):
                names.update(p.name for p in tmp_path.iterdir() if p.name != "f")
    assert len(names) == 20


def test_byte_budget_stops_before_writing_past_it(tmp_path: Path) -> None:
    budget = CopyBudget(max_bytes=10, max_entries=None, what="copying /g to /h")
    with ConfinedDir(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), str(tmp_path)) as top:
        with top.new_file("a", 0o644, budget=budget) as out:
            out.write(b"123456")
        limit = pytest.raises(CopyLimitError, match=r"max_bytes=10.*pass a larger max_bytes=")
        with limit, top.new_file("b", 0o644, budget=budget) as out:
            out.write(b"1234")
            out.write(b"5")  # 11 > 10
    assert listing(tmp_path) == ["a"]
    assert budget.bytes_used == 10


def test_entry_budget(tmp_path: Path) -> None:
    budget = CopyBudget(max_bytes=None, max_entries=2)
    budget.charge_entry("/a")
    assert budget.entries_left == 1
    budget.charge_entry("/b")
    with pytest.raises(CopyLimitError, match=r"/c would be entry 3.*max_entries=2"):
        budget.charge_entry("/c")
    assert CopyBudget(max_bytes=None, max_entries=None).entries_left is None
    with pytest.raises(ValueError, match="max_bytes"):
        CopyBudget(max_bytes=-1)


def test_a_link_swapped_in_after_mkdir_is_not_entered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a guest can run in a read-write volume: replace the directory the
    copy just made with a link before the copy enters it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_mkdir = os.mkdir

    def mkdir_then_swap(name: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(name, mode, dir_fd=dir_fd)
        os.rmdir(name, dir_fd=dir_fd)
        os.symlink(elsewhere, name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    top = ConfinedDir(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), str(tmp_path))
    with top, pytest.raises(UnsafeHostPathError, match="is a symlink"):
        top.subdir("sub")
    assert listing(elsewhere) == []
