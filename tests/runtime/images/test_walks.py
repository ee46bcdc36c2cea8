"""Tree walks shared by the processes of one run (``images._walks``): pure logic
on a temporary cache directory, no VM.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._exceptions import ImageError
from pytest_microsandbox.runtime._locks import cache_lock
from pytest_microsandbox.runtime._walk_sharing import share_walks_since, walks_fresh_since
from pytest_microsandbox.runtime.images._walks import (
    WALKS_DIR,
    FirstWalkShared,
    shared_fingerprint,
)

IDENTITY = ("images", "l-python", "python-abc", "__pycache__")


@pytest.fixture(autouse=True)
def _sharing_off() -> Iterator[None]:
    # This run's plugin turned sharing on for its own process.
    before = walks_fresh_since()
    share_walks_since(None)
    yield
    share_walks_since(before)


class Walker:
    """A fingerprint callable that counts its walks."""

    def __init__(self, result: str = "fp-1") -> None:
        self.result = result
        self.walks = 0

    def __call__(self) -> str:
        self.walks += 1
        return self.result


def test_without_a_bound_every_call_walks_and_nothing_is_recorded(tmp_path: Path) -> None:
    walker = Walker()
    assert walks_fresh_since() is None
    assert shared_fingerprint(tmp_path, IDENTITY, walker) == "fp-1"
    assert shared_fingerprint(tmp_path, IDENTITY, walker) == "fp-1"
    assert walker.walks == 2
    assert not (tmp_path / WALKS_DIR).exists()


def test_a_walk_made_since_the_run_started_is_reused(tmp_path: Path) -> None:
    share_walks_since(time.time())
    first, second = Walker("fp-1"), Walker("fp-2")
    assert shared_fingerprint(tmp_path, IDENTITY, first) == "fp-1"
    assert shared_fingerprint(tmp_path, IDENTITY, second) == "fp-1"
    assert (first.walks, second.walks) == (1, 0)
    # The lock file goes with its holder's release; the record stays.
    assert [p.suffix for p in (tmp_path / WALKS_DIR).iterdir()] == [".json"]


def test_a_walk_older_than_the_run_is_made_again(tmp_path: Path) -> None:
    share_walks_since(time.time())
    shared_fingerprint(tmp_path, IDENTITY, Walker("old"))
    share_walks_since(time.time() + 1)  # the next run starts after that walk
    fresh = Walker("new")
    assert shared_fingerprint(tmp_path, IDENTITY, fresh) == "new"
    assert fresh.walks == 1


def test_another_tree_or_exclusion_set_has_its_own_record(tmp_path: Path) -> None:
    share_walks_since(time.time())
    shared_fingerprint(tmp_path, IDENTITY, Walker("a"))
    other = Walker("b")
    assert shared_fingerprint(tmp_path, (*IDENTITY, "/project/.venv"), other) == "b"
    assert other.walks == 1


TOO_LONG = b'{"started": 1e300, "fingerprint": "f"' + b" " * 5000 + b"}"


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[1, 2]", b'{"started": "x", "fingerprint": "f"}',
     b'{"started": 1e300, "fingerprint": 7}', TOO_LONG],
)  # fmt: skip
def test_a_record_that_is_not_one_is_walked_over(tmp_path: Path, content: bytes) -> None:
    share_walks_since(time.time())
    shared_fingerprint(tmp_path, IDENTITY, Walker())
    (record,) = (tmp_path / WALKS_DIR).glob("*.json")
    record.write_bytes(content)
    walker = Walker("walked")
    assert shared_fingerprint(tmp_path, IDENTITY, walker) == "walked"
    assert walker.walks == 1
    assert json.loads(record.read_text())["fingerprint"] == "walked"


def test_only_the_first_call_of_a_layer_build_may_reuse_a_walk(tmp_path: Path) -> None:
    # The build's check after imaging must see the tree as it is now.
    share_walks_since(time.time())
    shared_fingerprint(tmp_path, IDENTITY, Walker("recorded"))
    tree = Walker("changed meanwhile")
    fingerprint = FirstWalkShared(tmp_path, IDENTITY, tree)
    assert fingerprint() == "recorded"
    assert fingerprint() == "changed meanwhile"
    assert tree.walks == 1


def test_a_bound_is_a_finite_time() -> None:
    with pytest.raises(ValueError, match="finite"):
        share_walks_since(float("nan"))


def _walk_in_child(cache: str, since: float, out: multiprocessing.Queue[str]) -> None:
    share_walks_since(since)

    def slow() -> str:
        time.sleep(0.3)
        return "child"

    out.put(shared_fingerprint(Path(cache), IDENTITY, slow))


def test_a_process_waits_for_a_walk_in_progress_instead_of_walking(tmp_path: Path) -> None:
    since = time.time()
    share_walks_since(since)
    results: multiprocessing.Queue[str] = multiprocessing.Queue()
    child = multiprocessing.get_context("fork").Process(
        target=_walk_in_child, args=(str(tmp_path), since, results)
    )
    child.start()
    try:
        deadline = time.monotonic() + 10
        while not list((tmp_path / WALKS_DIR).glob("*.lock")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the child holds the walk's lock
        walker = Walker("parent")
        assert shared_fingerprint(tmp_path, IDENTITY, walker) == "child"
        assert walker.walks == 0
        assert results.get(timeout=10) == "child"
    finally:
        child.join(10)


def test_a_cache_it_cannot_write_in_leaves_the_walk_to_this_process(tmp_path: Path) -> None:
    share_walks_since(time.time())
    (tmp_path / WALKS_DIR).write_text("a file where the directory goes")
    walker = Walker("own")
    assert shared_fingerprint(tmp_path, IDENTITY, walker) == "own"
    assert walker.walks == 1


def test_a_walk_held_past_the_lock_timeout_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share_walks_since(time.time())
    monkeypatch.setenv("MICROSANDBOX_CACHE_LOCK_TIMEOUT", "0.2")
    shared_fingerprint(tmp_path, IDENTITY, Walker())
    (record,) = (tmp_path / WALKS_DIR).glob("*.json")
    held = cache_lock(record.with_suffix(".lock"), "held by a test")
    held.acquire(5)
    try:
        walker = Walker("own")
        assert shared_fingerprint(tmp_path, IDENTITY, walker) == "own"
        assert walker.walks == 1
    finally:
        held.release()


def test_an_unreadable_tree_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    share_walks_since(time.time())

    def broken() -> str:
        raise ImageError("cannot fingerprint /nowhere")

    with pytest.raises(ImageError, match="nowhere"):
        shared_fingerprint(tmp_path, IDENTITY, broken)
