"""Edit-to-result benchmark: wall time of ``pytest`` on a marked test right after
its test file was edited (so the zygote must be rebuilt), and of the first run
in a new project directory.

Plain script (``python benchmarks/bench_edit.py [--rounds 3]``); prints a table.
Two ways are measured in the same run, alternating, on one temporary project
outside this repository (so the benchmark never changes the project it measures):

* ``from base``: the default: a base zygote (Python started, pytest warmed up,
  no project) is restored, the project copied in and collected;
* ``boot with project`` (the baseline, ``$MICROSANDBOX_PROJECT_COPY_MAX_MB=0``):
  the project is a layer of the VM, so an edit means a new template (cold boot)
  and a Python start in the guest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_microsandbox.plugin._zygote import COPY_MAX_ENV

TEST = """
import pytest

@pytest.mark.sandbox
def test_edit():
    assert {n} == {n}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(root: Path, edit: int, env: dict[str, str]) -> float:
    (root / "test_edit.py").write_text(TEST.format(n=edit))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox-require"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"pytest failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main(args: argparse.Namespace) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    ways = {"from base (default)": env, "boot with project (baseline)": {**env, COPY_MAX_ENV: "0"}}
    cases = [(what, way) for what in ("after an edit", "new project") for way in ways]
    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    edit = 0
    with tempfile.TemporaryDirectory(prefix="msb-bench-edit-") as tmp:
        root = Path(tmp) / "edited"
        root.mkdir()
        (root / "pytest.ini").write_text("[pytest]\n")
        for way_env in ways.values():  # build the base zygote and templates once
            edit += 1
            run(root, edit, way_env)
        for _ in range(args.rounds):
            for what, way in cases:
                edit += 1
                where = root
                if what == "new project":
                    where = Path(tmp) / f"new{edit}"
                    where.mkdir()
                    (where / "pytest.ini").write_text("[pytest]\n")
                times[what, way].append(run(where, edit, ways[way]))
    print(f"\nbench_edit (wall time of one pytest run, {args.rounds} rounds)")
    for (what, way), values in times.items():
        label = f"{what}, {way}"
        print(f"  {label:<45} p50 {pct(values, 0.5):6.1f} s   p95 {pct(values, 0.95):6.1f} s")
    for what in ("after an edit", "new project"):
        default, baseline = (statistics.median(times[what, way]) for way in ways)
        print(f"  {what + ': ratio baseline / default (p50)':<45} {baseline / default:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args())
