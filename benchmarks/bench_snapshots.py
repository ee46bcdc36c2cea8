"""Snapshot benchmark: restore to first exec vs cold boot, PSS per idle clone, clones/s,
and back-to-back creates (the ``sandbox`` fixture over a run of fast tests).

Plain script (``python benchmarks/bench_snapshots.py [--clones 30]``); prints a
table. Every number is measured in this run; the ratios use the baselines
measured here.

``--only-b2b [--before REV]`` runs only back-to-back creates, as an A/B of the
code at git revision REV (default ``main``; its ``src`` exported to a temporary
directory and put first on ``PYTHONPATH``) against this checkout, alternating
the two in one run (the order flips every round), three cases each
(``--cases`` picks some), every run in a fresh process:

* warm: ``prefill_pool`` announces the creates, ``--head-start`` seconds pass
  (default 1: a first test, the rest of the collection), then ``--b2b``
  creates -> first exec -> stop;
* cold: the same creates as the first thing a process does (no forecast: the
  pool follows the rate);
* pytest: a generated project of ``--b2b`` fast tests using the ``sandbox``
  fixture, timed per test on the host (between consecutive
  ``pytest_runtest_logfinish``; the first test, which also imports the runtime
  and checks the template, is reported apart).

Each case also prints the host CPU of its processes and their QEMUs per create
(``RUSAGE_CHILDREN``), less sensitive to the machine's other users than latency.
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
from collections.abc import Sequence
from pathlib import Path

import anyio
from _timing import TIMING_PLUGIN

from pytest_microsandbox.runtime import Sandbox, SandboxConfig, provision
from pytest_microsandbox.runtime.boot import prepare_boot, resolve_accel
from pytest_microsandbox.runtime.qemu import QemuBackend
from pytest_microsandbox.snapshots import (
    close_pools,
    ensure_template,
    expect_creates,
    prefill_pool,
)
from pytest_microsandbox.snapshots._engine import _restore_entry, _start_incoming


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def mib_p50_p95(kib: list[int]) -> str:
    return f"p50 {pct(kib, 0.5) / 1024:.1f} MiB, p95 {pct(kib, 0.95) / 1024:.1f} MiB"


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


async def _graceful_stop(sb: Sandbox) -> None:
    """The stop before clones without volumes were killed at once: the guest's power-off."""
    with anyio.move_on_after(10):
        await sb.session.agent.shutdown(timeout=10)
        await sb.session.vm.wait()
    await sb.stop()


def cpu_seconds() -> float:
    """CPU of this process and of its reaped children (every QEMU it killed)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def back_to_back(
    config: SandboxConfig, creates: int, before: bool, cpu: list[float] | None = None
) -> list[float]:
    """``creates`` times in a row: ``Sandbox.create`` -> first exec -> stop, nothing
    in between (what the ``sandbox`` fixture does for a run of fast tests).
    ``before``: the pool follows the rate only (no forecast of the creates to
    come), every create makes its boot plan again, and a used clone is shut
    down gracefully, as before issue #16. ``cpu`` gets the CPU seconds the
    creates cost, the pool's pre-starts and the clones left over included
    (less sensitive to the other users of the machine than the latency).
    Otherwise the run is announced first, as the plugin does from the tests it
    collected (:func:`prefill_pool`: the pool fills during that second instead
    of after a first create).
    """
    expect_creates(0)
    reuse = provision.PLAN_REUSE_S
    provision.PLAN_REUSE_S = 0.0 if before else reuse
    try:
        await close_pools()
        if before:
            sb = await Sandbox.create(config)  # template checked, pool started
            await sb.exec("true")
            await _graceful_stop(sb)
        else:
            await prefill_pool(config, creates)  # what the plugin can do once it collected
        await anyio.sleep(1.0)  # the first test ran (or collection went on): 1 s ahead
        cpu0 = cpu_seconds()
        times = []
        for _ in range(creates):
            t0 = time.monotonic()
            sb = await Sandbox.create(config)
            await sb.exec("true")
            times.append(time.monotonic() - t0)
            await (_graceful_stop(sb) if before else sb.stop())
        await close_pools()
        if cpu is not None:
            cpu.append(cpu_seconds() - cpu0)
        return times
    finally:
        provision.PLAN_REUSE_S = reuse
        expect_creates(0)
        await close_pools()


async def b2b_rows(config: SandboxConfig, creates: int, rounds: int) -> list[tuple[str, str]]:
    """Alternating rounds of the behaviour before issue #16 and now."""
    before: list[float] = []
    now: list[float] = []
    cpu_before: list[float] = []
    cpu_now: list[float] = []
    for _ in range(rounds):
        before += await back_to_back(config, creates, before=True, cpu=cpu_before)
        now += await back_to_back(config, creates, before=False, cpu=cpu_now)
    rows = []
    labels = (
        ("pool following the rate, graceful stop (before)", before),
        ("+ forecast, plan reuse, clones killed at stop", now),
    )
    for label, times in labels:
        rows.append(
            (
                f"back-to-back create->first exec, {label} ({rounds}x{creates})",
                f"p50 {pct(times, 0.5) * 1000:.0f} ms, p95 {pct(times, 0.95) * 1000:.0f} ms",
            )
        )
    per_before = sum(cpu_before) / (rounds * creates)
    per_now = sum(cpu_now) / (rounds * creates)
    rows.append(
        (
            "  CPU per create (host + QEMUs, pre-starts included), before / now",
            f"{per_before * 1000:.0f} / {per_now * 1000:.0f} ms ({per_before / per_now:.2f}x)",
        )
    )
    rows.append(
        (
            "  ratio before / now",
            f"p50 {pct(before, 0.5) / pct(now, 0.5):.1f}x, "
            f"p95 {pct(before, 0.95) / pct(now, 0.95):.1f}x",
        )
    )
    return rows


