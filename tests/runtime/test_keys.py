"""The one cache-key encoding: length-prefixed parts, so no two sequences collide."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._keys import KeyHasher, digest_parts, sha256_file


def test_parts_are_length_prefixed() -> None:
    expected = hashlib.sha256(
        (2).to_bytes(8, "big") + b"ab" + (0).to_bytes(8, "big") + (1).to_bytes(8, "big") + b"\xff"
    ).hexdigest()
    assert digest_parts("ab", "", b"\xff") == expected


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("ab", "c"), ("a", "bc")),  # plain concatenation would collide
        (("a\0", "b"), ("a", "\0b")),  # so would a NUL separator
        (("a", ""), ("a",)),  # an empty part still counts
        (("x:1", "2"), ("x", "1:2")),
        ((), ("",)),
    ],
)
def test_different_sequences_never_collide(one: tuple[str, ...], other: tuple[str, ...]) -> None:
    assert digest_parts(*one) != digest_parts(*other)


def test_str_and_bytes_agree_and_odd_names_keep_their_bytes() -> None:
    assert digest_parts("é") == digest_parts("é".encode())
    name = b"\xff\xfe".decode("utf-8", "surrogateescape")  # a non-UTF-8 file name
    assert digest_parts(name) == digest_parts(b"\xff\xfe")


def test_incremental_equals_one_shot_and_length_cuts() -> None:
    hasher = KeyHasher().add("a").add("b", b"c")
    assert hasher.hexdigest() == digest_parts("a", "b", "c")
    assert len(digest_parts("a")) == 64
    assert digest_parts("a", length=24) == digest_parts("a")[:24]


def test_sha256_file(tmp_path: Path) -> None:
    for size in (0, 10, (1 << 20) + 7):
        path = tmp_path / f"f{size}"
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
