"""A real third-party suite, locally and with every test sandboxed (#16, #20 item 7).

Downloads the sdist of a small pure-Python project with a fast pytest suite
(default ``toolz==0.12.1``, 180 tests) from PyPI with
``pip download --no-binary :all: --no-deps`` (nothing vendored), extracts it and
runs its tests from the extracted tree:

* locally: plain ``pytest`` (the plugin loaded, nothing sandboxed);
* sandboxed: the same with ``--sandbox-all --sandbox-require``, warm: it is run
  until a run builds nothing (a process-isolation suite's first run serves its
  tests from a live VM, the second snapshots the zygote), then measured;
* with ``--compare-env NAME=VALUE``, sandboxed again with those variables set
  (a switch keeping an old behaviour; a variable the zygote keeps gets its own
  zygote), alternating with the others in every round.

Every run writes ``--junitxml``; its outcome per test id is compared with the
first local run's. ANY difference fails the benchmark (the ids are listed, exit
code 1). Sandboxed runs set ``$MICROSANDBOX_TIMINGS`` (``plugin/_timings.py``):
one line per test with the host runner's step durations and the guest's phase
durations from its reports, from which the per-test breakdown is printed.

Prints the wall time of each configuration (p50 over rounds), the
sandboxed/local ratio, per-test p50/p95 (local: pytest's phase durations from
the junit report; sandboxed: the host's whole ``run_item``), and where a
sandboxed test's time goes. hypothesis's pytest plugin is disabled in every run
(see bench_plugin.py).

    .venv/bin/python benchmarks/bench_suite.py [--package toolz==0.12.1] [--tests toolz]
        [--rounds 2] [--isolation process|vm] [--workers 0] [--compare-env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

Outcomes = dict[str, str]

#: (label, how it is computed from one timings line), in the order a test meets them.
STEPS: tuple[tuple[str, str], ...] = (
    ("host: plan, zygote check", "plan+zygote"),
    ("host: VM restore / worker start", "start"),
    ("hand-off: request sent -> guest setup starts", "handoff"),
    ("guest: fixture setup (setup phase)", "setup"),
    ("guest: test body under emulation (call)", "call"),
    ("guest: teardown phase", "teardown"),
    ("guest: reports made, logged, serialized", "guest_span-setup-call-teardown"),
    ("tail: teardown ends -> done read", "tail"),
    ("host: replay into pytest's hooks", "replay"),
    ("host: clone discard", "discard"),
    (
        "host: rest of run_item (logstart, send...)",
        "total-plan-zygote-start-exchange-replay-discard",
    ),
)


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
    """An ini at the sdist's root, so it is the rootdir (most sdists have none)."""
    if not any((root / name).exists() for name in ("pytest.ini", "tox.ini", "pyproject.toml")):
        (root / "pytest.ini").write_text("[pytest]\n")


def outcomes(junitxml: Path) -> tuple[Outcomes, list[float]]:
    """Outcome per test id, and each test's time as pytest measured it (its phases)."""
    result: Outcomes = {}
    times: list[float] = []
    for case in ET.parse(junitxml).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        times.append(float(case.get("time") or 0.0))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        if test_id in result:
            outcome = f"{result[test_id]}+{outcome}"  # a test id reported twice
        result[test_id] = outcome
    return result, times


def differences(reference: Outcomes, other: Outcomes) -> list[str]:
    return [
        f"{test_id}: local {reference.get(test_id, 'missing')}, "
        f"this run {other.get(test_id, 'missing')}"
        for test_id in sorted(reference.keys() | other.keys())
        if reference.get(test_id) != other.get(test_id)
    ]


def step_value(row: dict[str, float], expr: str) -> float:
    """``expr``: timings keys joined by + and - (a missing key counts 0)."""
    total, sign, name = 0.0, 1.0, ""
    for ch in expr + "+":
        if ch in "+-":
            total += sign * float(row.get(name, 0.0))
            sign, name = (1.0 if ch == "+" else -1.0), ""
        else:
            name += ch
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class Config:
    """One configuration of runs: its label, arguments and environment."""

    label: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    sandboxed: bool = True
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # pytest's and its VMs' CPU seconds
    per_test: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    root: Path, tests: str, config: Config, report: Path, timings: Path | None
) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.pop("MICROSANDBOX_TIMINGS", None)
    env.update(config.env)
    if timings is not None:
        env["MICROSANDBOX_TIMINGS"] = str(timings)
    args = [
        *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
        *("-p", "no:hypothesispytest", f"--junitxml={report}", tests, *config.args),
    ]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if not report.exists():
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pytest wrote no junit report (exit {proc.returncode})")
    return elapsed, proc.stdout


