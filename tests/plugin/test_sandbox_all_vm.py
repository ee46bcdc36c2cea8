"""``--sandbox-all`` on a suite that knows nothing of sandboxes (#20): the project
in ``projects/strict_suite`` (``filterwarnings = error``, subtests, conftest
fixtures, two opt-outs) runs once locally and once with every test sandboxed;
outcomes, junitxml test cases and the ``-q``/``-rA`` lines must be the same.

Both runs happen once for the module (the sandboxed one builds a zygote).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_microsandbox.plugin._backend import availability

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

PROJECT = Path(__file__).parent / "projects" / "strict_suite"


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    cases: list[tuple[str, ...]]
    traces: set[str]

    @property
    def lines(self) -> list[str]:
        return self.result.stdout.splitlines()


def _cases(junitxml: Path) -> list[tuple[str, ...]]:
    """Each test case as (classname, name, then tag, message, type and text of each
    child), memory addresses blanked: what a reader of the report sees.
    """
    out = []
    for case in ET.parse(junitxml).getroot().iter("testcase"):
        row = [case.get("classname", ""), case.get("name", "")]
        for child in case:
            for value in (child.tag, child.get("message"), child.get("type"), child.text):
                row.append(re.sub(r"0x[0-9a-f]+", "0x?", (value or "").strip()))
        out.append(tuple(row))
    return out


def _run(root: Path, name: str, *args: str) -> Run:
    """Run the project in ``root`` (both runs use the same directory: junitxml has paths)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    junitxml = root.parent / f"{name}.xml"
    traces = root / "traces"
    shutil.rmtree(traces, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-q", "-rA", "--sandbox-all", f"--junitxml={junitxml}", *args],
        cwd=root, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    found = {p.name for p in traces.iterdir()} if traces.is_dir() else set()
    shutil.rmtree(traces, ignore_errors=True)
    return Run(result, _cases(junitxml) if junitxml.exists() else [], found)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run]:
    root = tmp_path_factory.mktemp("strict") / "strict_suite"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__", "traces"))
    local = _run(root, "local", "--no-sandbox")
    sandboxed = _run(root, "sandboxed", "--sandbox-require")
    return local, sandboxed


def _summary(run: Run) -> list[str]:
    """The -q progress line, the -rA short summary and the final counts (no time)."""
    lines = run.lines
    start = lines.index(next(x for x in lines if "short test summary info" in x))
    final = re.sub(r" in [0-9.]+s.*", "", lines[-1])
    return [lines[0], *lines[start + 1 : -1], final]


def test_the_local_run_is_what_the_suite_expects(runs: tuple[Run, Run]) -> None:
    local, _ = runs
    assert local.result.returncode == 1, local.result.stdout
    assert _summary(local)[-1] == "6 failed, 9 passed, 1 skipped, 1 xfailed, 6 subtests passed"
    assert local.traces == {f"{n}.host" for n in ("sandboxed", "marked", "no_sandbox",
                                                  "sandbox_false")}  # fmt: skip


def test_opt_outs_stay_on_the_host_and_the_rest_is_sandboxed(runs: tuple[Run, Run]) -> None:
    _, sandboxed = runs
    # The guest's writes never reach the host: only the opt-outs left a trace.
    assert sandboxed.traces == {"no_sandbox.host", "sandbox_false.host"}, sandboxed.result.stdout


def test_outcomes_and_junitxml_match_the_local_run(runs: tuple[Run, Run]) -> None:
    local, sandboxed = runs
    assert sandboxed.cases == local.cases, sandboxed.result.stdout[-6000:]
    assert sandboxed.result.returncode == local.result.returncode


def test_terminal_lines_match_the_local_run(runs: tuple[Run, Run]) -> None:
    local, sandboxed = runs
    assert _summary(sandboxed) == _summary(local), sandboxed.result.stdout[-6000:]
