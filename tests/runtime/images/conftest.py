"""Session fixtures: local OCI registries (Debian's docker-registry on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oci_helpers import Registry, run_registry


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An open registry on a free 127.0.0.1 port, with temporary storage."""
    with run_registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[Registry]:
    """A registry that wants Basic credentials (htpasswd, bcrypt): alice / s3cret."""
    with run_registry(user="alice", password="s3cret") as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry() -> Iterator[Registry]:
    """A registry in bearer-token mode; its token server (127.0.0.1) takes alice / s3cret."""
    with run_registry(user="alice", password="s3cret", token=True) as reg:
        yield reg
