"""A detached sandbox driven through its supervisor vs. the same operations on a
local sandbox, in the same run.

    .venv/bin/python benchmarks/bench_remote.py [--n 100] [--mib 16]

- ``exec("true")`` round trip: local, and remote (one control connection per
  call, JSON line each way);
- keystroke -> echo through ``pty("cat")``: local, and relayed (stream session);
- streamed output throughput of ``head -c N /dev/zero`` through
  ``exec_stream``: local, and relayed (the 256 KiB window on the wire).

Prints p50/p95 and the remote/local ratio. Benchmarks report; they never fail
on time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Awaitable, Callable

import anyio

from pytest_microsandbox.runtime import RemoteSandbox, Sandbox, SandboxConfig, Stdout


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def row(name: str, values: list[float]) -> float:
    p50, p95 = pct(values, 0.5) * 1000, pct(values, 0.95) * 1000
    print(f"  {name:44} p50 {p50:9.2f} ms  p95 {p95:9.2f} ms  (n={len(values)})")
    return p50


async def timed(n: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await op()
        out.append(time.perf_counter() - start)
    return out


async def measure(sb: Sandbox | RemoteSandbox, n: int, mib: int) -> dict[str, list[float]]:
    async def keys() -> list[float]:
        out = []
        async with await sb.pty("cat") as term:
            for i in range(n):
                key = b"abcdefghij"[i % 10 : i % 10 + 1]
                start = time.perf_counter()
                await term.write(key)
                seen = b""
                while key not in seen:
                    seen += await term.read()
                out.append(time.perf_counter() - start)
        return out

    async def stream() -> None:
        got = 0
        async with await sb.exec_stream("head", ["-c", str(mib << 20), "/dev/zero"]) as handle:
            async for event in handle:
                if isinstance(event, Stdout):
                    got += len(event.data)
        assert got == mib << 20, got

    return {
        "exec": await timed(n, lambda: sb.exec("true")),
        "key": await keys(),
        "stream": await timed(max(3, n // 20), stream),
    }


async def main(n: int, mib: int) -> None:
    async with await Sandbox.create(SandboxConfig(name="bench-local")) as local:
        here = await measure(local, n, mib)
    remote = await Sandbox.create(SandboxConfig(name=f"bench-remote-{os.getpid()}"), detached=True)
    try:
        there = await measure(remote, n, mib)
    finally:
        await remote.remove()
    print("Detached sandbox through its supervisor vs. local (TCG here; same run)")
    for key, what in (
        ("exec", "exec('true') round trip"),
        ("key", "keystroke -> echo, pty('cat')"),
        ("stream", f"exec_stream of {mib} MiB"),
    ):
        base = row(f"{what}, local (baseline)", here[key])
        rel = row(f"{what}, remote", there[key])
        print(f"  ratio remote/local {rel / base:.2f}x")
    for label, values in (("local", here["stream"]), ("remote", there["stream"])):
        print(f"  stream throughput {label}: {mib / pct(values, 0.5):.0f} MiB/s (p50)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--mib", type=int, default=16)
    args = parser.parse_args()
    anyio.run(main, args.n, args.mib)
