"""Lifecycle benchmark: what naming, pausing and detaching a sandbox cost.

    .venv/bin/python benchmarks/bench_lifecycle.py [--runs 10]

Prints p50/p95 and a ratio against a baseline measured in the same run
(absolute times drift on these noisy machines):

- create + stop of a **registered** sandbox (state-store claim, update,
  release) vs. an unregistered one, on the host-process agent (no VM, so the
  store's share is visible);
- pause + resume (QMP stop/cont) of a clone vs. one exec round trip of ``true``;
- create of a **detached** sandbox (a supervisor process, then its clone) to the
  first command vs. an attached clone to the first command.

Benchmarks report; they never fail on time.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path

import anyio

import pytest_microsandbox  # noqa: F401 - installs the snapshot layer (template clones)
from pytest_microsandbox.runtime import Sandbox, SandboxConfig
from pytest_microsandbox.runtime.hostproc import HostProcessBackend


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def row(name: str, values: list[float]) -> float:
    p50, p95 = pct(values, 0.5) * 1000, pct(values, 0.95) * 1000
    print(f"  {name:52} p50 {p50:9.2f} ms  p95 {p95:9.2f} ms  (n={len(values)})")
    return p50


def ratio(what: str, value: float, baseline: float) -> None:
    print(f"  -> {what}: {value / baseline:.2f}x the baseline")


async def registered(runs: int) -> None:
    print("create + stop, host-process agent (no VM)")
    with tempfile.TemporaryDirectory(prefix="bench-life-") as cache:
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(runs * 2):
            register = i % 2 == 1  # interleaved: both see the same load
            config = SandboxConfig(name=f"bench{i}", cache_dir=Path(cache))
            start = time.monotonic()
            sb = await Sandbox.create(config, backend=HostProcessBackend(), register=register)
            await sb.stop()
            times[register].append(time.monotonic() - start)
        base = row("unregistered (baseline)", times[False])
        ratio("registered", row("registered (state store)", times[True]), base)


async def pause_resume(runs: int) -> None:
    print("pause + resume of a clone")
    async with await Sandbox.create(SandboxConfig(name="bench-pause")) as sb:
        await sb.exec("true")
        execs, pauses = [], []
        for _ in range(runs):
            start = time.monotonic()
            await sb.exec("true")
            execs.append(time.monotonic() - start)
            start = time.monotonic()
            await sb.pause()
            await sb.resume()
            pauses.append(time.monotonic() - start)
        base = row("exec true (baseline)", execs)
        ratio("pause + resume", row("pause + resume", pauses), base)


async def detached(runs: int) -> None:
    print("create to the first command")
    attached, remote = [], []
    for _ in range(runs):
        start = time.monotonic()
        async with await Sandbox.create(SandboxConfig(name="bench-att")) as sb:
            await sb.exec("true")
            attached.append(time.monotonic() - start)
        name = f"bench-det-{secrets.token_hex(3)}"
        start = time.monotonic()
        rsb = await Sandbox.create(SandboxConfig(name=name), detached=True)
        try:
            await rsb.exec("true")
            remote.append(time.monotonic() - start)
        finally:
            await rsb.remove()
    base = row("attached clone (baseline)", attached)
    ratio("detached", row("detached (supervisor + clone)", remote), base)


async def main(runs: int) -> None:
    await registered(runs * 3)
    await pause_resume(runs * 3)
    await detached(max(3, runs // 2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    anyio.run(main, parser.parse_args().runs)
