"""Examples: each test drives a throwaway microVM through the ``sandbox`` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[SyncSandbox]:
    """A fresh sandbox per test, always stopped afterwards."""
    name = "ex-" + request.node.name.replace("[", "-").replace("]", "")[:40]
    with SyncSandbox.create(SandboxConfig(name=name)) as sb:
        yield sb
