"""Marks every test ``sandbox``: a run with ``--no-sandbox`` is the local run.

The fidelity test runs this directory twice (locally, then every test in a
guest) and compares the outcome of each test id.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.sandbox(timeout=120))
