"""Templates, clones and forks against real QEMU (TCG here).

Every test runs its own event loop (anyio.run) and closes that loop's pool of
pre-started QEMUs before returning, so nothing outlives a test.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import Sandbox, SandboxConfig, SnapshotError
from pytest_microsandbox.runtime.boot import prepare_boot, resolve_accel
from pytest_microsandbox.runtime.qemu import QemuBackend
from pytest_microsandbox.snapshots import _store, close_pools, ensure_template
from pytest_microsandbox.snapshots._engine import snapshot_sandbox

pytestmark = pytest.mark.vm

CONFIG = SandboxConfig(name="snaptest", memory=512)


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await body()
        finally:
            await close_pools()

    anyio.run(main)


def _my_qemus() -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].split(")", 1)[0]
        except (OSError, IndexError):
            continue
        if comm.startswith("qemu-system") and int(fields[1]) == os.getpid():
            out.append(int(stat.parent.name))
    return out


def test_clones_are_independent() -> None:
    async def body() -> None:
        async with (
            await Sandbox.create(CONFIG, name="clone-a") as a,
            await Sandbox.create(CONFIG, name="clone-b") as b,
        ):
            await a.fs().write("/root/only-in-a", "a")
            assert await a.fs().exists("/root/only-in-a")
            assert not await b.fs().exists("/root/only-in-a")
            for sb, name in ((a, "clone-a"), (b, "clone-b")):
                assert (await sb.exec("hostname")).stdout_text.strip() == name
                guest = float((await sb.shell("date +%s.%N")).stdout_text)
                assert abs(guest - time.time()) < 1.0
                assert sb.session.origin is not None and sb.session.origin.meta.kind == "template"
                # No post-load self-announce rounds (guest work nobody needs).
                assert sb.session.monitor is not None
                params = await sb.session.monitor.execute("query-migrate-parameters")
                assert params["announce-rounds"] == 0

    run(body)


def test_clone_qemu_carries_no_9p_device_nor_small_huge_page() -> None:
    """Per-clone host memory (#3): a sandbox without volumes gets no 9p device
    (QEMU gives each a 1 MiB table; transfers use a disk), and QEMU runs under
    the launcher's filter, so its 2 MiB ACPI block is not backed by a huge page.
    """

    async def body() -> None:
        async with await Sandbox.create(CONFIG, name="lean") as sb:
            assert sb.pid is not None and sb.session.origin is not None
            assert sb.session.origin.meta.volume_slots == 0
            argv = Path(f"/proc/{sb.pid}/cmdline").read_text().split("\0")
            assert [a for a in argv if a.startswith("virtio-9p-device")] == []
            status = Path(f"/proc/{sb.pid}/status").read_text()
            assert "Seccomp:\t2" in status
            huge_outside_code = 0
            perms = ""
            for line in Path(f"/proc/{sb.pid}/smaps").read_text().splitlines():
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:
                    perms = fields[1]
                elif fields[0] == "AnonHugePages:" and "x" not in perms:
                    huge_outside_code += int(fields[1])
            assert huge_outside_code == 0

    run(body)


def test_clones_urandom_differs() -> None:
    # CONFIGURE credits the host's seed and forces a CRNG reseed (RNDRESEEDCRNG).
    async def body() -> None:
        async with (
            await Sandbox.create(CONFIG, name="rng-a") as a,
            await Sandbox.create(CONFIG, name="rng-b") as b,
        ):
            ra = (await a.shell("head -c 32 /dev/urandom | od -An -tx1")).stdout_text
            rb = (await b.shell("head -c 32 /dev/urandom | od -An -tx1")).stdout_text
            assert ra and ra != rb

    run(body)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stopping_a_clone_leaves_qemu_qmp_silent(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    # Everything qemu.qmp says, DEBUG included (the plugin raises its level to ERROR).
    caplog.set_level(logging.DEBUG, logger="qemu.qmp")

    async def body() -> None:
        sb = await Sandbox.create(CONFIG, name=f"quiet-{how}")
        try:
            assert sb.session.monitor is not None
            assert (await sb.exec("true")).success
        finally:
            await (sb.stop() if how == "stop" else sb.kill())
        await anyio.sleep(0.1)  # time for qemu.qmp's reader tasks to notice an EOF

    run(body)
    records = [r for r in caplog.records if r.name.startswith("qemu.qmp")]
    assert records, "caplog should see qemu.qmp's debug records"
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    # The monitor was disconnected before QEMU went away: no EOF for it to report.
    assert [r.getMessage() for r in records if "end-of-file" in r.getMessage()] == []


def test_cold_boot_flag_skips_templates() -> None:
    async def body() -> None:
        async with await Sandbox.create(CONFIG, name="cold", cold_boot=True) as sb:
            assert sb.session.monitor is None
            assert (await sb.exec("true")).success
            with pytest.raises(SnapshotError, match="cold-booted"):
                await sb.snapshot("never")

    run(body)


def test_fork_carries_state_then_diverges() -> None:
    async def body() -> None:
        async with await Sandbox.create(CONFIG, name="parent") as parent:
            await parent.fs().write("/root/before", "from parent")
            async with await parent.fork() as child:
                assert await child.fs().read_text("/root/before") == "from parent"
                await child.fs().write("/root/after", "child")
                await parent.fs().write("/root/after", "parent")
                assert await child.fs().read_text("/root/after") == "child"
                assert await parent.fs().read_text("/root/after") == "parent"
                assert (await child.exec("hostname")).stdout_text.strip() == "parent-fork"
            # A named capture restores many children.
            await parent.snapshot("snaptest-named")
            try:
                async with await Sandbox.restore("snaptest-named", name="kid1") as k1, \
                        await Sandbox.restore("snaptest-named", name="kid2") as k2:  # fmt: skip
                    for kid in (k1, k2):
                        assert await kid.fs().read_text("/root/after") == "parent"
                    await k1.fs().write("/root/k", "1")
                    assert not await k2.fs().exists("/root/k")
            finally:
                _store.remove_snapshot("snaptest-named")

    run(body)


def test_a_command_running_at_a_fork_never_reaches_the_childs_requests() -> None:
    # The parent's command is captured mid-run: it goes on in the child, whose
    # agent must not report it under the parent session's request id (the
    # child's host numbers its own requests afresh).
    async def body() -> None:
        async with await Sandbox.create(CONFIG, name="parent") as parent:
            running = await parent.exec_stream("sh", ["-c", "sleep 2; echo late"])
            async with await parent.fork() as child:
                outputs: dict[int, tuple[int, str]] = {}

                async def mine(i: int) -> None:
                    # Live while the captured command ends (in guest time) in the child.
                    out = await child.exec("sh", ["-c", f"sleep 3; echo mine-{i}"])
                    outputs[i] = (out.exit_code, out.stdout_text)

                async with anyio.create_task_group() as tg:
                    for i in range(12):
                        tg.start_soon(mine, i)
                assert outputs == {i: (0, f"mine-{i}\n") for i in range(12)}
                for i in range(3):
                    out = await child.exec("echo", [f"after-{i}"])
                    assert (out.exit_code, out.stdout_text) == (0, f"after-{i}\n")
            result = await running.wait()
            assert (result.exit_code, result.stdout_text) == (0, "late\n")

    run(body)


_BUILDER = textwrap.dedent(
    """
    import sys, anyio
    from pytest_microsandbox.runtime import SandboxConfig
    from pytest_microsandbox.runtime.boot import prepare_boot
    from pytest_microsandbox.runtime.qemu import QemuBackend
    from pytest_microsandbox.snapshots import ensure_template

    async def main():
        config = SandboxConfig(name="builder", memory=int(sys.argv[1]))
        plan = prepare_boot(config, "tcg")
        entry = await ensure_template(config, QemuBackend(), plan)
        print(entry.meta.created, entry.path, flush=True)

    anyio.run(main)
    """
)


def _unique_memory() -> int:
    # Memory is part of the template key: an odd size gives this test its own template.
    return 300 + (os.getpid() % 97) * 2 + 1


def _remove_template(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_concurrent_processes_build_once() -> None:
    mem = _unique_memory()
    env = {**os.environ, "MICROSANDBOX_ACCEL": "tcg"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILDER, str(mem)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=600)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    created = {o[0] for o in outs}
    paths = {o[1] for o in outs}
    try:
        assert len(paths) == 1
        assert len(created) == 1, "the template was built more than once"
    finally:
        _remove_template(Path(paths.pop()))


def test_build_killed_halfway_is_never_used() -> None:
    mem = _unique_memory() + 2
    root = _store.templates_root()
    env = {**os.environ, "MICROSANDBOX_ACCEL": "tcg"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILDER, str(mem)], stdout=subprocess.PIPE, text=True, env=env
    )
    mine = f"-pid{proc.pid}-"
    deadline = time.monotonic() + 120
    while not any(mine in p.name for p in root.glob(".tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # mid-boot of the template VM
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in root.glob(".tmp-*") if mine in p.name]
    assert leftovers, "the killed build should have left its temporary directory"
    # Nothing was published; a new build ignores and cleans the leftovers.
    out = subprocess.run(
        [sys.executable, "-c", _BUILDER, str(mem)], capture_output=True, text=True, env=env,
        timeout=600, check=True,
    )  # fmt: skip
    path = Path(out.stdout.split()[1])
    try:
        assert _store.check_entry(path).meta.kind == "template"
        assert not [p for p in root.glob(".tmp-*") if mine in p.name]
    finally:
        _remove_template(path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 90 MiB tmpfs: room for QEMU's start, not for a booting guest's memory."""
    where = tmp_path / "small"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=90m", "tmpfs", str(where)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_disk_full_mid_build_is_clear_and_keeps_nothing(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The free-space check before a build refuses this disk at once (test_store);
    # skip it, as when another process fills the disk after the check.
    monkeypatch.setattr(_store, "check_free_space", lambda where, needed: None)
    before_qemus = set(_my_qemus())

    async def body() -> None:
        backend = QemuBackend()
        accel = await resolve_accel(CONFIG, backend)
        plan = await anyio.to_thread.run_sync(prepare_boot, CONFIG, accel.accel)
        with pytest.raises(SnapshotError, match="most likely full; nothing was kept"):
            await ensure_template(CONFIG, backend, plan, small_disk)

    run(body)
    root = _store.templates_root(small_disk)
    assert list(root.iterdir()) == []  # no temporary entry, no lock file
    assert set(_my_qemus()) - before_qemus == set()


def test_disk_full_mid_snapshot_is_clear_and_keeps_nothing(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store, "check_free_space", lambda where, needed: None)

    async def body() -> None:
        async with await Sandbox.create(CONFIG, name="to-full-disk") as sb:
            # ~100 MiB of guest RAM the capture must write: more than the disk holds.
            await sb.shell("head -c 100000000 /dev/urandom > /dev/shm/fill")
            with pytest.raises(SnapshotError, match="full; nothing was kept"):
                await snapshot_sandbox(sb, "too-big", small_disk)
            assert (await sb.exec("true")).success  # the sandbox runs on

    run(body)
    assert list(_store.named_root(small_disk).iterdir()) == []


_CYCLES = textwrap.dedent(
    """
    import os, sys, anyio
    from pytest_microsandbox.runtime import Sandbox, SandboxConfig
    from pytest_microsandbox.runtime.paths import run_root
    from pytest_microsandbox.snapshots import close_pools

    CONFIG = SandboxConfig(name="snaptest", memory=512)

    def fds():
        return sorted(os.listdir("/proc/self/fd"))

    def children():
        return sorted(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split())

    async def main():
        async with await Sandbox.create(CONFIG, name="warm"):
            pass  # the template exists and the pool is warm before counting
        await close_pools()
        await anyio.sleep(0.1)
        before = fds(), children(), set(os.listdir(run_root()))
        for i in range(30):
            sb = await Sandbox.create(CONFIG, name=f"cycle{i}")
            if i % 10 == 0:
                assert (await sb.exec("true")).success
            await sb.stop() if i % 2 else await sb.kill()
        await close_pools()
        await anyio.sleep(0.1)
        after = fds(), children(), set(os.listdir(run_root()))
        print(f"fds {before[0]} -> {after[0]}")
        print(f"child processes {before[1]} -> {after[1]}")
        print(f"new run dirs {sorted(after[2] - before[2])}")
        leaked = before[:2] != after[:2] or not after[2] <= before[2]
        sys.exit(1 if leaked else 0)

    anyio.run(main)
    """
)


def test_create_stop_cycles_leak_nothing() -> None:
    # In a process of its own: this one's other event loops (the sync facade's,
    # session fixtures') may start or stop pooled QEMUs while we count.
    env = {**os.environ, "MICROSANDBOX_ACCEL": "tcg"}
    out = subprocess.run(
        [sys.executable, "-c", _CYCLES], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_prefill_fills_the_pool_before_the_first_create() -> None:
    from pytest_microsandbox.runtime.provision import plan_for
    from pytest_microsandbox.snapshots import expect_creates, prefill_pool
    from pytest_microsandbox.snapshots._engine import _pool_for

    async def body() -> None:
        backend = QemuBackend()
        try:
            await prefill_pool(CONFIG, 3, backend)
            entry = await ensure_template(CONFIG, backend, await plan_for(CONFIG, backend))
            pool = await _pool_for(entry, backend, None)
            assert pool is not None
            with anyio.fail_after(120):  # slow under load, never hanging
                while len(pool._ready) < 2:  # two clones: more than the base depth of one
                    await anyio.sleep(0.1)
            async with await Sandbox.create(CONFIG) as sb:
                assert (await sb.exec("true")).success
        finally:
            expect_creates(0)

    run(body)


def test_a_prefill_stops_at_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_microsandbox.runtime.provision import plan_for
    from pytest_microsandbox.snapshots import POOL_MEMORY_ENV, expect_creates, prefill_pool
    from pytest_microsandbox.snapshots._engine import POOL_CLONE_MIB, _pool_for

    # Room for two waiting clones, and ten announced.
    monkeypatch.setenv(POOL_MEMORY_ENV, str(2 * POOL_CLONE_MIB + POOL_CLONE_MIB // 2))

    async def body() -> None:
        backend = QemuBackend()
        try:
            await prefill_pool(CONFIG, 10, backend)
            entry = await ensure_template(CONFIG, backend, await plan_for(CONFIG, backend))
            pool = await _pool_for(entry, backend, None)
            assert pool is not None
            most = 0
            with anyio.fail_after(120):  # slow under load, never hanging
                # A finished pre-start starts the next one before it returns, so
                # once two wait, a third would already be counted in the depth.
                while len(pool._ready) < 2:
                    most = max(most, pool.depth)
                    await anyio.sleep(0.02)
            assert max(most, pool.depth) == 2
        finally:
            expect_creates(0)

    run(body)
