"""Shared fixtures: one booted sandbox per test session for the focused VM tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox


@pytest.fixture(scope="session")
def shared_sandbox() -> Iterator[SyncSandbox]:
    """A sandbox shared by read-mostly VM tests (each test cleans up after itself)."""
    with SyncSandbox.create(SandboxConfig(name="tests-shared", memory=1024, cpus=2)) as sb:
        yield sb
