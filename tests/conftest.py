"""Shared fixtures: one booted sandbox per test session for the focused VM tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox
from pytest_microsandbox.runtime.network import LOOPBACK_ONLY_ENV
from pytest_microsandbox.runtime.network._stack import GUARD_REFUSALS


@pytest.fixture(scope="session")
def shared_sandbox() -> Iterator[SyncSandbox]:
    """A sandbox shared by read-mostly VM tests (each test cleans up after itself)."""
    with SyncSandbox.create(SandboxConfig(name="tests-shared", memory=1024, cpus=2)) as sb:
        yield sb


# Every sandbox network in this suite dials only 127.0.0.0/8 and never asks a
# real DNS resolver: the host side refuses anything else (runtime/network).
os.environ[LOOPBACK_ONLY_ENV] = "1"


@pytest.fixture(scope="session", autouse=True)
def _network_stays_on_loopback() -> Iterator[None]:
    """Fail the run if a sandbox's host side was ever asked to dial outside
    127.0.0.0/8 (the guard refused it; a test that triggers that is wrong).
    """
    yield
    assert not GUARD_REFUSALS, f"sandboxes tried to leave loopback: {list(GUARD_REFUSALS)}"
