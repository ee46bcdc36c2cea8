"""ProcessVMHandle against real child processes (no VM needed)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from pytest_microsandbox.runtime.backend import ProcessVMHandle, VMSpec, describe_exit


class _Handle(ProcessVMHandle):
    """Just the process part: these tests never talk to an agent."""

    async def connect_agent(self, timeout: float) -> anyio.abc.ByteStream:
        raise NotImplementedError


def _spec(tmp_path: Path) -> VMSpec:
    return VMSpec(
        name="proc", kernel=tmp_path / "k", initrd=tmp_path / "i", cmdline="", cpus=1,
        memory_mib=64, accel="tcg", run_dir=tmp_path,
    )  # fmt: skip


def _open_fds() -> set[str]:
    # (fd numbers, not a count: an fd of an earlier test closed in the meantime
    # by a finalizer must not hide one this test leaks)
    return set(os.listdir("/proc/self/fd"))


def test_kill_keeps_the_status_of_a_child_that_died_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio's child watcher reaps in a thread; under load it runs late. Delay it
    # on purpose: a kill() arriving before it must not reap the child itself, or
    # the watcher reports 255 instead of the real status (here: killed by SIGBUS,
    # the sign of a full disk for a QEMU whose RAM is a file).
    real_waitpid = os.waitpid

    def late_waitpid(pid: int, options: int) -> Any:
        if options == 0:
            time.sleep(0.5)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", late_waitpid)

    async def main() -> int | None:
        fds = _open_fds()
        process = await anyio.open_process(["sh", "-c", "kill -BUS $$"])
        listener = await anyio.create_unix_listener(tmp_path / "agent.sock")
        handle = _Handle(_spec(tmp_path), process, listener)
        await anyio.sleep(0.2)  # dead by now, not yet reaped
        await handle.kill()
        assert not _open_fds() - fds  # the pidfd is closed with the rest
        return handle.returncode

    assert anyio.run(main) == -signal.SIGBUS


def test_kill_stops_a_running_child(tmp_path: Path) -> None:
    async def main() -> int | None:
        process = await anyio.open_process(["sleep", "60"])
        listener = await anyio.create_unix_listener(tmp_path / "agent.sock")
        handle = _Handle(_spec(tmp_path), process, listener)
        await handle.kill()
        await handle.kill()  # idempotent
        return handle.returncode

    assert anyio.run(main) == -signal.SIGKILL


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-signal.SIGBUS) == "was killed by SIGBUS"
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(None) == "is still running"
    assert describe_exit(-200) == "was killed by signal 200"
