"""The Sandbox layer against the host-process test double: no VM, milliseconds.

These cover Sandbox logic (error mapping, timeouts, streams, transfers,
lifecycle). What only a real guest can show (isolation, the root image,
crashes) is in test_sandbox_vm.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    BackendUnavailableError,
    CommandNotFoundError,
    ExecTimeoutError,
    Exited,
    GuestCrashedError,
    PathNotFoundError,
    Sandbox,
    SandboxConfig,
    SandboxNotRunningError,
    Stdout,
)
from pytest_microsandbox.runtime.hostproc import HostProcessBackend
from pytest_microsandbox.runtime.sandbox import XFER_THRESHOLD


def run(body) -> None:
    async def main() -> None:
        sb = await Sandbox.create(SandboxConfig(name="fake"), backend=HostProcessBackend())
        try:
            await body(sb)
        finally:
            await sb.stop()
        assert not sb.running

    anyio.run(main)


def test_exec_env_cwd_stdin_and_exit_codes(tmp_path: Path) -> None:
    async def body(sb: Sandbox) -> None:
        out = await sb.shell("echo $X; pwd; cat", env={"X": "1"}, cwd=str(tmp_path), stdin="in")
        assert out.stdout_text == f"1\n{tmp_path}\nin" and out.success
        assert (await sb.shell("exit 4")).exit_code == 4
        with pytest.raises(CommandNotFoundError):
            await sb.exec("definitely-not-a-command")

    run(body)


def test_timeout_raises_with_partial_output() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(ExecTimeoutError) as info:
            await sb.shell("echo partial; sleep 30", timeout=0.5)
        assert info.value.stdout == b"partial\n"

    run(body)


def test_stream_and_signal() -> None:
    async def body(sb: Sandbox) -> None:
        handle = await sb.exec_stream("sh", ["-c", "echo ready; sleep 30"])
        events = []
        async for event in handle:
            events.append(event)
            if isinstance(event, Stdout):
                await handle.signal(signal.SIGKILL)
        assert isinstance(events[-1], Exited) and events[-1].term_signal == signal.SIGKILL

    run(body)


def test_small_and_large_transfers(tmp_path: Path) -> None:
    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        small, large = os.urandom(1000), os.urandom(XFER_THRESHOLD * 3 + 5)
        await fs.write(str(tmp_path / "g/small"), small)
        await fs.write(str(tmp_path / "g/large"), large)  # through the transfer dir
        assert await fs.read(str(tmp_path / "g/large")) == large
        assert (tmp_path / "g/small").read_bytes() == small
        src = tmp_path / "src.bin"
        src.write_bytes(large)
        await fs.copy_from_host(src, str(tmp_path / "copied.bin"))
        assert (tmp_path / "copied.bin").read_bytes() == large
        assert await fs.copy_to_host(str(tmp_path / "g"), tmp_path / "back") == len(small) + len(
            large
        )
        assert (tmp_path / "back/large").read_bytes() == large
        assert not list((sb._vm.spec.run_dir / "xfer").iterdir())  # staging cleaned up
        with pytest.raises(PathNotFoundError):
            await fs.read(str(tmp_path / "missing"))

    run(body)


def test_dead_guest_is_a_crash_and_stop_is_idempotent() -> None:
    async def body(sb: Sandbox) -> None:
        assert sb.pid is not None
        os.kill(sb.pid, signal.SIGKILL)
        with pytest.raises(GuestCrashedError, match="its VM process was killed by SIGKILL"):
            await sb.exec("true")
        await sb.stop()
        await sb.stop()
        with pytest.raises(SandboxNotRunningError):
            await sb.exec("true")

    run(body)


def test_the_test_double_has_no_channel() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(BackendUnavailableError, match="no host-guest channel"):
            await sb.open_channel()

    run(body)
