"""A kept base runner (``bootstrap.py --base`` given go requests with ``keep``,
for ``--sandbox-keep-warm``) in a real VM: each run in a forked child, the next
go request kills that run's processes (a detached one included) and collects
the edited files in a new child, ``end`` leaves the pristine base runner.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.guest.messages import END, PREFIX, READY, Done, Envelope, Go, Report
from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.plugin._zygote import (
    CONTROL_DIR,
    GuestPlan,
    collected,
    guest_env,
    project_image,
    restore_base,
    send_go,
)
from pytest_microsandbox.runtime import Sandbox, SandboxConfig

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

FIRST = """
import os, subprocess, time

def test_leaves_a_process():
    child = subprocess.Popen(["setsid", "sleep", "4321"])
    # Left running only once in a session of its own: until setsid(2), it is in
    # this test's process group, which the runner kills when the test ends.
    deadline = time.monotonic() + 60
    while os.getsid(child.pid) != child.pid and time.monotonic() < deadline:
        time.sleep(0.01)
"""
EDITED = (
    FIRST
    + """
def test_added_by_the_edit():
    pass
"""
)


async def _run(channel: anyio.abc.ByteStream, nodeid: str) -> list[str]:
    """Send one forked request; the outcomes of its reports, until its done line."""
    from pytest_microsandbox.guest.messages import Request

    seq = secrets.token_hex(8)
    await channel.send(Request(nodeid, seq, True, {}).encode())
    outcomes: list[str] = []
    buffer = b""
    with anyio.fail_after(120):
        while True:
            buffer += await channel.receive()
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.startswith(PREFIX.encode()):
                    continue
                envelope = Envelope.decode(line)
                if envelope.seq != seq:
                    continue
                message = envelope.message()
                if isinstance(message, Report):
                    outcomes.append(message.outcome)
                if isinstance(message, Done):
                    return outcomes


async def _alive(sandbox: Sandbox, pattern: str) -> bool:
    out = await sandbox.shell(f"pgrep -f {pattern!r} >/dev/null && echo yes || echo no")
    return out.stdout_text.strip() == "yes"


def test_a_kept_base_runner_serves_one_run_after_another(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    test_file = project / "test_kept.py"
    test_file.write_text(FIRST)
    args = ("-p", "no:cacheprovider", "--rootdir", str(project), "test_kept.py")
    plan = GuestPlan(
        config=SandboxConfig(name="zygote", project_root=project),
        cwd=str(project),
        args=args,
        env=guest_env(os.environ),
        watched=(),
    )
    go = Go(cwd=str(project), args=args, keep=True).encode()

    async def main() -> None:
        image = await project_image(plan)
        assert image is not None
        sandbox = await restore_base(plan, f"msb-keep-{secrets.token_hex(3)}", *image)
        try:
            await send_go(sandbox, go)
            first = await collected(sandbox)
            assert first.items == 1
            channel = await sandbox.open_channel()
            outcomes = await _run(channel, "test_kept.py::test_leaves_a_process")
            assert outcomes == ["passed", "passed", "passed"]
            assert await _alive(sandbox, "[s]leep 4321")

            # The next run: the edit written in, a new go request.
            await sandbox.fs().write(str(test_file), EDITED.encode())
            await sandbox.fs().remove(f"{CONTROL_DIR}/{READY}")
            await send_go(sandbox, go)
            second = await collected(sandbox)
            assert (second.items, second.pid != first.pid) == (2, True)
            assert not await _alive(sandbox, "[s]leep 4321")
            assert not await sandbox.fs().exists(f"/proc/{first.pid}/stat")
            outcomes = await _run(channel, "test_kept.py::test_added_by_the_edit")
            assert outcomes == ["passed", "passed", "passed"]

            # The end of a run: its child goes, the base runner stays.
            await send_go(sandbox, END)
            with anyio.fail_after(60):
                while await sandbox.fs().exists(f"/proc/{second.pid}/stat"):
                    await anyio.sleep(0.1)
            assert await _alive(sandbox, "[b]ootstrap.py --base")
            await channel.aclose()
        finally:
            await sandbox.kill()

    anyio.run(main)
