"""A sandboxed test behaves like a local one (#17): the suite in cases/ runs
twice, locally (``--no-sandbox``) and with every test marked ``sandbox`` (its
conftest marks them), and both junit reports must agree test by test.

The cases exercise what real suites touch (servers on localhost, capture,
subprocesses, signals, multiprocessing, users, locale, time zones); where a
guest differs on purpose (it runs as root, it has its own hostname) the case
asserts what holds in both, and the README says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_microsandbox.plugin._backend import availability

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

CASES = Path(__file__).parent / "cases"

#: The cases that do not pass, on purpose: the rest must pass locally.
NOT_PASSED = {
    "test_fixtures.py::test_expected_failure_is_reported_as_failed": "failed",
    "test_fixtures.py::test_xfail": "xfailed",
    "test_fixtures.py::test_skip": "skipped",
}


def outcomes(junitxml: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, message)}`` from a junit report (message: failures only)."""
    result: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junitxml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        test_id = f"{module}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag == "failure":
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "error":
                outcome, message = "error", child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome = "xfailed" if xfail else "skipped"
        assert test_id not in result, f"{test_id} reported twice"
        result[test_id] = (outcome, message)
    return result


def differences(
    local: dict[str, tuple[str, str]], sandboxed: dict[str, tuple[str, str]]
) -> list[str]:
    """One line per test id whose outcome differs (or that only one run has)."""
    return [
        f"{test_id}: local {local.get(test_id, ('missing',))[0]}, "
        f"sandboxed {sandboxed.get(test_id, ('missing',))[0]} "
        f"{sandboxed.get(test_id, ('', ''))[1]!r}"
        for test_id in sorted(local.keys() | sandboxed.keys())
        if local.get(test_id) != sandboxed.get(test_id)
    ]


def run_cases(root: Path, junitxml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-q", "-rfE", f"--junitxml={junitxml}", *args],
        cwd=root, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip


def test_outcomes_are_read_per_test_id(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="test_a" name="test_ok"/>'
        '<testcase classname="sub.test_b" name="test_x[1]"><failure message="boom"/></testcase>'
        '<testcase classname="test_a" name="test_s"><skipped type="pytest.skip"/></testcase>'
        '<testcase classname="test_a" name="test_xf"><skipped type="pytest.xfail"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = outcomes(report)
    assert got == {
        "test_a.py::test_ok": ("passed", ""),
        "sub/test_b.py::test_x[1]": ("failed", "boom"),
        "test_a.py::test_s": ("skipped", ""),
        "test_a.py::test_xf": ("xfailed", ""),
    }
    changed = dict(got, **{"test_a.py::test_ok": ("failed", "E")})
    del changed["test_a.py::test_s"]
    assert differences(got, changed) == [
        "test_a.py::test_ok: local passed, sandboxed failed 'E'",
        "test_a.py::test_s: local skipped, sandboxed missing ''",
    ]


def test_sandboxed_run_matches_the_local_run(tmp_path: Path) -> None:
    root = tmp_path / "cases"
    shutil.copytree(CASES, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pytest.ini").write_text("[pytest]\n")

    local_run = run_cases(root, tmp_path / "local.xml", "--no-sandbox")
    local = outcomes(tmp_path / "local.xml")
    assert len(local) >= 30, local_run.stdout
    unexpected = {k: v[0] for k, v in local.items() if v[0] != NOT_PASSED.get(k, "passed")}
    assert not unexpected, f"cases that fail locally: {unexpected}\n{local_run.stdout}"

    guest_run = run_cases(root, tmp_path / "sandboxed.xml", "--sandbox-require")
    sandboxed = outcomes(tmp_path / "sandboxed.xml")
    diff = differences(local, sandboxed)
    assert not diff, "\n".join([*diff, guest_run.stdout[-6000:], guest_run.stderr[-2000:]])
    assert guest_run.returncode == local_run.returncode == 1
    assert "sandboxes created" in guest_run.stdout  # the tests did run in guests
