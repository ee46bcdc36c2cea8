"""A suite with ``filterwarnings = error``, subtests and conftest fixtures; it
knows nothing of sandboxes but its opt-outs (run with ``--sandbox-all``).
"""

from __future__ import annotations

import os
import warnings

import pytest


def test_conftest_fixtures(answer, resource):
    assert answer == 42
    assert resource == ["open"]


def test_assertion_diff(answer):
    assert {"answer": answer, "list": [1, 2]} == {"answer": 42, "list": [1, 3]}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parametrized(n):
    assert n < 3


def test_subtests_pass(subtests):
    for i in range(4):
        with subtests.test(msg="even", i=i):
            assert i % 1 == 0


def test_subtests_one_fails(subtests):
    for i in range(3):
        with subtests.test(i=i):
            assert i != 2, "two is out"


def test_warning_is_an_error():
    warnings.warn(DeprecationWarning("old api"), stacklevel=1)


def test_expected_warning_passes():
    with pytest.warns(UserWarning, match="careful"):
        warnings.warn(UserWarning("careful"), stacklevel=1)


def test_skip():
    pytest.skip("not here")


@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert 1 == 2


def test_captured_output():
    print("to stdout")
    assert 1 == 2, "failing with output"


def test_sandboxed(trace):
    trace("sandboxed")


@pytest.mark.sandbox(env={"STRICT_SUITE_VAR": "set by the marker"})
def test_marker_arguments_apply(trace):
    trace("marked")
    if os.environ.get("MICROSANDBOX_GUEST"):
        assert os.environ["STRICT_SUITE_VAR"] == "set by the marker"


@pytest.mark.no_sandbox
def test_no_sandbox_marker(trace):
    trace("no_sandbox")


@pytest.mark.sandbox(False)
def test_sandbox_false(trace):
    trace("sandbox_false")
