"""runtime/_thp: children start with transparent huge pages off, we are restored."""

from __future__ import annotations

import ctypes
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._thp import thp_disabled_for_children

pytestmark = pytest.mark.skipif(
    "THP_enabled" not in Path("/proc/self/status").read_text(),
    reason="the kernel does not report THP_enabled in /proc/<pid>/status",
)


def thp_enabled(status: str) -> bool:
    line = next(x for x in status.splitlines() if x.startswith("THP_enabled:"))
    return line.split()[1] == "1"


def child_thp_enabled() -> bool:
    out = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, check=True)
    return thp_enabled(out.stdout)


def our_thp_enabled() -> bool:
    return thp_enabled(Path("/proc/self/status").read_text())


@pytest.fixture(autouse=True)
def _thp_on() -> Iterator[None]:
    assert our_thp_enabled(), "THP already disabled for the test process"
    yield
    ctypes.CDLL(None).prctl(41, 0, 0, 0, 0)


def test_children_inside_start_without_thp_and_we_get_it_back() -> None:
    assert child_thp_enabled()
    with thp_disabled_for_children():
        assert not child_thp_enabled()
    assert our_thp_enabled() and child_thp_enabled()


def test_flag_stays_set_until_the_last_overlapping_caller_leaves() -> None:
    outer = thp_disabled_for_children()
    inner = thp_disabled_for_children()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # interleaved, as two tasks would
    assert not child_thp_enabled()
    inner.__exit__(None, None, None)
    assert child_thp_enabled()


def test_a_flag_set_before_is_left_set() -> None:
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
    with thp_disabled_for_children():
        pass
    assert not our_thp_enabled()