#: One library case in a fresh process: argv = warm|cold, creates, guest memory
#: (MiB), the warm case's head start (s).
_LIBRARY_CASE = """
import json, sys, time, anyio
import pytest_microsandbox
from pytest_microsandbox.runtime import Sandbox, SandboxConfig
from pytest_microsandbox.snapshots import close_pools, expect_creates, prefill_pool

async def main():
    case, creates, memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = SandboxConfig(name="bench", memory=memory)
    if case == "warm":
        await prefill_pool(config, creates)
        await anyio.sleep(float(sys.argv[4]))
    times = []
    for _ in range(creates):
        t0 = time.monotonic()
        sb = await Sandbox.create(config)
        await sb.exec("true")
        times.append(time.monotonic() - t0)
        await sb.stop()
    expect_creates(0)
    await close_pools()
    print(json.dumps({"src": pytest_microsandbox.__file__, "times": times}))

anyio.run(main)
"""

#: The generated project's tests: each creates a sandbox and runs one command.
_FIXTURE_TESTS = """
import pytest


@pytest.mark.parametrize("i", range({count}))
def test_fast(sandbox, i):
    assert sandbox.exec("true").success
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _export_src(rev: str, into: Path) -> tuple[Path, str]:
    """``src`` of git revision ``rev`` of this repository under ``into``, and the
    revision's short hash.
    """
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", rev],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    tar = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "src"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    archive = into / "src.tar"
    archive.write_bytes(tar)
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
    return into / "src", commit


class _Arm:
    """One side of the A/B: a ``src`` tree put first on ``PYTHONPATH``."""

    def __init__(self, label: str, src: Path) -> None:
        self.label = label
        self.src = src
        self.times: dict[str, list[float]] = {}
        self.first: list[float] = []
        self.cpu: dict[str, list[float]] = {}

    def env(self, extra_path: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (self.src, extra_path) if p is not None)
        return env

    def _record(self, case: str, times: list[float], cpu: float) -> None:
        self.times.setdefault(case, []).extend(times)
        self.cpu.setdefault(case, []).append(cpu)

    def library(self, case: str, creates: int, memory: int, head_start: float) -> None:
        cpu = _children_cpu()
        proc = subprocess.run(
            [sys.executable, "-c", _LIBRARY_CASE, case, str(creates), str(memory), str(head_start)],
            env=self.env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{self.label} {case} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.splitlines()[-1])
        if not out["src"].startswith(str(self.src)):
            raise SystemExit(f"{self.label} imported {out['src']}, not {self.src}")
        self._record(case, out["times"], (_children_cpu() - cpu) / creates)

    def pytest(self, project: Path, creates: int, record: bool = True) -> None:
        # Outside the project: a file changing in it would change the boot
        # plan (the project is part of the guest) and rebuild the template.
        out = project.parent / "times.txt"
        out.unlink(missing_ok=True)
        env = self.env(project)
        env["MSB_BENCH_OUT"] = str(out)
        cpu = _children_cpu()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-p", "no:hypothesispytest", "-p", "msb_bench_timing", "-n", "0"],
            cwd=project, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{self.label} pytest failed:\n{proc.stdout[-3000:]}")
        if record:
            times = [float(x) for x in out.read_text().split()]
            self.first.append(times[0])
            self._record("pytest", times[1:], (_children_cpu() - cpu) / creates)


def _fixture_project(root: Path, creates: int) -> Path:
    project = root / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "msb_bench_timing.py").write_text(TIMING_PLUGIN)
    (project / "test_fast.py").write_text(_FIXTURE_TESTS.format(count=creates))
    return project


def _ms(times: list[float], q: float) -> float:
    return pct(times, q) * 1000


def b2b_ab_rows(
    before_rev: str,
    creates: int,
    rounds: int,
    memory: int,
    head_start: float = 1.0,
    cases: Sequence[str] = ("warm", "cold", "pytest"),
) -> list[tuple[str, str]]:
    """Back-to-back creates, the code at ``before_rev`` against this checkout
    (see the module docstring), ``rounds`` alternating rounds of ``cases``.
    """
    with tempfile.TemporaryDirectory(prefix="msb-bench-b2b-") as tmp:
        root = Path(tmp)
        before_src, commit = _export_src(before_rev, root)
        if commit.startswith(before_rev):
            before_rev = commit
        arms = [
            _Arm(
                f"before ({before_rev}{'' if commit == before_rev else ' ' + commit})", before_src
            ),
            _Arm("now (this checkout)", Path(__file__).resolve().parents[1] / "src"),
        ]
        project = _fixture_project(root, creates)
        for arm in arms:  # templates built, modules compiled, page cache warm
            arm.pytest(project, creates, record=False)
        for r in range(rounds):
            for case in cases:
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    if case == "pytest":
                        arm.pytest(project, creates)
                    else:
                        arm.library(case, creates, memory, head_start)
    rows: list[tuple[str, str]] = []
    what = {
        "warm": f"warm (prefill_pool, {head_start:g} s head start)",
        "cold": "cold (the first creates of a process)",
        "pytest": f"through pytest (`sandbox` fixture, tests 2-{creates} of each run)",
    }
    before, now = arms
    for case, label in what.items():
        if case not in cases:
            continue
        rows.append((f"{label}, {rounds}x{creates}", ""))
        for arm in arms:
            t = arm.times[case]
            cpu = statistics.median(arm.cpu[case]) * 1000
            rows.append(
                (
                    f"  {arm.label}",
                    f"p50 {_ms(t, 0.5):.0f} ms, p95 {_ms(t, 0.95):.0f} ms, max "
                    f"{max(t) * 1000:.0f} ms; CPU/create {cpu:.0f} ms",
                )
            )
        b, n = before.times[case], now.times[case]
        rows.append(
            (
                "  ratio before / now",
                f"p50 {pct(b, 0.5) / pct(n, 0.5):.2f}x, p95 {pct(b, 0.95) / pct(n, 0.95):.2f}x",
            )
        )
    if "pytest" not in cases:
        return rows
    rows.append(
        (
            "first test of a pytest run (runtime import, template check), before / now",
            f"p50 {statistics.median(before.first) * 1000:.0f} / "
            f"{statistics.median(now.first) * 1000:.0f} ms",
        )
    )
    return rows


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


async def main(args: argparse.Namespace) -> None:
    config = SandboxConfig(name="bench", memory=args.memory)
    if args.only_b2b:
        load0 = os.getloadavg()
        rows = await anyio.to_thread.run_sync(
            b2b_ab_rows,
            args.before,
            args.b2b,
            args.b2b_rounds,
            args.memory,
            args.head_start,
            args.cases.split(","),
        )
        load1 = os.getloadavg()
        print_rows(
            f"bench_snapshots back-to-back A/B (load average {load0[0]:.1f} at the start, "
            f"{load1[0]:.1f} at the end, {load1[1]:.1f} over its last 5 min)",
            rows,
        )
        return
    backend = QemuBackend()
    accel = await resolve_accel(config, backend)
    plan = await anyio.to_thread.run_sync(prepare_boot, config, accel.accel)
    t = time.monotonic()
    entry = await ensure_template(config, backend, plan)
    build_s = time.monotonic() - t
    rows: list[tuple[str, str]] = [("template ready (build or check)", f"{build_s * 1000:.0f} ms")]

    async def restore_first_exec(pooled: bool) -> float:
        t0 = time.monotonic()
        sb = await _restore_entry(entry, config, backend, plan, None, pooled=pooled)
        await sb.exec("true")
        dt = time.monotonic() - t0
        await sb.kill()
        return dt

    try:
        for pooled in (False, True):
            await restore_first_exec(pooled)  # warm the pool / page cache
            times = []
            for _ in range(args.clones):
                times.append(await restore_first_exec(pooled))
                await anyio.sleep(0.05)  # let the pool refill, as between tests
            label = "pre-started pool" if pooled else "no pool (QEMU start included)"
            rows.append(
                (
                    f"restore->first exec, {label} (n={len(times)})",
                    f"p50 {pct(times, 0.5) * 1000:.0f} ms, p95 {pct(times, 0.95) * 1000:.0f} ms",
                )
            )
            if pooled:
                restore_p50 = pct(times, 0.5)

        cold = []
        for _ in range(args.cold):
            t0 = time.monotonic()
            async with await Sandbox.create(config, cold_boot=True) as sb:
                await sb.exec("true")
                cold.append(time.monotonic() - t0)
        cold_p50 = statistics.median(cold)
        rows.append(
            (
                f"cold boot->first exec (n={len(cold)})",
                f"p50 {cold_p50 * 1000:.0f} ms, p95 {pct(cold, 0.95) * 1000:.0f} ms",
            )
        )
        rows.append(("ratio cold/restore (p50)", f"{cold_p50 / restore_p50:.1f}x"))

        idle = [
            await _restore_entry(entry, config, backend, plan, None, pooled=False)
            for _ in range(args.idle)
        ]
        for sb in idle:
            await sb.exec("true")
        await anyio.sleep(2.0)
        pss = [pss_kib(sb.pid) for sb in idle if sb.pid is not None]
        for sb in reversed(idle):  # sandboxes of one task unwind in LIFO order
            await sb.kill()
        rows.append((f"host PSS per idle clone (n={len(pss)})", mib_p50_p95(pss)))
        # The floor under that figure: the same QEMUs before any guest code runs
        # (started in -incoming defer, as the pool keeps them; nothing restored).
        waiting = [
            await _start_incoming(entry, backend, config.name, config.boot_timeout, None)
            for _ in range(args.idle)
        ]
        await anyio.sleep(2.0)
        floor = [pss_kib(inc.vm.pid) for inc in waiting if inc.vm.pid is not None]
        for inc in reversed(waiting):
            await inc.discard()
        rows.append(
            (
                f"  of which QEMU before restore (n={len(floor)})",
                mib_p50_p95(floor),
            )
        )

        done = 0
        stop_at = time.monotonic() + args.seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                sb = await _restore_entry(entry, config, backend, plan, None, pooled=True)
                await sb.exec("true")
                await sb.kill()
                done += 1

        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(args.workers):
                tg.start_soon(worker)
        rate = done / (time.monotonic() - t0)
        what = f"restore+exec+kill, {args.workers} workers, {os.cpu_count()} cores"
        rows.append((f"sustained clones/s ({what})", f"{rate:.1f}/s"))
    finally:
        await close_pools()
    rows += await b2b_rows(config, args.b2b, args.b2b_rounds)

    print_rows(f"bench_snapshots (accel {accel.accel}, memory {args.memory} MiB)", rows)
    print(
        "  targets (TCG): restore p50 <= 100 ms, >= 20x cold, <= 30 MiB PSS/clone, >= 10 clones/s;"
        " back-to-back p50 <= 50 ms, p95 <= 100 ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clones", type=int, default=30)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--idle", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--b2b", type=int, default=20, help="back-to-back creates per round")
    parser.add_argument("--b2b-rounds", type=int, default=2)
    parser.add_argument(
        "--only-b2b", action="store_true", help="only back-to-back creates, A/B against --before"
    )
    parser.add_argument("--before", default="main", help="git revision of the --only-b2b baseline")
    parser.add_argument(
        "--head-start", type=float, default=1.0, help="seconds between prefill and creates (warm)"
    )
    parser.add_argument("--cases", default="warm,cold,pytest", help="--only-b2b cases to run")
    anyio.run(main, parser.parse_args())
