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
    ConfigError,
    ExecError,
    ExecTimeoutError,
    Exited,
    GuestCrashedError,
    OutputLimitError,
    PathNotFoundError,
    Sandbox,
    SandboxConfig,
    SandboxNotRunningError,
    Stderr,
    Stdout,
)
from pytest_microsandbox.runtime.hostproc import HostProcessBackend
from pytest_microsandbox.runtime.sandbox import XFER_THRESHOLD


def run(body, **config: object) -> None:
    async def main() -> None:
        sb = await Sandbox.create(
            SandboxConfig(name="fake", **config), backend=HostProcessBackend()
        )
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


# -- limits (#19): collected output and reads are capped; bad arguments are named --------

MIB = 1 << 20
FLOOD = "head -c 3000000 /dev/zero; head -c 2000000 /dev/zero >&2"


def test_output_cap_comes_from_the_config_and_the_call() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(OutputLimitError) as info:
            await sb.shell(FLOOD)  # max_output_bytes=1 MiB from the config
        assert len(info.value.stdout) + len(info.value.stderr) == MIB
        out = await sb.shell(FLOOD, on_output_limit="truncate")
        assert out.success and out.truncated and out.stdout_truncated
        assert len(out.stdout) + len(out.stderr) == MIB
        whole = await sb.shell(FLOOD, max_output=8 * MIB)  # the call raises the cap
        assert (len(whole.stdout), len(whole.stderr)) == (3_000_000, 2_000_000)
        assert not whole.truncated
        # exec_stream: iteration gets everything, wait() collects under the cap
        handle = await sb.exec_stream("sh", ["-c", FLOOD])
        got = sum([len(e.data) async for e in handle if isinstance(e, (Stdout, Stderr))])
        assert got == 5_000_000
        async with await sb.exec_stream("sh", ["-c", FLOOD]) as handle:
            with pytest.raises(OutputLimitError):
                await handle.wait()

    run(body, max_output_bytes=MIB)


def test_truncate_can_be_the_configured_default() -> None:
    async def body(sb: Sandbox) -> None:
        out = await sb.shell(FLOOD)
        assert out.truncated and len(out.stdout) + len(out.stderr) == MIB
        with pytest.raises(OutputLimitError):
            await sb.shell(FLOOD, on_output_limit="raise")

    run(body, max_output_bytes=MIB, on_output_limit="truncate")


def test_read_cap_comes_from_the_config_and_the_call(tmp_path: Path) -> None:
    async def body(sb: Sandbox) -> None:
        big = tmp_path / "big"
        big.write_bytes(b"y" * (2 * MIB))
        with pytest.raises(OutputLimitError, match="copy_to_host"):
            await sb.fs().read(str(big))
        assert len(await sb.fs().read(str(big), max_size=2 * MIB)) == 2 * MIB
        assert await sb.fs().copy_to_host(str(big), tmp_path / "copy") == 2 * MIB  # no cap

    run(body, max_read_bytes=MIB)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -5.0])
def test_bad_timeouts_and_limits_are_config_errors(timeout: float) -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(ConfigError, match=r"^timeout: "):
            await sb.exec("true", timeout=timeout)
        with pytest.raises(ConfigError, match=r"^timeout: "):
            await sb.exec_stream("true", timeout=timeout)
        with pytest.raises(ConfigError, match=r"^max_output: "):
            await sb.exec("true", max_output=-1)
        with pytest.raises(ConfigError, match=r"^on_output_limit: "):
            await sb.exec("true", on_output_limit="ignore")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"^max_size: "):
            await sb.fs().read("/etc/hostname", max_size=-1)
        with pytest.raises(ConfigError, match=r"^timeout: "):
            await sb.stop(timeout=timeout)
        assert (await sb.exec("true")).success

    run(body)


def test_oversized_argument_is_named() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(ExecError, match=r"argv\[1\] is 300000 bytes"):
            await sb.exec("echo", ["x" * 300_000])
        with pytest.raises(ExecError, match="environment variable HUGE is 300005 bytes"):
            await sb.exec("true", env={"HUGE": "x" * 300_000})

    run(body)
