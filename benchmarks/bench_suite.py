"""A real third-party suite, locally and with every test sandboxed (#17 item 3).

Downloads the sdist of a small pure-Python project with a fast pytest suite
(default ``toolz==0.12.1``, 180 tests) with
``pip download --no-binary :all: --no-deps``, extracts it, and runs its tests
from the extracted tree:

* locally (``--no-sandbox``) and sandboxed (a conftest marks every item
  ``sandbox``), each with ``-n 0`` and ``-n 2``, alternating for ``--rounds``
  rounds after one sandboxed warm-up run that builds the zygote;
* every run writes ``--junitxml``; its outcome per test id is compared with
  the first local ``-n 0`` run's. ANY difference (a test that passes locally
  and fails sandboxed, a missing test) fails the benchmark run: the differing
  ids are listed and the exit code is 1.

Prints the wall time p50 of each configuration and the sandboxed/local ratio.
hypothesis's pytest plugin is disabled in every run (see bench_plugin.py).

    .venv/bin/python benchmarks/bench_suite.py [--package toolz==0.12.1] [--tests toolz]
                                               [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

MARK_ALL = """

# added by pytest-microsandbox's benchmarks/bench_suite.py: every test sandboxed
# (the local runs pass --no-sandbox, which runs marked tests locally).
import pytest as _msb_pytest


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(_msb_pytest.mark.sandbox(timeout=300))
"""

Outcomes = dict[str, str]


def download(package: str, dest: Path) -> Path:
    """The extracted source tree of ``package`` (``name==version``)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         "--quiet", "-d", str(dest), package],
        check=True,
    )  # fmt: skip
    archives = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
    if len(archives) != 1:
        raise SystemExit(f"expected one sdist for {package} in {dest}, got {archives}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(dest, filter="data")
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise SystemExit(f"expected one directory in the sdist of {package}, got {roots}")
    return roots[0]


def prepare(root: Path) -> None:
    conftest = root / "conftest.py"
    text = conftest.read_text() if conftest.exists() else ""
    if "pytest_collection_modifyitems" in text:
        raise SystemExit(f"{conftest} defines pytest_collection_modifyitems: pick another suite")
    conftest.write_text(text + MARK_ALL)
    ini = root / "pytest.ini"
    if not ini.exists():
        ini.write_text("[pytest]\n")


def outcomes(junitxml: Path) -> Outcomes:
    result: Outcomes = {}
    for case in ET.parse(junitxml).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        if test_id in result:
            outcome = f"{result[test_id]}+{outcome}"  # a test id reported twice
        result[test_id] = outcome
    return result


def differences(reference: Outcomes, other: Outcomes) -> list[str]:
    return [
        f"{test_id}: local {reference.get(test_id, 'missing')}, "
        f"this run {other.get(test_id, 'missing')}"
        for test_id in sorted(reference.keys() | other.keys())
        if reference.get(test_id) != other.get(test_id)
    ]


def run(root: Path, tests: str, report: Path, sandboxed: bool, workers: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    args = [
        *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
        *("-p", "no:hypothesispytest", "-n", str(workers), f"--junitxml={report}", tests),
        "--sandbox-require" if sandboxed else "--no-sandbox",
    ]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if not report.exists():
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pytest wrote no junit report (exit {proc.returncode})")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="toolz==0.12.1", help="name==version on PyPI")
    parser.add_argument("--tests", default="toolz", help="test path inside the sdist")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="msb-bench-suite-") as tmp:
        work = Path(tmp)
        root = download(opts.package, work / "sdist")
        prepare(root)
        reports = work / "reports"
        reports.mkdir()
        count = iter(range(1_000_000))

        def one(sandboxed: bool, workers: int) -> tuple[float, Outcomes]:
            report = reports / f"{next(count)}.xml"
            seconds = run(root, opts.tests, report, sandboxed, workers)
            return seconds, outcomes(report)

        _, reference = one(False, 0)
        print(f"{opts.package}: {len(reference)} tests, {opts.tests} in {root}")
        build_seconds, warm = one(True, 0)  # builds the zygote (and template) if needed
        print(f"sandboxed warm-up (zygote build): {build_seconds:.1f} s")

        times: dict[tuple[bool, int], list[float]] = {}
        failures: dict[str, list[str]] = {}
        if diff := differences(reference, warm):
            failures["sandboxed -n 0 (warm-up)"] = diff
        for _ in range(opts.rounds):
            for workers in (0, 2):
                for sandboxed in (False, True):
                    seconds, got = one(sandboxed, workers)
                    times.setdefault((sandboxed, workers), []).append(seconds)
                    label = f"{'sandboxed' if sandboxed else 'local'} -n {workers}"
                    for line in differences(reference, got):
                        failures.setdefault(label, []).append(line)

        print(f"{'run':<16} {'p50 s':>8}  rounds")
        for (sandboxed, workers), values in sorted(times.items()):
            label = f"{'sandboxed' if sandboxed else 'local'} -n {workers}"
            print(f"{label:<16} {statistics.median(values):8.2f}  "
                  + " ".join(f"{v:.2f}" for v in values))  # fmt: skip
        for workers in (0, 2):
            ratio = statistics.median(times[(True, workers)]) / statistics.median(
                times[(False, workers)]
            )
            print(f"sandboxed/local at -n {workers}: {ratio:.1f}x")

        if failures:
            print("\nOUTCOME DIFFERENCES (the benchmark run fails):")
            for label, lines in failures.items():
                print(f"  {label}:")
                for line in sorted(set(lines)):
                    print(f"    {line}")
            return 1
        print("outcomes: identical to the local run in every run")
        return 0


if __name__ == "__main__":
    sys.exit(main())
