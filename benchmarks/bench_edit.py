"""Edit-to-result benchmark: wall time of ``pytest`` on one marked test right after
its test file was edited (so the project's zygote is missing), against plain
host ``pytest`` of the same test in the same run.

Plain script (``python benchmarks/bench_edit.py [--rounds 5] [--all] [--boot]
[--before REV]``); prints
p50/p95 per way and each way's ratio to plain host pytest (p50). The ways are
measured in the same run, alternating, on one temporary project outside this
repository (so the benchmark never changes the project it measures); the test
runs under the default isolation (``process`` under TCG):

* ``live`` (the default): the base zygote (Python started, pytest warmed up, no
  project) is restored and the project copied in while pytest starts (the
  project's last run left the hint: ``plugin/_hint.py``), then collected, and
  that VM serves the test: no snapshot of the project;
* ``snapshot first`` (``$MICROSANDBOX_LIVE_ZYGOTE=0``, the design before): the
  same VM is snapshotted as the project's zygote, stopped, and a clone of the
  zygote restored to serve the test;
* ``boot with project`` (``--boot``; ``$MICROSANDBOX_PROJECT_COPY_MAX_MB=0``): the
  project is a layer of the VM, so an edit means a new template (cold boot) and
  a Python start in the guest;
* ``keep warm`` (``--sandbox-keep-warm=600``, opt-in): the VM of the last run
  of this way, kept by its supervisor, claimed, the changed file copied in, a
  fresh pytest forked in the guest from the pristine base runner, in a QEMU whose
  translation cache is warm; removed at the end of the benchmark;
* ``plain host pytest``: ``pytest -p no:microsandbox``, the baseline;
* with ``--before REV``, ``live`` with the code of git revision ``REV`` of this
  repository (its ``src`` first on ``PYTHONPATH``, as ``bench_snapshots.py
  --before`` does): an A/B of a change in the same run;
* with ``--all``, right after the ``live`` run, the same project run twice more
  without an edit: served live too (no snapshot is built for process
  isolation; the first rerun used to build one).

Each run is ``pytest -q`` in the project, as a user types it (``--no-cacheprovider``
and ``--no-hypothesis`` add ``-p no:...``: a run that leaves a plugin out starts
its guest pytest from a plugin manager made after the restore, not the one its
base made). The ratio printed beside each way is its p50 over plain host
pytest's p50, both from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from pytest_microsandbox.plugin._warm import warm_sandbox_name
from pytest_microsandbox.plugin._zygote import COPY_MAX_ENV, LIVE_ENV
from pytest_microsandbox.runtime import Sandbox, SandboxNotFoundError

TEST = """
import pytest

@pytest.mark.sandbox
def test_edit():
    assert {n} == {n}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


#: ``--no-hypothesis``: every run without hypothesis's pytest plugin (our test
#: extras install it; it imports all of hypothesis in each run's terminal summary).
PLUGINS: list[str] = []


def run(root: Path, edit: int | None, env: dict[str, str], *extra: str) -> float:
    if edit is not None:
        (root / "test_edit.py").write_text(TEST.format(n=edit))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *PLUGINS, *extra],
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
    # Users' shells rarely set it; with it every run parses every module again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sandboxed = ("--sandbox-require",)
    host = ("-p", "no:microsandbox", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    ways: dict[str, tuple[dict[str, str], tuple[str, ...], bool]] = {
        "live (default)": (env, sandboxed, True),
        "snapshot first (before)": ({**env, LIVE_ENV: "0"}, sandboxed, True),
        "keep warm (opt-in)": (env, (*sandboxed, "--sandbox-keep-warm=600"), True),
    }
    if args.boot:
        ways["boot with project"] = ({**env, COPY_MAX_ENV: "0"}, sandboxed, True)
    ways_order = list(ways)
    if args.all:
        # Right after "live (default)": the same files, two more runs.
        at = ways_order.index("live (default)") + 1
        ways_order[at:at] = ["rerun 1 (no edit)", "rerun 2 (no edit)"]
        ways["rerun 1 (no edit)"] = (env, sandboxed, False)
        ways["rerun 2 (no edit)"] = (env, sandboxed, False)
    ways["plain host pytest"] = (env, host, True)
    ways_order.append("plain host pytest")
    edit = 0
    with tempfile.TemporaryDirectory(prefix="msb-bench-edit-") as tmp:
        if args.before:
            from bench_snapshots import _export_src

            src, commit = _export_src(args.before, Path(tmp))
            before = f"live, before ({commit})"
            ways[before] = ({**env, "PYTHONPATH": str(src)}, sandboxed, True)
            ways_order.insert(ways_order.index("live (default)") + 1, before)
        times: dict[str, list[float]] = {way: [] for way in ways_order}
        root = Path(tmp) / "edited"
        # The older code in a project of its own: its base zygote differs, and
        # a project's hint names the base its last run restored.
        roots = {way: Path(tmp) / "edited-before" if "before (" in way else root for way in ways}
        for path in set(roots.values()):
            path.mkdir()
            (path / "pytest.ini").write_text("[pytest]\n")
        for way, (way_env, extra, _) in ways.items():  # base zygote, templates, images: once
            edit += 1
            run(roots[way], edit, way_env, *extra)
        try:
            for _ in range(args.rounds):
                for way in ways_order:
                    way_env, extra, edited = ways[way]
                    edit += 1
                    elapsed = run(roots[way], edit if edited else None, way_env, *extra)
                    times[way].append(elapsed)
        finally:
            anyio.run(_remove, warm_sandbox_name(root, 0))
    host_p50 = pct(times["plain host pytest"], 0.5)
    print(
        f"\nbench_edit: one marked test after an edit, wall time of pytest ({args.rounds} rounds)"
    )
    for way, values in times.items():
        p50, p95 = pct(values, 0.5), pct(values, 0.95)
        print(f"  {way:<28} p50 {p50:6.2f} s   p95 {p95:6.2f} s   {p50 / host_p50:5.1f}x host")
    live, before = pct(times["live (default)"], 0.5), pct(times["snapshot first (before)"], 0.5)
    print(f"  {'snapshot first / live (p50)':<28} {before / live:.2f}x")
    warm = pct(times["keep warm (opt-in)"], 0.5)
    print(f"  {'live / keep warm (p50)':<28} {live / warm:.2f}x")
    for way in times:
        if way.startswith("live, before"):
            print(f"  {'before / live (p50)':<28} {pct(times[way], 0.5) / live:.2f}x")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f}")


async def _remove(name: str) -> None:
    with contextlib.suppress(SandboxNotFoundError):
        await Sandbox.remove(name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--all", action="store_true", help="also two reruns without an edit")
    parser.add_argument("--boot", action="store_true", help="also the project booted as a layer")
    parser.add_argument("--before", metavar="REV", help="also live with the code of git REV")
    parser.add_argument(
        "--no-cacheprovider",
        action="store_true",
        help="every run with -p no:cacheprovider (a plugin left out: the guest's "
        "pytest cannot start from the plugin manager its base made)",
    )
    parser.add_argument(
        "--no-hypothesis", action="store_true", help="every run with -p no:hypothesispytest"
    )
    parsed = parser.parse_args()
    if parsed.no_hypothesis:
        PLUGINS += ["-p", "no:hypothesispytest"]
    if parsed.no_cacheprovider:
        PLUGINS += ["-p", "no:cacheprovider"]
    main(parsed)
