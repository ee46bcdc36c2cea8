"""Concurrent first use on a fresh cache (#19 item 6): one KVM probe, one template, all boot.

Each case runs in its own processes on a fresh cache directory (``accel="auto"``,
so the probe really runs: where KVM does not boot guests it fails over to TCG).
Only the kernel is shared, through a symlink to the provisioned one (a
download); the agent, the initramfs, the root image (a tiny directory), the
probe verdict and the template are all built from scratch. The processes count
the probes and template builds they run by wrapping the functions that do them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_microsandbox.runtime.kernel import find_kernel
from pytest_microsandbox.runtime.paths import CACHE_DIR_ENV

pytestmark = pytest.mark.vm

_FIRST_USE = """
import os, sys
from pathlib import Path
import anyio
from pytest_microsandbox.runtime import Sandbox, SandboxConfig, boot
from pytest_microsandbox.snapshots import _engine

cache, root, log, tasks = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

def note(what):
    with open(log, "a") as f:  # O_APPEND: one short line is one atomic write
        f.write(f"{what} {os.getpid()}\\n")

real_probe, real_build = boot._probe_kvm, _engine._build_template

async def counted_probe(*args, **kwargs):
    note("probe")
    return await real_probe(*args, **kwargs)

async def counted_build(*args, **kwargs):
    note("template")
    return await real_build(*args, **kwargs)

boot._probe_kvm, _engine._build_template = counted_probe, counted_build
config = SandboxConfig(name="first-use", image=root, memory=256, accel="auto", cache_dir=cache)

async def one():
    async with await Sandbox.create(config) as sb:
        assert await sb.fs().read_text("/hello.txt") == "fresh"
    note("ok")

async def main():
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(one)

anyio.run(main)
"""


@pytest.mark.parametrize(
    ("processes", "tasks"), [(1, 3), (2, 2)], ids=["1-process-3-tasks", "2-processes-2-tasks"]
)
def test_concurrent_first_use_runs_one_probe_and_one_template_build(
    tmp_path: Path, processes: int, tasks: int
) -> None:
    cache, root, log = tmp_path / "cache", tmp_path / "root", tmp_path / "log"
    cache.mkdir()
    (cache / "kernel").symlink_to(find_kernel().root)
    root.mkdir()
    (root / "hello.txt").write_text("fresh")
    # The cache in the environment too: the old code probed into $MICROSANDBOX_CACHE_DIR.
    env = {**os.environ, CACHE_DIR_ENV: str(cache), "MICROSANDBOX_POOL_SIZE": "0"}
    env.pop("MICROSANDBOX_ACCEL", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, str(cache), str(root), str(log), str(tasks)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    errors = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=400)  # a hang guard, not a threshold
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0:
            errors.append(stderr[-3000:])
    assert not errors, "\n".join(errors)
    lines = [line.split()[0] for line in log.read_text().splitlines()]
    assert lines.count("ok") == processes * tasks
    assert lines.count("probe") == 1, lines
    assert lines.count("template") == 1, lines
    templates = cache / "snapshots" / "templates"
    assert len([p for p in templates.iterdir() if p.is_dir()]) == 1
    assert (cache / "accel-probe.json").is_file()
    assert not (cache / "accel-probe.json.lock").exists()
