"""Lifecycle logic against the real agent as a host process (HostProcessBackend),
no VM: pause refuses new work, drain, wait, host timers, named sandboxes,
replace, list/get/remove across two processes. The VM side (the guest's CPU
really stops, a detached sandbox outlives its creator) is in test_lifecycle_vm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    ConfigError,
    Sandbox,
    SandboxConfig,
    SandboxDrainingError,
    SandboxError,
    SandboxExistsError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxPausedError,
    SyncSandbox,
)
from pytest_microsandbox.runtime._state import SandboxStatus, process_alive, process_start
from pytest_microsandbox.runtime.hostproc import HostProcessBackend


def run(body: Callable[[], Awaitable[None]]) -> None:
    anyio.run(body)


async def _create(tmp_path: Path, name: str = "life", **kw: object) -> Sandbox:
    return await Sandbox.create(
        SandboxConfig(name=name, cache_dir=tmp_path, **kw), backend=HostProcessBackend()
    )


def test_a_paused_sandbox_refuses_new_work_until_resumed(tmp_path: Path) -> None:
    async def body() -> None:
        async with await _create(tmp_path) as sb:
            await sb.pause()
            await sb.pause()  # idempotent
            assert sb.status is SandboxStatus.PAUSED
            with pytest.raises(SandboxPausedError, match=r"resume\(\)"):
                await sb.exec("true")
            with pytest.raises(SandboxPausedError):
                await sb.fs().read("/etc/hostname")
            await sb.resume()
            assert sb.status is SandboxStatus.RUNNING
            assert (await sb.exec("echo", ["back"])).stdout == b"back\n"
        assert sb.status is SandboxStatus.STOPPED
        with pytest.raises(SandboxNotRunningError):
            await sb.pause()

    run(body)


def test_drain_lets_running_commands_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    async def body() -> None:
        sb = await _create(tmp_path)
        finished: list[bytes] = []

        async def long_command() -> None:
            finished.append((await sb.shell("sleep 0.6; echo done")).stdout)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_command)
            stream = await sb.exec_stream("sh", ["-c", "sleep 0.4; echo streamed"])
            await anyio.sleep(0.1)
            tg.start_soon(sb.drain)
            await anyio.sleep(0.1)
            assert sb.status is SandboxStatus.DRAINING
            with pytest.raises(SandboxDrainingError, match="draining"):
                await sb.exec("true")
            assert (await stream.wait()).stdout == b"streamed\n"
        assert finished == [b"done\n"]
        assert sb.status is SandboxStatus.STOPPED and sb.stop_reason == "stopped"

    run(body)


def test_drain_stops_at_its_timeout(tmp_path: Path) -> None:
    async def body() -> None:
        sb = await _create(tmp_path)
        async with anyio.create_task_group() as tg:

            async def hang() -> None:
                with pytest.raises(SandboxNotRunningError):
                    await sb.exec("sleep", ["30"])

            tg.start_soon(hang)
            await anyio.sleep(0.2)
            start = time.monotonic()
            await sb.drain(timeout=0.3)
            assert time.monotonic() - start < 10
        assert not sb.running

    run(body)


def test_idle_timeout_stops_an_unused_sandbox_and_activity_defers_it(tmp_path: Path) -> None:
    async def body() -> None:
        sb = await _create(tmp_path, idle_timeout=0.8)
        start = time.monotonic()
        for _ in range(4):  # 1.2 s of activity, never 0.8 s idle
            await sb.exec("true")
            await anyio.sleep(0.3)
        assert sb.running
        assert await sb.wait() is SandboxStatus.STOPPED
        assert sb.stop_reason == "idle_timeout"
        assert time.monotonic() - start >= 0.8 + 1.2 - 0.3

    run(body)


def test_a_running_command_is_activity(tmp_path: Path) -> None:
    async def body() -> None:
        sb = await _create(tmp_path, idle_timeout=0.3)
        assert (await sb.shell("sleep 1; echo still")).stdout == b"still\n"
        await sb.wait()
        assert sb.stop_reason == "idle_timeout"

    run(body)


def test_max_duration_stops_a_busy_sandbox(tmp_path: Path) -> None:
    async def body() -> None:
        sb = await _create(tmp_path, max_duration=0.5)
        start = time.monotonic()
        with pytest.raises(SandboxNotRunningError):
            await sb.exec("sleep", ["30"])
        assert time.monotonic() - start < 10
        assert await sb.wait() is SandboxStatus.STOPPED
        assert sb.stop_reason == "max_duration"

    run(body)


@pytest.mark.parametrize("field", ["max_duration", "idle_timeout"])
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_timer_fields_are_validated(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        SandboxConfig(**{field: value})


def test_wait_returns_when_the_vm_ends_on_its_own(tmp_path: Path) -> None:
    async def body() -> None:
        sb = await Sandbox.create(
            SandboxConfig(name="dies", cache_dir=tmp_path),
            backend=HostProcessBackend(),
            register=True,
        )
        assert sb.pid is not None
        os.kill(sb.pid, signal.SIGKILL)
        assert await sb.wait() is SandboxStatus.CRASHED
        assert sb.stop_reason == "exited"
        assert await Sandbox.list(cache_dir=tmp_path) == []

    run(body)


def test_named_sandboxes_are_unique_until_replaced(tmp_path: Path) -> None:
    async def body() -> None:
        config = SandboxConfig(name="web", cache_dir=tmp_path)
        first = await Sandbox.create(config, backend=HostProcessBackend(), register=True)
        [handle] = await Sandbox.list(cache_dir=tmp_path)
        assert (handle.name, handle.status, handle.pid) == ("web", SandboxStatus.RUNNING, first.pid)
        assert handle.config == config and not handle.detached
        assert await handle.connect() is first
        with pytest.raises(SandboxExistsError, match="replace=True"):
            await Sandbox.create(config, backend=HostProcessBackend(), register=True)
        unnamed = await Sandbox.create(config, backend=HostProcessBackend())  # not registered
        second = await Sandbox.create(config, backend=HostProcessBackend(), replace=True)
        assert not first.running and second.running and unnamed.running
        await second.pause()
        assert (await Sandbox.get("web", cache_dir=tmp_path)).status is SandboxStatus.PAUSED
        await Sandbox.remove("web", cache_dir=tmp_path)
        assert not second.running
        with pytest.raises(SandboxNotFoundError, match=r"Sandbox\.list"):
            await Sandbox.get("web", cache_dir=tmp_path)
        await unnamed.stop()

    run(body)


def test_a_named_sandbox_needs_a_name(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(ConfigError, match="needs a name"):
            await Sandbox.create(
                SandboxConfig(cache_dir=tmp_path), backend=HostProcessBackend(), register=True
            )

    run(body)


_OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox, SandboxError
    from pytest_microsandbox.runtime.hostproc import HostProcessBackend
    sb = SyncSandbox.create(
        SandboxConfig(name="shared", cache_dir=Path(sys.argv[1])),
        backend=HostProcessBackend(), register=True,
    )
    print("up", flush=True)
    sys.stdin.readline()
    try:
        sb.exec("true")
    except SandboxError as exc:
        print(type(exc).__name__, flush=True)
    print(sb.status.value, flush=True)
    sb.stop()
    """
)


