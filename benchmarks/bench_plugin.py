"""The plugin's per-test cost, against baselines measured in the same run.

* 50 trivial tests unmarked (host pytest): the floor.
* the same 50 marked, under each isolation level ("process", "vm"), zygote
  prebuilt, with the default two vCPUs and with one.
* the same 50 as 50 fresh ``python -m pytest file::test`` host processes: what
  "isolation by a new process" costs without a VM.
* 40-test marked suites with ``-n 2`` vs ``-n 0``: trivial tests (fixed costs
  dominate) and tests that do some work.

Per-test wall time is taken on the host between consecutive
``pytest_runtest_logfinish`` calls (timing plugin below), so it includes the
restore/fork and report round trip, not just the guest's own durations.

The ``-n`` comparison alternates ``-n 0`` and ``-n 2`` for ``--rounds`` rounds
(default 5; this machine is noisy) and prints, for each, the wall time's p50
and p95, the ratio of each round's two runs (p50 and the range: a round's
two runs see about the same load) and the host CPU time of each run (the
pytest processes, their xdist workers and their QEMUs, ``RUSAGE_CHILDREN``),
which the machine's other load changes less than the wall time.

Every run disables hypothesis's pytest plugin: our test extras install
hypothesis, and its plugin imports all of hypothesis in the terminal summary
of every pytest process (~1 s here, paid again by each xdist worker and by
every fresh-process baseline run). That measures hypothesis, not us, and a
user's venv need not have it; ``--keep-hypothesis`` measures with it loaded.

    .venv/bin/python benchmarks/bench_plugin.py [--baseline-runs 50] [--rounds 5] [--xdist-only]

``--xdist-only`` runs the ``-n`` comparison alone. ``--before REV`` runs only
the marked tests under ``process`` and then ``vm`` isolation, ``--rounds``
times each, alternating this checkout with git revision REV's code, and prints
each side's overhead per round, per-test p50/p95 and the rounds' ratios. ``--process-ab VAR=VALUE``
runs only the marked tests under ``process`` isolation, ``--rounds`` times
each, alternating runs without and with VAR=VALUE in the environment (e.g.
``MICROSANDBOX_TCG_CPU=max``, the guest CPU before issue #16's third pass),
and prints each round's overhead over unmarked and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _timing import TIMING_PLUGIN

SUITE = """
import pytest

pytestmark = pytest.mark.sandbox if MARKED else []


@pytest.mark.parametrize("i", range(40))
def test_a(i):
    assert i >= 0


@pytest.mark.parametrize("i", range(10))
def test_b(i):
    assert i >= 0


@pytest.mark.parametrize("i", range(40))
def test_c(i):  # real work: ~50 ms on the host, ~1 s under TCG
    assert sum(k * k for k in range(1_000_000)) > i
"""


def _write(root: Path, marked: bool) -> Path:
    d = root / ("marked" if marked else "plain")
    d.mkdir(parents=True, exist_ok=True)
    (d / "pytest.ini").write_text("[pytest]\n")
    (d / "msb_bench_timing.py").write_text(TIMING_PLUGIN)
    (d / "test_bench.py").write_text(f"MARKED = {marked}\n" + SUITE)
    return d


#: Extra pytest arguments for every run (see the module docstring).
EXTRA_ARGS: list[str] = ["-p", "no:hypothesispytest"]


#: Host CPU seconds (user + system) of the last :func:`_run`'s process tree.
LAST_CPU: list[float] = [0.0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(d: Path, *args: str, out: Path | None = None, src: Path | None = None) -> float:
    """One pytest run in ``d``; ``src``: a ``src`` tree put first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(d) if src is None else f"{src}{os.pathsep}{d}"
    if out is not None:
        out.unlink(missing_ok=True)
        env["MSB_BENCH_OUT"] = str(out)
    cpu = _children_cpu()
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "msb_bench_timing", *EXTRA_ARGS, *args],
        cwd=d, env=env, capture_output=True, text=True,
    )  # fmt: skip
    took = time.monotonic() - start
    LAST_CPU[0] = _children_cpu() - cpu  # QEMUs count when reaped below the pytest
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({args}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took


def _per_test(out: Path) -> list[float]:
    return [float(x) for x in out.read_text().split()]


def _fmt(values: object) -> str:
    assert isinstance(values, list)
    return "/".join(f"{v:.1f}" for v in values)


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep-hypothesis", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--xdist-only", action="store_true", help="only the -n 2 vs -n 0 rounds")
    parser.add_argument("--process-ab", metavar="VAR=VALUE", help="process isolation A/B")
    parser.add_argument("--before", metavar="REV", help="per-test A/B against git REV's code")
    args = parser.parse_args()
    if args.keep_hypothesis:
        EXTRA_ARGS.clear()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="msb-bench-plugin-") as tmp:
        root = Path(tmp)
        plain, marked = _write(root, False), _write(root, True)
        out = root / "times.txt"
        if args.process_ab:
            _process_ab(args, plain, marked, out)
            return 0
        if args.before:
            _before_ab(args, plain, marked, out, root / "before")
            return 0

        if not args.xdist_only:
            _per_test_part(args, results, plain, marked, out)
        _xdist_part(args, results, marked)

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print("pytest-microsandbox plugin benchmark (host wall time per test, p50)")
    print(f"  extra pytest arguments: {' '.join(EXTRA_ARGS) or '(none)'}")
    if not args.xdist_only:
        _print_per_test(results)
    for name, what in (("test_a", "trivial"), ("test_c", "with ~1 s of guest CPU each")):
        print(f"  40 marked tests, {what}, {args.rounds} alternating rounds:")
        for n in ("n0", "n2"):
            print(
                f"    -n {n[1]}: wall p50 {results[f'{n}_{name}_s']:.1f} s "
                f"p95 {results[f'{n}_{name}_p95_s']:.1f} s, host CPU p50 "
                f"{results[f'{n}_{name}_cpu_s']:.1f} s "
                f"(rounds {_fmt(results[f'{n}_{name}_all_s'])} s; "
                f"CPU {_fmt(results[f'{n}_{name}_cpu_all_s'])} s)"
            )
        print(
            f"    -n 2 is {results[f'n0_over_n2_{name}']:.2f}x as fast (p50 of the rounds' "
            f"same-run ratios, range {results[f'n0_over_n2_{name}_min']:.2f}-"
            f"{results[f'n0_over_n2_{name}_max']:.2f}); CPU -n 2 / -n 0: "
            f"{results[f'n2_over_n0_cpu_{name}']:.2f}"
        )
    return 0