def print_breakdown(config: Config, wall: float) -> None:
    rows = config.timings
    if not rows:
        return
    n = len(rows)
    totals = [r.get("total", 0.0) for r in rows]
    print(f"\nwhere a sandboxed test's time goes: {config.label} ({n} tests, last round)")
    print(f"  {'step':<50} {'p50 ms':>8} {'mean ms':>8} {'share':>6}")
    mean_total = statistics.mean(totals)
    for label, expr in STEPS:
        values = [step_value(r, expr) for r in rows]
        mean = statistics.mean(values)
        share = 100 * mean / mean_total if mean_total else 0.0
        print(f"  {label:<50} {1000 * statistics.median(values):8.1f} "
              f"{1000 * mean:8.1f} {share:5.0f}%")  # fmt: skip
    print(f"  {'= run_item per test':<50} {1000 * statistics.median(totals):8.1f} "
          f"{1000 * mean_total:8.1f}")  # fmt: skip
    outside = wall - sum(totals)
    print(f"  outside the tests (pytest start, collection, plugin, VM start, exit): "
          f"{outside:.2f} s of {wall:.2f} s")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="toolz==0.12.1", help="name==version on PyPI")
    parser.add_argument("--tests", default="toolz", help="test path inside the sdist")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--isolation", choices=("process", "vm"), default="process")
    parser.add_argument("--workers", type=int, default=0, help="-n for every run")
    parser.add_argument(
        "--compare-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="also run sandboxed with these variables set (repeatable): a switch that keeps an "
        "old behaviour, measured against the default in the same rounds",
    )
    opts = parser.parse_args()
    common = ["-n", str(opts.workers)] if opts.workers else []
    sandbox = [
        *common,
        "--sandbox-all",
        "--sandbox-require",
        f"--sandbox-isolation={opts.isolation}",
    ]
    configs = [
        Config("local", common, sandboxed=False),
        Config(f"sandboxed ({opts.isolation})", sandbox),
    ]
    if opts.compare_env:
        extra = dict(item.partition("=")[::2] for item in opts.compare_env)
        configs.append(Config(f"{opts.isolation}, {' '.join(opts.compare_env)}", sandbox, extra))

    with tempfile.TemporaryDirectory(prefix="msb-bench-suite-") as tmp:
        work = Path(tmp)
        root = download(opts.package, work / "sdist")
        prepare(root)
        reports = work / "reports"
        reports.mkdir()
        count = iter(range(1_000_000))

        def one(config: Config) -> tuple[float, str, Outcomes, list[float], list[dict[str, float]]]:
            index = next(count)
            report = reports / f"{index}.xml"
            timings = reports / f"{index}.jsonl" if config.sandboxed else None
            seconds, stdout = run(root, opts.tests, config, report, timings)
            got, times = outcomes(report)
            rows = []
            if timings is not None and timings.exists():
                rows = [json.loads(line) for line in timings.read_text().splitlines()]
            return seconds, stdout, got, times, rows

        _, _, reference, _, _ = one(configs[0])
        print(f"{opts.package}: {len(reference)} tests, {opts.tests} in {root}")
        failures: dict[str, list[str]] = {}
        for config in configs[1:]:
            # At least twice (a process-isolation run after an edit serves its tests
            # from a live VM and builds nothing; the next one snapshots the zygote),
            # then until a run builds nothing.
            for attempt in range(4):
                seconds, stdout, got, _, _ = one(config)
                for line in differences(reference, got):
                    failures.setdefault(f"{config.label} (warm-up)", []).append(line)
                print(f"{config.label}: warm-up run {attempt + 1}: {seconds:.1f} s")
                if attempt >= 1 and "built this run" not in stdout:
                    break

        for _ in range(opts.rounds):
            for config in configs:
                cpu = children_cpu()
                seconds, _, got, times, rows = one(config)
                config.cpus.append(children_cpu() - cpu)
                config.walls.append(seconds)
                config.per_test = times
                config.timings = rows
                if rows:
                    config.per_test = [r.get("total", 0.0) for r in rows]
                for line in differences(reference, got):
                    failures.setdefault(config.label, []).append(line)

        local = statistics.median(configs[0].walls)
        print(f"\n{'run':<30} {'wall p50 s':>10} {'ratio':>6} {'CPU s':>6} {'test p50 ms':>11} "
              f"{'p95 ms':>8}  wall per round")  # fmt: skip
        for config in configs:
            wall = statistics.median(config.walls)
            p50, p95 = 1000 * pct(config.per_test, 0.5), 1000 * pct(config.per_test, 0.95)
            cpu = statistics.median(config.cpus)
            print(f"{config.label:<30} {wall:10.2f} {wall / local:5.1f}x {cpu:6.1f} {p50:11.1f} "
                  f"{p95:8.1f}  " + " ".join(f"{v:.2f}" for v in config.walls))  # fmt: skip
        print("(test p50/p95: local = pytest's phase durations; sandboxed = the host's run_item;")
        print(" CPU s: pytest's and its VMs' CPU time, p50: less load-sensitive than wall time)")
        for config in configs[1:]:
            print_breakdown(config, config.walls[-1])

        if failures:
            print("\nOUTCOME DIFFERENCES (the benchmark run fails):")
            for label, lines in failures.items():
                print(f"  {label}:")
                for line in sorted(set(lines)):
                    print(f"    {line}")
            return 1
        print("\noutcomes: identical to the local run in every run")
        return 0


if __name__ == "__main__":
    sys.exit(main())
