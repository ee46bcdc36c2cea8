"""Lifecycle against real QEMU VMs (TCG here): pause really stops the guest's
CPUs, drain and the host timers stop clones, a detached sandbox outlives its
creator and is driven, then removed, from other processes (the CLI's ``rm``),
leaving no QEMU, socket or row behind.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    Sandbox,
    SandboxConfig,
    SandboxDrainingError,
    SandboxPausedError,
    SyncSandbox,
)
from pytest_microsandbox.runtime._remote import RemoteSandbox
from pytest_microsandbox.runtime._state import (
    SandboxStatus,
    StateStore,
    process_alive,
    process_start,
)

pytestmark = pytest.mark.vm


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a host process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_over(pid: int, seconds: float) -> float:
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    return _cpu_seconds(pid) - before


def test_pause_stops_the_guest_cpu_and_clock(shared_sandbox: SyncSandbox) -> None:
    sb = shared_sandbox
    assert sb.pid is not None
    spin = sb.shell("sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $!")
    try:
        running = _cpu_over(sb.pid, 2.0)
        uptime_before = sb.metrics().uptime_ms
        sb.pause()
        try:
            assert sb.status is SandboxStatus.PAUSED
            paused = _cpu_over(sb.pid, 2.0)
            with pytest.raises(SandboxPausedError):
                sb.exec("true")
        finally:
            sb.resume()
        uptime_after = sb.metrics().uptime_ms
    finally:
        sb.shell(f"kill {spin.stdout_text.strip()}")
    # A spinning vCPU burns host CPU; a stopped one none (QEMU's idle main loop ~0).
    # Both windows are 2 s; a loaded CI machine gives the spinner far less than a
    # core (0.19 s in 1 s was seen), so the paused figure is judged against it.
    assert running > 0.1, f"the spinning guest used only {running:.2f} s of CPU in 2 s"
    assert paused < 0.1, f"the paused guest used {paused:.2f} s of CPU in 2 s"
    assert paused * 4 < running, (running, paused)
    # The guest clock stood still for the 2 s pause (it ran ~1 s of metrics calls).
    assert uptime_after - uptime_before < 1500, (uptime_before, uptime_after)


def test_drain_and_the_host_timers_stop_clones() -> None:
    async def body() -> None:
        drained = await Sandbox.create(SandboxConfig(name="drained"))
        idle = await Sandbox.create(SandboxConfig(name="idle", idle_timeout=2.0))
        capped = await Sandbox.create(SandboxConfig(name="capped", max_duration=4.0))
        try:
            long = await drained.exec_stream("sh", ["-c", "sleep 1.5; echo finished"])
            async with anyio.create_task_group() as tg:
                tg.start_soon(drained.drain)
                await anyio.sleep(0.2)
                with pytest.raises(SandboxDrainingError):
                    await drained.exec("true")
                assert (await long.wait()).stdout == b"finished\n"
            assert drained.status is SandboxStatus.STOPPED

            started = time.monotonic()
            while time.monotonic() - started < 6.0 and capped.running:
                await capped.exec("true")  # activity does not extend max_duration
                await anyio.sleep(0.5)
            assert await capped.wait() is SandboxStatus.STOPPED
            assert capped.stop_reason == "max_duration"
            assert await idle.wait() is SandboxStatus.STOPPED
            assert idle.stop_reason == "idle_timeout"
            for sb in (drained, idle, capped):
                assert sb.pid is not None and not Path(f"/proc/{sb.pid}/cmdline").exists()
        finally:
            for sb in (drained, idle, capped):
                await sb.kill()

    anyio.run(body)


_CREATOR = textwrap.dedent(
    """
    import sys, anyio
    from pytest_microsandbox.runtime import Sandbox, SandboxConfig

    async def main():
        sb = await Sandbox.create(SandboxConfig(name=sys.argv[1]), detached=True)
        await sb.fs().write("/root/note", b"from the creator")
        print(sb.record.owner_pid, sb.pid, flush=True)

    anyio.run(main)
    """
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_microsandbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_detached_sandbox_outlives_its_creator_and_is_removed_from_elsewhere() -> None:
    name = f"det-{secrets.token_hex(4)}"
    creator = subprocess.run(
        [sys.executable, "-c", _CREATOR, name], capture_output=True, text=True, timeout=600
    )
    assert creator.returncode == 0, creator.stderr
    supervisor, vm = map(int, creator.stdout.split())
    supervisor_start, vm_start = process_start(supervisor), process_start(vm)
    assert supervisor_start is not None and vm_start is not None
    store = StateStore.default()
    try:

        async def drive() -> None:
            handle = await Sandbox.get(name)
            assert handle.detached and handle.owner_pid == supervisor and handle.pid == vm
            remote = await handle.connect()
            assert isinstance(remote, RemoteSandbox)
            assert await remote.fs().read("/root/note") == b"from the creator"
            assert (await remote.shell("hostname")).stdout_text.strip() == name
            await remote.pause()
            assert (await Sandbox.get(name)).status is SandboxStatus.PAUSED
            with pytest.raises(SandboxPausedError):
                await remote.exec("true")
            await remote.resume()
            assert await remote.status() is SandboxStatus.RUNNING

        anyio.run(drive)
        listed = _cli("ls", "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = [r for r in json.loads(listed.stdout) if r["name"] == name]
        assert (row["status"], row["detached"], row["pid"]) == ("running", True, vm)
        table = _cli("ls").stdout.splitlines()
        assert table[0].split()[:2] == ["NAME", "STATUS"]
        assert any(line.split()[:2] == [name, "running"] for line in table[1:])

        removed = _cli("rm", name)
        assert (removed.returncode, removed.stdout.strip()) == (0, name), removed.stderr
        assert not process_alive(vm, vm_start), "QEMU outlived rm"
        assert not process_alive(supervisor, supervisor_start), "the supervisor outlived rm"
        assert store.get(name) is None
        assert not any(path.exists() for path in store.files_of(name))
        again = _cli("rm", name)
        assert again.returncode == 1 and "microsandbox ls" in again.stderr
        assert _cli("rm", "--force", name).returncode == 0
    finally:
        if process_alive(supervisor, supervisor_start):
            os.kill(supervisor, 9)
        if process_alive(vm, vm_start):
            os.kill(vm, 9)


def test_detach_moves_a_running_sandbox_under_a_supervisor() -> None:
    name = f"mv-{secrets.token_hex(4)}"

    async def body() -> None:
        sb = await Sandbox.create(SandboxConfig(name=name), register=True)
        old_vm = sb.pid
        assert old_vm is not None
        await sb.fs().write("/root/state", b"kept")
        sleeper = (await sb.shell("sleep 1000 >/dev/null 2>&1 & echo $!")).stdout_text.strip()
        remote = await sb.detach()
        try:
            assert not sb.running and not Path(f"/proc/{old_vm}/cmdline").exists()
            handle = await Sandbox.get(name)
            assert handle.detached and handle.pid == remote.pid != old_vm
            assert await remote.fs().read("/root/state") == b"kept"
            assert (await remote.exec("kill", ["-0", sleeper])).exit_code == 0
        finally:
            supervisor = remote.record.owner_pid, remote.record.owner_start
            await remote.remove()
        assert not process_alive(*supervisor)
        assert remote.pid is not None and not Path(f"/proc/{remote.pid}/cmdline").exists()
        assert StateStore.default().get(name) is None

    anyio.run(body)


def test_a_killed_supervisor_takes_its_vm_and_leaves_a_stale_row() -> None:
    name = f"kill-{secrets.token_hex(4)}"

    async def body() -> None:
        remote = await Sandbox.create(SandboxConfig(name=name), detached=True)
        supervisor, vm = remote.record.owner_pid, remote.pid
        assert vm is not None
        vm_start = process_start(vm)
        assert vm_start is not None
        os.kill(supervisor, 9)
        deadline = time.monotonic() + 10
        while process_alive(vm, vm_start) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        assert not process_alive(vm, vm_start), "QEMU outlived its supervisor"
        assert name not in [h.name for h in await Sandbox.list()]
        assert not any(path.exists() for path in StateStore.default().files_of(name))

    anyio.run(body)
