"""Accelerator choice: forced, no KVM, probe verdict cached per host boot, one probe
for concurrent first users, lock timeouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import BootError, LockTimeoutError, SandboxError
from pytest_microsandbox.runtime import accel as accel_mod
from pytest_microsandbox.runtime._locks import CACHE_LOCK_TIMEOUT_ENV
from pytest_microsandbox.runtime.accel import choose_accel


def run(choice: str, cache: Path, probe: object) -> accel_mod.AccelDecision:
    return anyio.run(choose_accel, choice, cache, probe)


def test_forced(tmp_path: Path) -> None:
    assert run("tcg", tmp_path, None).accel == "tcg"
    assert run("kvm", tmp_path, None).accel == "kvm"


def test_no_kvm_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: (False, "/dev/kvm does not exist"))
    decision = run("auto", tmp_path, None)
    assert decision.accel == "tcg" and "/dev/kvm does not exist" in decision.reason


def test_probe_result_is_cached_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: (True, "ok"))
    calls = []

    async def failing_probe(timeout: float) -> None:
        calls.append(timeout)
        raise BootError("hung after the real-mode stub")

    first = run("auto", tmp_path, failing_probe)
    assert first.accel == "tcg" and "hung" in first.reason
    second = run("auto", tmp_path, failing_probe)
    assert second.accel == "tcg" and "cached" in second.reason
    assert len(calls) == 1
    monkeypatch.setattr(accel_mod, "host_boot_id", lambda: "another-boot")

    async def good_probe(timeout: float) -> None:
        calls.append(timeout)

    assert run("auto", tmp_path, good_probe).accel == "kvm"
    assert len(calls) == 2


def test_concurrent_first_users_share_one_probe_and_the_loop_keeps_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#19 item 6: the second caller used to block the event loop on the probe's
    file lock, so the first one's probe (which needs the loop) never finished."""
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: (True, "ok"))
    events: list[str] = []
    calls: list[float] = []
    results: dict[str, accel_mod.AccelDecision] = {}

    async def main() -> None:
        probing, release = anyio.Event(), anyio.Event()

        async def probe(timeout: float) -> None:
            calls.append(timeout)
            probing.set()
            await release.wait()  # a boot: needs the loop to run other tasks
            raise BootError("KVM hangs after the real-mode stub")

        async def user(name: str) -> None:
            events.append(f"{name} asks")
            results[name] = await choose_accel("auto", tmp_path, probe)
            events.append(f"{name} done")

        async def ticker() -> None:
            for _ in range(5):
                await anyio.sleep(0.01)
                events.append("tick")
            release.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(user, "first")
                await probing.wait()
                tg.start_soon(user, "second")
                await anyio.sleep(0)
                tg.start_soon(ticker)

    anyio.run(main)
    assert calls == [accel_mod.PROBE_TIMEOUT], "one probe for both callers"
    assert results["first"].accel == results["second"].accel == "tcg"
    assert "hangs" in results["second"].reason
    # The ticks ran while the second caller was waiting for the probe's lock.
    assert events[:2] == ["first asks", "second asks"] and events[2:7] == ["tick"] * 5
    assert sorted(events[7:]) == ["first done", "second done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accel-probe.json"], "no lock file"


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_probe_lock_held_by_another_process_times_out_naming_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Used to raise a raw ``filelock`` Timeout after a fixed 120 s."""
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: (True, "ok"))
    monkeypatch.setenv(CACHE_LOCK_TIMEOUT_ENV, "0.5")
    lock_path = tmp_path / "accel-probe.json.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(lock_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    calls: list[float] = []

    async def probe(timeout: float) -> None:
        calls.append(timeout)

    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(LockTimeoutError) as info:
            run("auto", tmp_path, probe)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    assert isinstance(info.value, SandboxError) and calls == []
    message = str(info.value)
    assert str(lock_path) in message and "KVM probe verdict" in message
    assert f"${CACHE_LOCK_TIMEOUT_ENV}" in message and "0.5 s" in message
    assert info.value.lock_path == str(lock_path)
    # Its holder gone, the next caller probes and leaves no lock file.
    assert run("auto", tmp_path, probe).accel == "kvm" and len(calls) == 1
    assert not lock_path.exists()