def _per_test_part(
    args: argparse.Namespace, results: dict[str, object], plain: Path, marked: Path, out: Path
) -> None:
    _run(plain, "-k", "not test_c", out=out)
    unmarked = _per_test(out)
    results["unmarked_p50_ms"] = statistics.median(unmarked) * 1000

    # Same environment as the measured runs: the environment is part of the zygote key.
    build = _run(marked, "--sandbox-isolation=process", "test_bench.py::test_b[0]", out=out)
    results["zygote_build_run_s"] = build
    # The plugin's defaults (cpus=2), then one vCPU: process isolation forks
    # the next test's process on the second vCPU while a test runs.
    for key, level, extra in (
        ("process", "process", ()),
        ("vm", "vm", ()),
        ("process_cpus1", "process", ("--sandbox-cpus=1",)),
        ("vm_cpus1", "vm", ("--sandbox-cpus=1",)),
    ):
        _run(marked, f"--sandbox-isolation={level}", *extra, "test_bench.py::test_b[0]")
        total = _run(marked, f"--sandbox-isolation={level}", *extra, "-k", "not test_c", out=out)
        times = _per_test(out)
        results[f"{key}_p50_ms"] = statistics.median(times) * 1000
        results[f"{key}_p95_ms"] = _p(times, 0.95) * 1000
        results[f"{key}_total_s"] = total
        results[f"{key}_overhead_p50_ms"] = (
            statistics.median(times) - statistics.median(unmarked)
        ) * 1000

    fresh = []
    for i in range(args.baseline_runs):
        case = f"test_bench.py::test_a[{i}]" if i < 40 else f"test_bench.py::test_b[{i - 40}]"
        fresh.append(_run(plain, case))
    results["fresh_process_p50_ms"] = statistics.median(fresh) * 1000


#: One side of an A/B: its label, a variable set for its runs (or None) and a
#: ``src`` tree put first on ``PYTHONPATH`` (or None: this checkout).
_Arm = tuple[str, tuple[str, str] | None, Path | None]


def _alternate(
    args: argparse.Namespace, marked: Path, out: Path, unmarked: float, level: str,
    arms: list[_Arm],
) -> None:  # fmt: skip
    """The 50 marked tests under ``level`` isolation, ``--rounds`` times for each
    arm, alternating; prints each arm's overhead per round, per-test p50/p95 and
    the rounds' ratios of the second arm to the first.
    """

    def run(arm: _Arm, *pytest_args: str, into: Path | None = None) -> None:
        _, variable, src = arm
        name, value = variable or ("", None)
        with _env(name, value) if variable else contextlib.nullcontext():
            _run(marked, f"--sandbox-isolation={level}", *pytest_args, out=into, src=src)

    runs: dict[str, list[float]] = {label: [] for label, _, _ in arms}
    every: dict[str, list[float]] = {label: [] for label, _, _ in arms}
    for arm in arms:  # each arm's zygote, built before the rounds
        run(arm, "test_bench.py::test_b[0]")
    for i in range(args.rounds):
        for arm in arms[:: 1 if i % 2 == 0 else -1]:
            run(arm, "-k", "not test_c", into=out)
            times = _per_test(out)[1:]  # the first includes the VM start
            runs[arm[0]].append((statistics.median(times) - unmarked) * 1000)
            every[arm[0]] += times
    print(f"  {level} isolation:")
    for label, overheads in runs.items():
        print(
            f"    {label}: overhead p50 {statistics.median(overheads):.1f} ms per round "
            f"({_fmt(overheads)}); per test p50 {statistics.median(every[label]) * 1000:.1f} ms, "
            f"p95 {_p(every[label], 0.95) * 1000:.1f} ms"
        )
    first, second = (runs[label] for label, _, _ in arms)
    ratios = [b / a for a, b in zip(first, second, strict=True)]
    print(
        f"    rounds' ratios {arms[1][0]} / {arms[0][0]}: {'/'.join(f'{r:.2f}' for r in ratios)} "
        f"(p50 {statistics.median(ratios):.2f}); load average {os.getloadavg()[0]:.1f}"
    )


