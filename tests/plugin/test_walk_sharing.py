"""Under xdist, the workers reuse tree walks made since the controller started
(``runtime.images._walks``): the bound each process of a real ``-n 2`` run sets.
No VM: the tests are unmarked.
"""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import json, os
from pytest_microsandbox.runtime._walk_sharing import walks_fresh_since

def pytest_sessionfinish(session):
    # (not $PYTEST_XDIST_WORKER: an outer xdist run sets it for the controller too)
    name = getattr(session.config, "workerinput", {{}}).get("workerid", "controller")
    with open(os.path.join({out!r}, name), "w") as f:
        json.dump(walks_fresh_since(), f)
"""


def _bounds(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *env: tuple[str, str]
) -> dict[str, float | None]:
    out = pytester.mkdir("bounds")
    pytester.makeconftest(CONFTEST.format(out=str(out)))
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\n")
    for name, value in env:
        monkeypatch.setenv(name, value)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    return {p.name: json.loads(p.read_text()) for p in out.iterdir()}


def test_workers_take_the_controllers_start_as_their_bound(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds = _bounds(pytester, monkeypatch)
    assert set(bounds) == {"controller", "gw0", "gw1"}
    controller = bounds["controller"]
    assert isinstance(controller, float)
    assert bounds["gw0"] == bounds["gw1"] == controller


def test_sharing_can_be_turned_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds = _bounds(pytester, monkeypatch, ("MICROSANDBOX_SHARE_WALKS", "0"))
    assert bounds == {"controller": None, "gw0": None, "gw1": None}
