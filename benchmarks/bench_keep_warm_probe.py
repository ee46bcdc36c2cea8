"""Keep-warm probe (issue #16): what a VM kept alive between runs would save on
an edit, against today's fresh clone, measured in the same run.

Today each run after an edit restores the base zygote (Python and pytest
started, no project), copies the project in and has the guest's pytest collect:
in a fresh clone, whose QEMU translation cache is empty, so every code path of
the interpreter, pytest and the guest kernel is translated again. The probe
measures, per round:

* ``fresh``: restore the base zygote and copy the project in, the go request to
  the runner's collection done, then one test over the channel;
* ``warm``: in the first fresh round's VM, kept alive: the runner killed and a
  pristine ``--base`` runner started again (not timed: a kept VM would fork it
  from a process that never collected), the edited test file written in, then
  the same go -> collected and test, in that QEMU with its translations.

    .venv/bin/python benchmarks/bench_keep_warm_probe.py [--rounds 3]

It runs pytest on a temporary project with this file as a plugin
(``-p bench_keep_warm_probe``), which does the above in ``pytest_runtestloop``
through the plugin's own pieces, then prints p50/p95 per step and the ratio
fresh/warm. No wall-clock assertion: figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

TEST = """
import pytest

@pytest.mark.sandbox
def test_edit():
    assert {n} == {n}
"""
_ROUNDS_ENV = "MSB_KEEP_WARM_PROBE_ROUNDS"
_OUT_ENV = "MSB_KEEP_WARM_PROBE_OUT"
_KILL_RUNNER = "pkill -9 -f '[b]ootstrap.py'; rm -rf /run/msb-zygote"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _wait_base_ready(sandbox: Any) -> None:
    import anyio

    from pytest_microsandbox.guest.messages import BASE_READY
    from pytest_microsandbox.plugin._zygote import CONTROL_DIR
    from pytest_microsandbox.runtime import PathNotFoundError

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            await sandbox.fs().read_text(f"{CONTROL_DIR}/{BASE_READY}")
            return
        except PathNotFoundError:
            await anyio.sleep(0.02)
    raise RuntimeError("the second base runner did not start")


async def _probe(runner: Any, plan: Any, nodeid: str, test: Path, rounds: int) -> dict[str, Any]:
    from pytest_microsandbox.guest.messages import Go
    from pytest_microsandbox.plugin import _zygote as z

    times: dict[str, list[float]] = {
        k: []
        for k in (
            "fresh restore+copy",
            "fresh collect",
            "fresh test",
            "warm copy",
            "warm collect",
            "warm test",
        )
    }
    outcomes: list[bool] = []
    project = await z.project_image(plan)
    assert project is not None, "the project is too large to copy in"
    go = Go(cwd=plan.cwd, args=plan.args).encode()
    edit = 1000
    for r in range(rounds):
        t0 = time.monotonic()
        sandbox = await z.restore_base(plan, f"msb-probe-f{r}", *project)
        try:
            t1 = time.monotonic()
            await z.send_go(sandbox, go)
            await z.collected(sandbox)
            t2 = time.monotonic()
            channel = await sandbox.open_channel()
            out = await runner.exchange(sandbox, channel, nodeid, True, 120.0)
            t3 = time.monotonic()
            outcomes.append(out.error is None and out.violation is None)
            times["fresh restore+copy"].append(t1 - t0)
            times["fresh collect"].append(t2 - t1)
            times["fresh test"].append(t3 - t2)
            if r:
                await channel.aclose()
                continue
            for _ in range(rounds):  # the first fresh VM, kept warm
                await sandbox.shell(_KILL_RUNNER)
                await sandbox.shell(plan.base_command(), env=plan.env)
                await _wait_base_ready(sandbox)
                edit += 1
                test.write_text(TEST.format(n=edit))
                t3 = time.monotonic()
                await sandbox.fs().write(str(test), test.read_bytes())
                t4 = time.monotonic()
                await z.send_go(sandbox, go)
                await z.collected(sandbox)
                t5 = time.monotonic()
                out = await runner.exchange(sandbox, channel, nodeid, True, 120.0)
                t6 = time.monotonic()
                outcomes.append(out.error is None and out.violation is None)
                times["warm copy"].append(t4 - t3)
                times["warm collect"].append(t5 - t4)
                times["warm test"].append(t6 - t5)
            await channel.aclose()
        finally:
            await sandbox.kill()
    return {"times": times, "ok": outcomes}


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool:
    """Measure instead of running the tests (this file is loaded as a plugin)."""
    import dataclasses

    from pytest_microsandbox.plugin._hooks import SPEC_KEY, get_plugin
    from pytest_microsandbox.runtime import _portal

    item = session.items[0]
    runner = get_plugin(session.config).runner()
    runner.set_files([str(item.path)])
    plan = runner.plan_for(item.stash[SPEC_KEY])
    args = list(plan.args)
    at = args.index("bench_keep_warm_probe")
    del args[at - 1 : at + 1]  # the guest has no such plugin
    plan = dataclasses.replace(plan, args=tuple(args))
    rounds = int(os.environ[_ROUNDS_ENV])
    result = _portal.call(_probe, runner, plan, item.nodeid, Path(item.path), rounds)
    Path(os.environ[_OUT_ENV]).write_text(json.dumps(result))
    return True


def main(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    base += ["-p", "no:hypothesispytest", "--sandbox-require"]
    with tempfile.TemporaryDirectory(prefix="msb-bench-warm-") as tmp:
        root = Path(tmp) / "edited"
        root.mkdir()
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "test_edit.py").write_text(TEST.format(n=0))
        out = Path(tmp) / "out.json"
        subprocess.run(base, cwd=root, env=env, check=True, capture_output=True)  # builds
        probe_env = {**env, _ROUNDS_ENV: str(args.rounds), _OUT_ENV: str(out)}
        started = time.monotonic()
        proc = subprocess.run(
            [*base, "-p", "bench_keep_warm_probe"], cwd=root, env=probe_env, capture_output=True
        )
        if proc.returncode not in (0, 5) or not out.exists():
            raise SystemExit(f"probe failed ({proc.returncode}):\n{proc.stdout!r}\n{proc.stderr!r}")
        result = json.loads(out.read_text())
    times: dict[str, list[float]] = result["times"]
    print(f"\nbench_keep_warm_probe: {args.rounds} fresh clones, {args.rounds} warm reuses, "
          f"{time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for step, values in times.items():
        print(f"  {step:<20} p50 {pct(values, 0.5):6.3f} s   p95 {pct(values, 0.95):6.3f} s")
    for what in ("collect", "test"):
        fresh, warm = times[f"fresh {what}"], times[f"warm {what}"]
        ratio = statistics.median(fresh) / statistics.median(warm)
        print(f"  {what:<20} fresh / warm (p50) {ratio:.2f}x")
    fresh_total = sum(pct(times[f"fresh {s}"], 0.5) for s in ("restore+copy", "collect", "test"))
    warm_total = sum(pct(times[f"warm {s}"], 0.5) for s in ("copy", "collect", "test"))
    print(f"  guest side of an edit, p50 sums: fresh {fresh_total:.2f} s, warm {warm_total:.2f} s")
    print(f"  every test passed: {all(result['ok'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args())
