"""PtySession and its blocking twin against the host-process test double (the
real agent as a host process, a real pty on the host): no VM. The same path
through a VM is driven from a terminal in ``tests/cli/test_cli_vm.py``.
"""

from __future__ import annotations

import signal

import anyio
import pytest

from pytest_microsandbox.runtime import Sandbox, SandboxConfig, SyncSandbox
from pytest_microsandbox.runtime.hostproc import HostProcessBackend

ENV = {"PS1": "$ ", "PATH": "/usr/bin:/bin"}


def _until(read, needle: bytes) -> bytes:
    seen = b""
    while needle not in seen:
        chunk = read()
        assert chunk, f"ended before {needle!r}: {seen!r}"
        seen += chunk
    return seen


def test_sync_pty_size_resize_input_and_exit_status():
    backend = HostProcessBackend()
    with (
        SyncSandbox.create(SandboxConfig(name="fake"), backend=backend) as sb,
        sb.pty("sh", rows=12, cols=34, env=ENV) as term,
    ):
        term.write("stty size; echo $TERM\n")
        _until(term.read, b"12 34\r\nxterm-256color")
        term.resize(20, 60)
        term.write(b"stty size\n")
        _until(term.read, b"20 60")
        term.write("exit 4\n")
        assert term.wait() == 4 and term.returncode == 4
        assert term.read() == b""  # after the exit


def test_async_pty_signal_and_kill_on_exit():
    async def main() -> None:
        sb = await Sandbox.create(SandboxConfig(name="fake"), backend=HostProcessBackend())
        try:
            async with await sb.pty("sh", env=ENV) as term:
                await term.signal(signal.SIGKILL)
                with anyio.fail_after(20):
                    assert await term.wait() == -signal.SIGKILL
            # Leaving `async with` while it runs kills it.
            async with await sb.pty("sleep", ["60"], env=ENV) as term:
                pid = term.pid
            with anyio.fail_after(20):
                while (await sb.exec("kill", ["-0", str(pid)])).exit_code == 0:
                    await anyio.sleep(0.1)
            with pytest.raises(ValueError, match="rows and cols"):
                await sb.pty("sh", rows=0)
        finally:
            await sb.stop()

    anyio.run(main)