def _unmarked(plain: Path, out: Path) -> float:
    _run(plain, "-k", "not test_c", out=out)
    return statistics.median(_per_test(out))


def _process_ab(args: argparse.Namespace, plain: Path, marked: Path, out: Path) -> None:
    name, _, value = args.process_ab.partition("=")
    unmarked = _unmarked(plain, out)
    print(f"50 trivial marked tests, {args.rounds} alternating rounds")
    print(f"  unmarked (host pytest) p50 {unmarked * 1000:.2f} ms")
    arms: list[_Arm] = [("default", None, None), (args.process_ab, (name, value), None)]
    _alternate(args, marked, out, unmarked, "process", arms)


def _before_ab(args: argparse.Namespace, plain: Path, marked: Path, out: Path, into: Path) -> None:
    """The 50 marked tests under each isolation level, ``--rounds`` times each,
    alternating runs of this checkout and of git revision ``--before`` (its
    ``src`` first on ``PYTHONPATH``, as ``bench_snapshots.py --before`` does).
    """
    from bench_snapshots import _export_src

    into.mkdir()
    src, commit = _export_src(args.before, into)
    unmarked = _unmarked(plain, out)
    print(f"50 trivial marked tests, {args.rounds} alternating rounds, this checkout and {commit}")
    print(f"  unmarked (host pytest) p50 {unmarked * 1000:.2f} ms")
    arms: list[_Arm] = [("now", None, None), (f"before ({commit})", None, src)]
    for level in ("process", "vm"):
        _alternate(args, marked, out, unmarked, level, arms)


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _xdist_part(args: argparse.Namespace, results: dict[str, object], marked: Path) -> None:
    for name in ("test_a", "test_c"):
        # The base zygote and the project's hint; then the zygote a -n 2 run after
        # a -n 0 run builds (see _zygote.start_live): the rounds measure reruns.
        _run(marked, "-k", name, "-n", "2")
        _run(marked, "-k", name, "-n", "0")
        _run(marked, "-k", name, "-n", "2")
        n0s, n2s, n0cpu, n2cpu, ratios = [], [], [], [], []
        for _ in range(args.rounds):
            n0s.append(_run(marked, "-k", name, "-n", "0"))
            n0cpu.append(LAST_CPU[0])
            n2s.append(_run(marked, "-k", name, "-n", "2"))
            n2cpu.append(LAST_CPU[0])
            ratios.append(n0s[-1] / n2s[-1])
        for n, walls, cpus in (("n0", n0s, n0cpu), ("n2", n2s, n2cpu)):
            results[f"{n}_{name}_s"] = statistics.median(walls)
            results[f"{n}_{name}_p95_s"] = _p(walls, 0.95)
            results[f"{n}_{name}_all_s"] = walls
            results[f"{n}_{name}_cpu_s"] = statistics.median(cpus)
            results[f"{n}_{name}_cpu_all_s"] = cpus
        results[f"n0_over_n2_{name}"] = statistics.median(ratios)
        results[f"n0_over_n2_{name}_min"] = min(ratios)
        results[f"n0_over_n2_{name}_max"] = max(ratios)
        results[f"n2_over_n0_cpu_{name}"] = statistics.median(n2cpu) / statistics.median(n0cpu)


def _print_per_test(results: dict[str, object]) -> None:
    print(f"  unmarked (host pytest)           {results['unmarked_p50_ms']:8.1f} ms")
    for key, label in (
        ("process", "process (cpus=2)"),
        ("vm", "vm (cpus=2)"),
        ("process_cpus1", "process (cpus=1)"),
        ("vm_cpus1", "vm (cpus=1)"),
    ):
        print(
            f"  marked, {label:<22}   {results[f'{key}_p50_ms']:8.1f} ms"
            f"  (p95 {results[f'{key}_p95_ms']:.1f} ms; overhead over unmarked "
            f"{results[f'{key}_overhead_p50_ms']:.1f} ms; 50 tests in "
            f"{results[f'{key}_total_s']:.1f} s)"
        )
    print(f"  fresh host `python -m pytest`    {results['fresh_process_p50_ms']:8.1f} ms")
    print(f"  (first run incl. zygote build: {results['zygote_build_run_s']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
