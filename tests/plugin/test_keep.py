"""``--sandbox-keep-failed`` without a VM: kept names, the isolation it forces,
what its help says. The end-to-end run is in ``test_keep_vm.py``.
"""

from __future__ import annotations

import pytest

from pytest_microsandbox.plugin._hooks import get_plugin
from pytest_microsandbox.plugin._keep import how_to_reach
from pytest_microsandbox.plugin._names import KEPT_NAME_LIMIT, kept_name
from pytest_microsandbox.snapshots._store import check_name

pytest_plugins = ["pytester"]


def test_same_test_name_in_two_files_gets_two_names():
    a = kept_name("tests/test_a.py::test_same")
    b = kept_name("tests/test_b.py::test_same")
    assert a != b
    assert a.startswith("failed-tests-test_a.py-test_same-")
    assert b.startswith("failed-tests-test_b.py-test_same-")


def test_names_differ_where_the_cleaned_node_ids_collide():
    # Both clean to the same text: the digest keeps them apart.
    assert kept_name("t.py::test[a/b]") != kept_name("t.py::test[a-b]")
    assert kept_name("t.py::test", "sb-1") != kept_name("t.py::test", "sb-2")


@pytest.mark.parametrize(
    "nodeid",
    [
        "test_x.py::test_plain",
        "a/b/test_x.py::TestClass::test_m[param-with spaces/and::colons]",
        "-.weird::-",
        "t.py::test_" + "long" * 80,
        "t.py::тест[ünïcode]",
    ],
)
def test_names_are_valid_snapshot_names(nodeid: str):
    name = kept_name(nodeid, "sandbox")
    assert check_name(name) == name
    assert len(name) <= KEPT_NAME_LIMIT
    assert name == kept_name(nodeid, "sandbox")  # stable across runs


def test_a_long_node_id_keeps_its_test_name():
    name = kept_name("very/" * 40 + "test_x.py::test_the_one_that_failed")
    assert "test_the_one_that_failed" in name


def test_the_summary_names_the_shell_command():
    assert "microsandbox shell failed-x-1" in how_to_reach("failed-x-1")


@pytest.mark.parametrize("asked", ["process", "auto", "vm"])
def test_keep_failed_runs_marked_tests_in_their_own_vm(pytester: pytest.Pytester, asked: str):
    # Under process isolation a failed test leaves nothing to keep: the option
    # must give every marked test its own VM.
    config = pytester.parseconfigure("--sandbox-keep-failed", f"--sandbox-isolation={asked}")
    assert get_plugin(config)._isolation(asked) == "vm"
    config = pytester.parseconfigure("--sandbox-isolation=process")
    assert get_plugin(config)._isolation("process") == "process"


def test_help_says_a_snapshot_is_saved(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--help")
    text = " ".join(result.stdout.str().split())
    assert "--sandbox-keep-failed save a failed test's VM as a snapshot" in text
    assert "leave a failed test's VM running" not in text
