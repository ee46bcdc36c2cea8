"""The hint that makes a run start its VM before the collection (plugin/_hint.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_microsandbox.plugin import _hint
from pytest_microsandbox.plugin._hint import (
    drop_live_hint,
    has_live_hint,
    live_cost,
    live_hint,
    write_live_cost,
    write_live_hint,
    write_zygote_hint,
    zygote_hint,
)


def test_a_hint_is_per_project_and_can_be_dropped(tmp_path: Path) -> None:
    cache, one, other = tmp_path / "cache", tmp_path / "one", tmp_path / "other"
    one.mkdir()
    other.mkdir()
    assert not has_live_hint(one, cache)
    write_live_hint(one, cache)
    write_live_hint(one, cache)  # idempotent
    assert has_live_hint(one, cache)
    assert has_live_hint(one / "." / "", cache)  # the same root, spelled otherwise
    assert not has_live_hint(other, cache)
    drop_live_hint(one, cache)
    drop_live_hint(one, cache)  # nothing to drop: no error
    assert not has_live_hint(one, cache)


def test_no_project_root_has_no_hint(tmp_path: Path) -> None:
    write_live_hint(None, tmp_path)
    assert not has_live_hint(None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_hint_names_the_base_it_used_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    assert live_hint(root, tmp_path) is None
    write_live_hint(root, tmp_path, "zygote-base-0123abcd")
    assert live_hint(root, tmp_path) == "zygote-base-0123abcd"
    write_live_hint(root, tmp_path, "zygote-base-4567")
    assert live_hint(root, tmp_path) == "zygote-base-4567"
    # Not a snapshot name (a damaged or hand-edited file): a hint without a guess.
    [path] = (tmp_path / "hints").iterdir()
    path.write_text("../../etc/passwd")
    assert live_hint(root, tmp_path) == ""
    assert has_live_hint(root, tmp_path)
    assert [p.name for p in (tmp_path / "hints").iterdir()] == [path.name]  # no temp file left


def test_only_the_newest_hints_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_hint, "HINTS_MAX", 3)
    roots = [tmp_path / f"p{i}" for i in range(5)]
    for i, root in enumerate(roots):
        root.mkdir()
        write_live_hint(root, tmp_path, f"zygote-base-{i}")
        path = _hint._hint_path(root, tmp_path)
        assert path is not None
        os.utime(path, (1000 + i, 1000 + i))  # written in this order
    write_live_hint(roots[4], tmp_path, "zygote-base-new")  # trims to the newest 3
    assert [has_live_hint(r, tmp_path) for r in roots] == [False, False, True, True, True]


def _args(files: list[str]) -> list[str]:
    return ["-q", *files]


def test_the_zygote_hint_holds_while_files_and_arguments_are_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    test, conftest = root / "test_x.py", root / "conftest.py"
    test.write_text("def test_x(): pass\n")
    conftest.write_text("")
    assert zygote_hint(root, tmp_path, _args) is None
    files = [str(test)]
    write_zygote_hint(root, tmp_path, "zygote-0123", files, [test, conftest], _args(files))
    assert zygote_hint(root, tmp_path, _args) == "zygote-0123"
    # Other arguments for the same files (another option): another zygote.
    assert zygote_hint(root, tmp_path, lambda f: ["-v", *f]) is None
    conftest.write_text("import os\n")  # an edit: the name would change
    assert zygote_hint(root, tmp_path, _args) is None
    write_zygote_hint(root, tmp_path, "zygote-4567", files, [test, conftest], _args(files))
    assert zygote_hint(root, tmp_path, _args) == "zygote-4567"
    conftest.unlink()
    assert zygote_hint(root, tmp_path, _args) is None
    assert zygote_hint(tmp_path / "other", tmp_path, _args) is None  # per project


def test_a_damaged_zygote_hint_is_no_hint(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    write_zygote_hint(root, tmp_path, "zygote-0123", [], [], _args([]))
    [path] = (tmp_path / "hints").iterdir()
    for text in ("{", "[]", '{"zygote": "../x", "files": [], "watched": [], "digest": ""}',
                 '{"zygote": "z", "files": [1], "watched": [], "digest": ""}'):  # fmt: skip
        path.write_text(text)
        assert zygote_hint(root, tmp_path, _args) is None
    assert [p.name for p in (tmp_path / "hints").iterdir()] == [path.name]  # no temp file left


def test_a_live_start_cost_is_per_project_and_per_zygote(tmp_path: Path) -> None:
    cache, one, other = tmp_path / "cache", tmp_path / "one", tmp_path / "other"
    assert live_cost(one, cache, "zyg-a") is None
    write_live_cost(one, cache, "zyg-a", 11.5)
    assert live_cost(one, cache, "zyg-a") == 11.5
    assert live_cost(one, cache, "zyg-b") is None  # an edit: another zygote
    assert live_cost(other, cache, "zyg-a") is None
    write_live_cost(one, cache, "zyg-b", 1.0)  # the last live start is what counts
    assert live_cost(one, cache, "zyg-a") is None and live_cost(one, cache, "zyg-b") == 1.0
    assert live_cost(None, cache, "zyg-b") is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"zygote": "z"}',
        '{"zygote": "z", "seconds": "9"}',
        '{"zygote": "z", "seconds": -1}',
    ],
)
def test_an_unreadable_live_cost_is_no_cost(tmp_path: Path, text: str) -> None:
    cache = tmp_path / "cache"
    write_live_cost(tmp_path, cache, "z", 5.0)
    path = next((cache / "hints").glob("livecost-*"))
    path.write_text(text)
    assert live_cost(tmp_path, cache, "z") is None
