"""The ``sandbox`` fixture's forecast of the creates to come (plugin/_fixtures.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_microsandbox.plugin._fixtures import sandbox_uses


def _items(*fixtures: tuple[str, ...]) -> list[object]:
    return [SimpleNamespace(fixturenames=list(names)) for names in fixtures]


def test_only_tests_using_the_sandbox_fixture_count() -> None:
    items = _items(("sandbox",), ("tmp_path",), ("sandbox", "tmp_path"), ("sandbox_factory",))
    assert sandbox_uses(items, 1) == 2


@pytest.mark.parametrize(("workers", "share"), [(1, 5), (2, 3), (4, 2), (0, 5)])
def test_each_xdist_worker_expects_its_share_rounded_up(workers: int, share: int) -> None:
    assert sandbox_uses(_items(*[("sandbox",)] * 5), workers) == share


def test_items_without_fixture_names_count_as_not_using_it() -> None:
    assert sandbox_uses([object(), object()], 1) == 0
