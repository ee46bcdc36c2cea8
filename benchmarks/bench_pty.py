"""Interactive session benchmark: keystroke to echo through a guest PTY, and
the ``microsandbox shell`` start.

    .venv/bin/python benchmarks/bench_pty.py [--keys 200] [--shells 5]

- keystroke -> echo: one byte written to a ``Sandbox.pty`` running ``cat``
  until the terminal's echo of it is read back (agent relay, line discipline,
  window ACK), vs. the exec round trip of ``true`` on the same sandbox;
- PTY session open -> first prompt vs. ``exec("true")``.

Prints p50/p95 and the ratio against the same-run baseline. Benchmarks report;
they never fail on time.
"""

from __future__ import annotations

import argparse
import time

import anyio

from pytest_microsandbox.runtime import Sandbox, SandboxConfig


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def row(name: str, values: list[float]) -> float:
    p50, p95 = pct(values, 0.5) * 1000, pct(values, 0.95) * 1000
    print(f"  {name:40} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms  (n={len(values)})")
    return p50


async def main(keys: int, shells: int) -> None:
    async with await Sandbox.create(SandboxConfig(name="bench-pty")) as sb:
        exec_rt: list[float] = []
        for _ in range(max(keys // 4, 20)):
            start = time.perf_counter()
            await sb.exec("true")
            exec_rt.append(time.perf_counter() - start)

        echo: list[float] = []
        async with await sb.pty("cat") as term:
            for i in range(keys):
                key = b"abcdefghij"[i % 10 : i % 10 + 1]
                start = time.perf_counter()
                await term.write(key)
                seen = b""
                while key not in seen:
                    seen += await term.read()
                echo.append(time.perf_counter() - start)

        opened: list[float] = []
        for _ in range(shells):
            start = time.perf_counter()
            async with await sb.pty("/bin/sh", env={"PS1": "$ "}) as term:
                seen = b""
                while b"$ " not in seen:
                    seen += await term.read()
                opened.append(time.perf_counter() - start)
                await term.write(b"exit\n")
                await term.wait()

    print("PTY sessions (TCG unless KVM works here; ratios are against this run)")
    base = row("exec('true') round trip (baseline)", exec_rt)
    key = row("keystroke -> echo through the PTY", echo)
    shell = row("pty('/bin/sh') -> first prompt", opened)
    print(f"  ratio keystroke/exec {key / base:.2f}x; shell start/exec {shell / base:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--shells", type=int, default=5)
    args = parser.parse_args()
    anyio.run(main, args.keys, args.shells)
