"""Fixtures of the strict suite (tests/plugin/test_sandbox_all_vm.py runs it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Where a test that must run on the host leaves a trace (a guest's writes never
#: reach the host).
TRACES = Path(__file__).parent / "traces"


@pytest.fixture
def answer() -> int:
    return 42


@pytest.fixture
def resource() -> Iterator[list[str]]:
    opened = ["open"]
    yield opened
    opened.clear()


@pytest.fixture
def trace():
    def leave(name: str) -> None:
        TRACES.mkdir(exist_ok=True)
        where = "guest" if os.environ.get("MICROSANDBOX_GUEST") else "host"
        (TRACES / f"{name}.{where}").write_text(where)

    return leave
