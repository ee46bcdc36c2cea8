"""Sandbox against real QEMU VMs (TCG here): exec, streams, files, failures."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    CommandNotFoundError,
    ExecTimeoutError,
    Exited,
    FilesystemError,
    GuestCrashedError,
    OutputLimitError,
    PathNotFoundError,
    Sandbox,
    SandboxConfig,
    SandboxNotRunningError,
    Started,
    Stdout,
    SyncSandbox,
)
from pytest_microsandbox.runtime.agent.protocol import CHUNK
from pytest_microsandbox.runtime.boot import resolve_accel
from pytest_microsandbox.runtime.qemu import QemuBackend
from pytest_microsandbox.runtime.sandbox import EXEC_STREAM_WINDOW

pytestmark = pytest.mark.vm


def test_exit_codes(shared_sandbox: SyncSandbox) -> None:
    assert shared_sandbox.exec("true").exit_code == 0
    out = shared_sandbox.shell("exit 3")
    assert out.exit_code == 3 and not out.success
    killed = shared_sandbox.shell("kill -9 $$")
    assert killed.exit_code == -9 and killed.term_signal == 9


def test_tcg_guest_cpu_has_no_erms_nor_smap(shared_sandbox: SyncSandbox) -> None:
    # Under TCG the guest CPU leaves ERMS and SMAP out (qemu.TCG_CPU): the kernel
    # then clears and copies memory eight bytes per emulated iteration, not one,
    # and its user accesses do not end translation blocks.
    decision = anyio.run(resolve_accel, SandboxConfig(name="tests-shared"), QemuBackend())
    flags = shared_sandbox.shell("grep -m1 '^flags' /proc/cpuinfo").stdout_text.split()
    assert "sse4_2" in flags and "avx2" in flags  # the rest of `max` is there
    if decision.accel == "tcg":
        assert "erms" not in flags and "smap" not in flags


def test_python_runs_same_interpreter(shared_sandbox: SyncSandbox) -> None:
    out = shared_sandbox.exec(sys.executable, ["-c", "print(6 * 7)"])
    assert out.exit_code == 0 and out.stdout_text == "42\n"
    # The venv's packages are there: the package under test imports in the guest.
    out = shared_sandbox.exec(
        sys.executable, ["-c", "import pytest_microsandbox, sys; print(sys.prefix)"]
    )
    assert out.stdout_text.strip() == sys.prefix, out.stderr_text


def test_the_host_images_venv_is_activated_for_commands(shared_sandbox: SyncSandbox) -> None:
    venv = Path(sys.prefix).resolve()
    assert venv != Path(sys.base_prefix).resolve(), "the test suite runs in a venv"
    out = shared_sandbox.shell(
        'for c in python pip pytest; do command -v $c; done; echo "$VIRTUAL_ENV"; '
        'python -c "import sys, pytest; print(sys.prefix)"'
    )
    assert out.exit_code == 0, out.stderr_text
    lines = out.stdout_text.splitlines()
    assert lines[:3] == [f"{venv}/bin/python", f"{venv}/bin/pip", f"{venv}/bin/pytest"]
    assert lines[3] == str(venv)
    assert Path(lines[4]).resolve() == venv
    # A PATH of the caller's still wins.
    assert shared_sandbox.shell("echo $PATH", env={"PATH": "/bin"}).stdout_text == "/bin\n"


def test_diagnostics_show_recent_commands_and_kernel_messages_since_start(
    shared_sandbox: SyncSandbox,
) -> None:
    assert shared_sandbox.console_path.is_file()
    shared_sandbox.shell("echo msb-diag-marker > /dev/kmsg")
    shared_sandbox.shell("echo 'it broke' >&2; exit 3")
    text = shared_sandbox.diagnostics()
    assert "-c echo 'it broke' >&2; exit 3  ->  exit 3" in text
    assert "      it broke" in text
    kernel = text.split("guest kernel messages", 1)[1]
    assert "msb-diag-marker" in kernel
    assert "Linux version" not in kernel  # the boot's messages are not repeated


def test_fs_streams_and_in_guest_copy(shared_sandbox: SyncSandbox) -> None:
    fs = shared_sandbox.fs()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    pieces = (payload[i : i + 300_000] for i in range(0, len(payload), 300_000))
    assert fs.write_stream("/tmp/stream/in.bin", pieces, mode=0o640) == len(payload)
    assert fs.copy("/tmp/stream/in.bin", "/tmp/stream/copy/out.bin") == len(payload)
    out = shared_sandbox.shell("stat -c %a /tmp/stream/copy/out.bin; sha256sum /tmp/stream/*.bin")
    mode, digest = out.stdout_text.split()[:2]
    assert mode == "640" and digest == hashlib.sha256(payload).hexdigest()
    chunks = list(fs.read_stream("/tmp/stream/copy/out.bin"))
    assert b"".join(chunks) == payload
    assert max(len(c) for c in chunks) <= 1024 * 1024
    fs.remove("/tmp/stream", recursive=True)


def test_stdout_and_stderr_kept_apart(shared_sandbox: SyncSandbox) -> None:
    out = shared_sandbox.shell("echo out; echo err >&2; echo out2")
    assert out.stdout_text == "out\nout2\n"
    assert out.stderr_text == "err\n"


def test_env_cwd_user_stdin(shared_sandbox: SyncSandbox) -> None:
    out = shared_sandbox.shell("echo $GREETING; pwd; id -u", env={"GREETING": "hi"}, cwd="/tmp")
    assert out.stdout_text == "hi\n/tmp\n0\n"
    assert shared_sandbox.exec("id", ["-u"], user="nobody").stdout_text == "65534\n"
    assert shared_sandbox.exec("id", ["-u"], user="1234:1234").stdout_text == "1234\n"
    assert shared_sandbox.exec("cat", stdin=b"fed through stdin").stdout == b"fed through stdin"


def test_unknown_command(shared_sandbox: SyncSandbox) -> None:
    with pytest.raises(CommandNotFoundError, match="no-such-program"):
        shared_sandbox.exec("no-such-program")


def test_16mb_of_output_streams_without_loss(shared_sandbox: SyncSandbox) -> None:
    size = 16 * 1024 * 1024
    out = shared_sandbox.shell(
        f"head -c {size} /dev/urandom > /tmp/big; sha256sum /tmp/big >&2; cat /tmp/big"
    )
    assert len(out.stdout) == size
    assert out.stderr_text.split()[0] == hashlib.sha256(out.stdout).hexdigest()
    shared_sandbox.fs().remove("/tmp/big")


def test_eight_concurrent_execs(shared_sandbox: SyncSandbox) -> None:
    async def run() -> list[str]:
        sb = shared_sandbox.async_sandbox
        results: list[str] = [""] * 8

        async def one(i: int) -> None:
            out = await sb.shell(f"sleep 0.{i}; echo job{i}")
            results[i] = out.stdout_text

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        return results

    start = time.monotonic()
    results = shared_sandbox._portal.call(run)
    assert results == [f"job{i}\n" for i in range(8)]
    # They overlapped: far less than the 2.8 s the sleeps add up to.
    assert time.monotonic() - start < 2.8 + 5


def test_64mb_file_round_trips_both_ways(shared_sandbox: SyncSandbox, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(64 * 1024 * 1024))
    fs = shared_sandbox.fs()
    assert fs.copy_from_host(src, "/tmp/blob.bin") == src.stat().st_size
    guest_sum = shared_sandbox.exec("sha256sum", ["/tmp/blob.bin"]).stdout_text.split()[0]
    assert guest_sum == hashlib.sha256(src.read_bytes()).hexdigest()
    back = tmp_path / "out.bin"
    assert fs.copy_to_host("/tmp/blob.bin", back) == src.stat().st_size
    assert back.read_bytes() == src.read_bytes()
    fs.remove("/tmp/blob.bin")


def test_transfer_disk_copies_exactly_concurrently_and_frees_its_blocks(
    shared_sandbox: SyncSandbox,
) -> None:
    from pytest_microsandbox.runtime.qemu import XFER_DISK_BYTES, XFER_IMAGE
    from pytest_microsandbox.runtime.sandbox import XFER_THRESHOLD

    sb = shared_sandbox.async_sandbox
    # Odd sizes: the guest reads whole blocks (O_DIRECT) and must write only the payload.
    payloads = [os.urandom(XFER_THRESHOLD + 4097 * i + 1) for i in range(3)]

    async def write_all() -> None:
        async with anyio.create_task_group() as tg:
            for i, payload in enumerate(payloads):
                tg.start_soon(sb.fs().write, f"/tmp/xfer{i}.bin", payload)

    shared_sandbox._portal.call(write_all)

    def guest_sums() -> list[str]:
        out = shared_sandbox.shell("sha256sum /tmp/xfer0.bin /tmp/xfer1.bin /tmp/xfer2.bin")
        return [line.split()[0] for line in out.stdout_text.splitlines()]

    assert guest_sums() == [hashlib.sha256(p).hexdigest() for p in payloads]
    # The same disk range again with other bytes: nothing stale from the guest's cache.
    payloads[0] = bytes(reversed(payloads[0]))
    shared_sandbox.fs().write("/tmp/xfer0.bin", payloads[0])
    assert guest_sums()[0] == hashlib.sha256(payloads[0]).hexdigest()
    image = (sb._vm.spec.run_dir / XFER_IMAGE).stat()
    assert image.st_size == XFER_DISK_BYTES and image.st_blocks == 0
    shared_sandbox.shell("rm /tmp/xfer0.bin /tmp/xfer1.bin /tmp/xfer2.bin")


def test_transfer_that_cannot_be_staged_is_a_filesystem_error(
    shared_sandbox: SyncSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pytest_microsandbox.runtime import sandbox as sandbox_module
    from pytest_microsandbox.runtime.sandbox import XFER_THRESHOLD

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    payload = os.urandom(XFER_THRESHOLD)
    with monkeypatch.context() as patch:
        patch.setattr(sandbox_module, "_write_at", full_disk)
        with pytest.raises(FilesystemError, match=r"No space left on device.*disk full"):
            shared_sandbox.fs().write("/tmp/never.bin", payload)
    # Its disk range was given back: the next transfer works.
    shared_sandbox.fs().write("/tmp/after.bin", payload)
    out = shared_sandbox.exec("sha256sum", ["/tmp/after.bin"]).stdout_text.split()[0]
    assert out == hashlib.sha256(payload).hexdigest()
    shared_sandbox.shell("rm /tmp/after.bin")


def test_fs_operations(shared_sandbox: SyncSandbox) -> None:
    fs = shared_sandbox.fs()
    fs.mkdir("/tmp/fsops/a/b")
    fs.write("/tmp/fsops/a/b/f.txt", "hello")
    assert fs.read_text("/tmp/fsops/a/b/f.txt") == "hello"
    assert fs.exists("/tmp/fsops/a/b/f.txt")
    st = fs.stat("/tmp/fsops/a/b/f.txt")
    assert st.size == 5 and st.is_file
    fs.chmod("/tmp/fsops/a/b/f.txt", 0o600)
    assert fs.stat("/tmp/fsops/a/b/f.txt").permissions == 0o600
    fs.rename("/tmp/fsops/a/b/f.txt", "/tmp/fsops/g.txt")
    assert sorted(e.name for e in fs.list("/tmp/fsops")) == ["a", "g.txt"]
    fs.remove("/tmp/fsops", recursive=True)
    assert not fs.exists("/tmp/fsops")
    with pytest.raises(PathNotFoundError):
        fs.read("/tmp/fsops/g.txt")


def test_guest_writes_never_reach_the_host(shared_sandbox: SyncSandbox) -> None:
    marker = Path(__file__).parent / "written-by-guest.txt"
    out = shared_sandbox.shell(f"echo x > {marker} && rm -rf /usr/share/zoneinfo && echo ok")
    assert out.stdout_text == "ok\n", out.stderr_text
    assert shared_sandbox.fs().exists(str(marker))
    assert not marker.exists()
    assert Path("/usr/share/zoneinfo").exists() or not Path("/usr/share").exists()


def test_timed_out_command_is_killed(shared_sandbox: SyncSandbox) -> None:
    with pytest.raises(ExecTimeoutError) as info:
        shared_sandbox.shell("echo started; echo $$ > /tmp/victim.pid; sleep 60", timeout=1.5)
    assert info.value.stdout == b"started\n"
    pid = shared_sandbox.fs().read_text("/tmp/victim.pid").strip()
    assert shared_sandbox.shell(f"kill -0 {pid}").exit_code != 0


def test_exec_stream_events_stdin_and_signal(shared_sandbox: SyncSandbox) -> None:
    handle = shared_sandbox.exec_stream("cat", stdin=True)
    handle.write_stdin(b"ping\n")
    events = iter(handle)
    assert isinstance(next(events), Started)
    first = next(events)
    assert isinstance(first, Stdout) and first.data == b"ping\n"
    handle.signal(signal.SIGTERM)
    rest = list(events)
    assert isinstance(rest[-1], Exited) and rest[-1].term_signal == signal.SIGTERM


def test_metrics(shared_sandbox: SyncSandbox) -> None:
    m = shared_sandbox.metrics()
    assert m.uptime_ms > 0 and 0 < m.memory_bytes < m.memory_total_bytes
    assert m.memory_host_resident_bytes and m.memory_host_resident_bytes > 0
    assert 0.0 <= m.cpu_percent <= 100.0


def test_project_edit_is_visible_in_a_new_sandbox(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname='p'\n")
    (project / "data.txt").write_text("first")
    config = SandboxConfig(name="edit-1", project_root=project)
    with SyncSandbox.create(config) as sb:
        assert sb.fs().read_text(str(project / "data.txt")) == "first"
    (project / "data.txt").write_text("second edit")
    with SyncSandbox.create(config) as sb:
        assert sb.fs().read_text(str(project / "data.txt")) == "second edit"


def test_local_directory_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox is not installed on the host (apt-get install busybox-static)")
    (root / "bin/busybox").write_bytes(busybox.read_bytes())
    (root / "bin/busybox").chmod(0o755)
    (root / "hello.txt").write_text("from a directory image")
    with SyncSandbox.create(SandboxConfig(name="dir-image", image=str(root))) as sb:
        out = sb.exec("/bin/busybox", ["cat", "/hello.txt"])
        assert out.stdout_text == "from a directory image"


def test_guest_panic_gives_console_tail() -> None:
    with SyncSandbox.create(SandboxConfig(name="panics")) as sb:
        with pytest.raises(GuestCrashedError) as info:
            sb.shell("echo c > /proc/sysrq-trigger; sleep 30", timeout=60)
        assert "sysrq" in str(info.value).lower() or "panic" in str(info.value).lower()
        assert "its VM process exited" in str(info.value)  # panic=-1, -no-reboot
        with pytest.raises((GuestCrashedError, SandboxNotRunningError)):
            sb.exec("true")


def test_async_api_and_stop_is_idempotent() -> None:
    async def main() -> None:
        async with await Sandbox.create(SandboxConfig(name="async-demo")) as sb:
            out = await sb.exec("python3", ["-c", "print(6 * 7)"])
            assert out.exit_code == 0 and out.stdout_text == "42\n"
            await sb.stop()
            assert not sb.running
            with pytest.raises(SandboxNotRunningError):
                await sb.exec("true")

    anyio.run(main)


def test_raw_channel_carries_bytes_both_ways() -> None:
    # The guest finds the port by name, answers one line, and sees EOF once the
    # host closes its side.
    script = (
        "for d in /sys/class/virtio-ports/*; do "
        '[ "$(cat $d/name)" = msb.chan ] && p=/dev/${d##*/}; done; '
        'exec 3<>"$p"; read -r line <&3; echo "got $line" >&3; '
        "cat <&3 >/dev/null; echo eof"
    )

    async def main() -> None:
        async with await Sandbox.create(SandboxConfig(name="channel-demo")) as sb:
            channel = await sb.open_channel()
            async with await sb.exec_stream("/bin/sh", ["-c", script]) as proc:
                await channel.send(b"hello\n")
                received = b""
                with anyio.fail_after(30):
                    while not received.endswith(b"\n"):
                        received += await channel.receive()
                assert received == b"got hello\n"
                await channel.aclose()
                with anyio.fail_after(30):
                    out = await proc.wait()
            assert out.stdout_text == "eof\n"
            with pytest.raises(SandboxNotRunningError, match="already opened"):
                await sb.open_channel()

    anyio.run(main)


def test_sigkilled_owner_leaves_no_qemu(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox
            sb = SyncSandbox.create(SandboxConfig(name="orphan-test"))
            print(sb.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        qemu_pid = int(owner.stdout.readline())
        assert Path(f"/proc/{qemu_pid}").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{qemu_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # A zombie would still have a /proc entry; it is reaped by init, so wait for that too.
    assert (
        not Path(f"/proc/{qemu_pid}").exists()
        or "Z" in Path(f"/proc/{qemu_pid}/stat").read_text().split()[2]
    )


def test_sandboxes_stop_in_any_order() -> None:
    async def main() -> None:
        first = await Sandbox.create(SandboxConfig(name="order-a"))
        second = await Sandbox.create(SandboxConfig(name="order-b"))
        await first.stop()  # not LIFO: must not trip anyio's cancel-scope nesting
        assert (await second.exec("true")).success
        await second.stop()
        assert not first.running and not second.running

    anyio.run(main)


def test_hung_guest_is_reported_not_waited_on_forever() -> None:
    from pytest_microsandbox.runtime import GuestTimeoutError
    from pytest_microsandbox.runtime import sandbox as sandbox_mod

    async def main() -> None:
        config = SandboxConfig(name="hangs", request_timeout=1.0)
        async with await Sandbox.create(config) as sb:
            assert sb.pid is not None
            os.kill(sb.pid, signal.SIGSTOP)  # the whole VM freezes
            try:
                with pytest.raises(GuestTimeoutError, match="stopped answering"):
                    await sb.shell("sleep 1000")  # no exec timeout: the heartbeat catches it
                with pytest.raises(GuestTimeoutError):
                    await sb.fs().stat("/")
            finally:
                os.kill(sb.pid, signal.SIGCONT)

    original = sandbox_mod.HEARTBEAT_INTERVAL
    sandbox_mod.HEARTBEAT_INTERVAL = 0.5
    try:
        anyio.run(main)
    finally:
        sandbox_mod.HEARTBEAT_INTERVAL = original


def test_sync_snapshot_fork_and_restore(tmp_path: Path) -> None:
    from pytest_microsandbox.snapshots import Snapshot

    with SyncSandbox.create(SandboxConfig(name="sync-parent")) as parent:
        parent.fs().write("/root/state.txt", "before")
        with parent.fork() as child:
            assert child.fs().read_text("/root/state.txt") == "before"
            child.fs().write("/root/state.txt", "child")
        assert parent.fs().read_text("/root/state.txt") == "before"
        path = parent.snapshot("sync-snap")
        try:
            with SyncSandbox.restore("sync-snap", name="sync-restored") as restored:
                assert restored.fs().read_text("/root/state.txt") == "before"
        finally:
            Snapshot.remove("sync-snap")
        assert not path.exists()


# -- limits (#19 items 5 and 8) -------------------------------------------------------------


def test_output_over_the_cap_is_bounded_and_the_sandbox_goes_on(
    shared_sandbox: SyncSandbox,
) -> None:
    flood = "head -c 5000000 /dev/zero"
    with pytest.raises(OutputLimitError, match="1048576 bytes") as info:
        shared_sandbox.shell(flood, max_output=1 << 20)
    assert len(info.value.stdout) + len(info.value.stderr) == 1 << 20
    out = shared_sandbox.shell(flood, max_output=1 << 20, on_output_limit="truncate")
    assert out.success and out.stdout_truncated and len(out.stdout) == 1 << 20
    assert shared_sandbox.shell("echo alive").stdout == b"alive\n"


def test_reading_proc_kcore_ends_at_the_limit(shared_sandbox: SyncSandbox) -> None:
    # /proc/kcore streams "forever" (it is as big as the kernel's address space):
    # the read must end at its limit and the agent stop reading it.
    with pytest.raises(OutputLimitError, match=r"larger than 1048576 bytes.*copy_to_host"):
        shared_sandbox.fs().read("/proc/kcore", max_size=1 << 20)
    assert shared_sandbox.fs().read("/etc/hostname")
    assert shared_sandbox.shell("echo alive").stdout == b"alive\n"


def test_qemu_failing_at_start_says_why() -> None:
    # The memory check of Sandbox.create catches this before QEMU; a cold boot
    # past it shows what a QEMU that fails at start (here: guest RAM it cannot
    # allocate) reports.
    from pytest_microsandbox.runtime.boot import prepare_boot
    from pytest_microsandbox.runtime.provision import boot_session
    from pytest_microsandbox.runtime.qemu import QemuBackend

    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("with vm.overcommit_memory=1 QEMU gets any amount of memory")
    meminfo = Path("/proc/meminfo").read_text().split()
    if int(meminfo[meminfo.index("MemTotal:") + 1]) >= 60 << 20:
        pytest.skip("this host may well give a guest 64 GiB")
    config = SandboxConfig(name="too-big", memory=65536, cold_boot=True, accel="tcg")

    async def main() -> None:
        plan = await anyio.to_thread.run_sync(prepare_boot, config, "tcg", None)
        with pytest.raises(GuestCrashedError, match="cannot set up guest memory"):
            await boot_session(config, QemuBackend(), lambda d: plan.vm_spec(config, d), plan)

    anyio.run(main)


def test_a_guest_flooding_its_console_cannot_grow_the_host_log(
    shared_sandbox: SyncSandbox,
) -> None:
    # The console log is guest data on the host disk: guest root writing to the
    # serial port forever must not fill it. The launcher keeps the newest bytes.
    from pytest_microsandbox.runtime.launcher import CONSOLE_MAX_BYTES, build_launcher

    if build_launcher()[0] is None:
        pytest.skip("no launcher here (no C compiler): the console log is unbounded")
    flood = "head -c 2500000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo; echo END-OF-FLOOD"
    assert shared_sandbox.shell(f"{{ {flood}; }} > /dev/ttyS0", timeout=300).exit_code == 0
    log = shared_sandbox.async_sandbox.console_path
    deadline = time.monotonic() + 10
    while "END-OF-FLOOD" not in shared_sandbox.console_tail(3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "END-OF-FLOOD" in shared_sandbox.console_tail(3)
    assert log.stat().st_size <= CONSOLE_MAX_BYTES


def test_exec_stream_output_nobody_reads_is_bounded_on_the_host() -> None:
    # Past the window the agent stops reading the command's pipe: the command
    # blocks instead of the host buffering without limit (a guest flooding an
    # unread stream cannot grow host memory). Reading then gets every byte.
    size = 8 << 20

    async def main() -> None:
        async with await Sandbox.create(SandboxConfig(name="window-demo")) as sb:
            handle = await sb.exec_stream("head", ["-c", str(size), "/dev/zero"])
            await anyio.sleep(3)  # unbounded, the 8 MiB cross in well under a second
            alive = await sb.exec("kill", ["-0", str(handle.pid)])
            assert alive.exit_code == 0, "the command ran to its end: nothing held it back"
            held = handle._process._chan.unacked  # type: ignore[attr-defined]
            assert 0 < held <= EXEC_STREAM_WINDOW + 2 * CHUNK
            total = 0
            with anyio.fail_after(60):
                async for event in handle:
                    if isinstance(event, Stdout):
                        total += len(event.data)
            assert total == size
            assert handle._process.returncode == 0

    anyio.run(main)
