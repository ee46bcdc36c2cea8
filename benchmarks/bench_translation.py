"""What a restored clone translates under TCG, and what that costs in QEMU CPU.

    .venv/bin/python benchmarks/bench_translation.py [--clones 10] [--execs 20]

A restored QEMU starts with an empty translation cache: every guest code path
it runs (the kernel's after the restore, the agent, ``ld.so``, libc, the
guest's Python) is translated once per clone before it runs at speed, and
QEMU keeps no cache across processes (a ``loadvm`` in the same process
flushes it too). This benchmark counts that work where wall time cannot: the
number of translation blocks (TBs) QEMU's ``info jit`` reports, which the
machine's load does not change, beside the clone's QEMU CPU time
(``/proc/PID/stat``).

For each of ``--clones`` sandboxes created one at a time (each a pooled clone,
whose warm-up ran in the pool: see ``snapshots._engine._warm_up``), spaced so
the pool has refilled: the TBs and QEMU CPU when ``create`` returns, what the
first ``true`` adds, then ``--execs`` more ``true`` on the now-warm clone (the
baseline in the same run: the same commands, translated). Prints p50/p95 of
each and the ratio of a clone's CPU until its first command has run to one
warm exec's. Reads the monitor through a private attribute: a benchmark, not
an API.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import anyio

from pytest_microsandbox.runtime import Sandbox, SandboxConfig

_TB_COUNT = re.compile(r"^TB count\s+(\d+)", re.MULTILINE)
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _tbs(sb: Sandbox) -> int:
    monitor = sb._session.monitor
    if monitor is None:
        raise SystemExit("this sandbox has no QEMU monitor")
    text = await monitor.execute("human-monitor-command", {"command-line": "info jit"})
    match = _TB_COUNT.search(str(text))
    if match is None:
        raise SystemExit(f"no TB count in QEMU's `info jit` (KVM, not TCG?):\n{text}")
    return int(match.group(1))


def _cpu_s(pid: int) -> float:
    """QEMU's user + system CPU, all threads (clock ticks: 10 ms steps)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


async def main(clones: int, execs: int) -> None:
    config = SandboxConfig()
    async with await Sandbox.create(config) as sb:  # the template, and the pool started
        await sb.exec("true")
    rows: dict[str, list[float]] = {
        k: [] for k in ("tb_ready", "tb_first", "tb_warm", "cpu_ready", "cpu_first", "cpu_warm")
    }
    for _ in range(clones):
        await anyio.sleep(2.0)  # the pool refills: measure a clone, not a wait
        async with await Sandbox.create(config) as sb:
            pid = sb.pid
            assert pid is not None
            tb0, cpu0 = await _tbs(sb), _cpu_s(pid)
            await sb.exec("true")
            tb1, cpu1 = await _tbs(sb), _cpu_s(pid)
            for _ in range(execs):
                await sb.exec("true")
            tb2, cpu2 = await _tbs(sb), _cpu_s(pid)
        rows["tb_ready"].append(tb0)
        rows["tb_first"].append(tb1 - tb0)
        rows["tb_warm"].append((tb2 - tb1) / execs)
        rows["cpu_ready"].append(cpu0 * 1000)
        rows["cpu_first"].append((cpu1 - cpu0) * 1000)
        rows["cpu_warm"].append((cpu2 - cpu1) * 1000 / execs)

    def line(label: str, key: str, unit: str) -> None:
        values = rows[key]
        print(
            f"  {label:<44} p50 {statistics.median(values):9.1f} {unit}  "
            f"p95 {_p(values, 0.95):9.1f} {unit}"
        )

    print(f"{clones} clones of the default template, created one at a time (TCG)")
    line("TBs translated when create returns", "tb_ready", "TBs")
    line("TBs the first `true` adds", "tb_first", "TBs")
    line("TBs per warm `true` (baseline)", "tb_warm", "TBs")
    line("QEMU CPU when create returns", "cpu_ready", "ms")
    line("QEMU CPU of the first `true`", "cpu_first", "ms")
    line(f"QEMU CPU per warm `true` ({execs} in a row)", "cpu_warm", "ms")
    ready = statistics.median(rows["cpu_ready"]) + statistics.median(rows["cpu_first"])
    warm = statistics.median(rows["cpu_warm"])
    per_tb = statistics.median(
        c / t for c, t in zip(rows["cpu_ready"], rows["tb_ready"], strict=True)
    )
    print(
        f"  a clone's CPU until its first command has run: {ready / warm:.0f}x one warm exec's; "
        f"~{per_tb * 1000:.1f} us of QEMU CPU per TB until create returned "
        "(start, restore and running included); "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--execs", type=int, default=20)
    args = parser.parse_args()
    start = time.monotonic()
    anyio.run(main, args.clones, args.execs)
    print(f"  ({time.monotonic() - start:.0f} s)")