def test_list_get_remove_across_two_processes(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdin is not None
        assert owner.stdout.readline().strip() == "up"
        [handle] = SyncSandbox.list(cache_dir=tmp_path)
        assert handle.owner_pid == owner.pid and handle.status is SandboxStatus.RUNNING
        assert SyncSandbox.get("shared", cache_dir=tmp_path).pid == handle.pid

        async def connect() -> None:
            with pytest.raises(SandboxError, match="detached=True"):
                await handle.connect()

        anyio.run(connect)
        assert handle.pid is not None
        vm_start = process_start(handle.pid)
        assert vm_start is not None
        SyncSandbox.remove("shared", cache_dir=tmp_path)
        assert not process_alive(handle.pid, vm_start)  # killed (a zombie until reaped)
        assert SyncSandbox.list(cache_dir=tmp_path) == []
        out, _ = owner.communicate("go\n", timeout=60)
        assert "GuestCrashedError" in out or "SandboxNotRunningError" in out
    finally:
        owner.kill()
        owner.wait()


def test_an_open_terminal_session_is_activity(tmp_path: Path) -> None:
    """A shell waiting for a person is not idle: before, only streamed execs counted."""

    async def body() -> None:
        sb = await _create(tmp_path, idle_timeout=0.3)
        term = await sb.pty("sh", env={"PS1": "$ ", "PATH": "/usr/bin:/bin"})
        await anyio.sleep(1.0)
        assert sb.running
        await term.write(b"exit 0\n")
        assert await term.wait() == 0
        await sb.wait()
        assert sb.stop_reason == "idle_timeout"

    run(body)
