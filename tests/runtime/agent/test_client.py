"""AgentClient against a fake agent on a socketpair: routing, concurrency, errors, timeouts."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import termios
from pathlib import Path

import anyio
import anyio.abc
import pytest
from fake_agent import FakeAgent, connect, err

from pytest_microsandbox.runtime._exceptions import (
    CommandNotFoundError,
    CopyLimitError,
    ExecError,
    FilesystemError,
    GuestTimeoutError,
    PathNotFoundError,
    ProtocolError,
    SandboxError,
    SandboxNotRunningError,
)
from pytest_microsandbox.runtime.agent import client as client_module
from pytest_microsandbox.runtime.agent.client import AgentClient
from pytest_microsandbox.runtime.agent.protocol import (
    CHUNK,
    MsgType,
    Tag,
    bytes_field,
    encode_frame,
    int_field,
)
from pytest_microsandbox.runtime.agent.results import (
    ExecResult,
    Exited,
    FileKind,
    Started,
    Stderr,
    Stdout,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- connection level -----------------------------------------------------------------------


async def test_ready_and_logs() -> None:
    seen: list[str] = []

    async def agent(a: FakeAgent) -> None:
        await a.send(0, MsgType.LOG, [bytes_field(Tag.MESSAGE, "booting")])
        await a.send(0, MsgType.READY, FakeAgent.info())
        await a.serve()

    async with connect(agent, on_log=seen.append, log_lines=5) as (client, _):
        info = await client.wait_ready(timeout=5)
        assert info.version == 1 and info.agent_version == "fake-1.0" and info.uptime_ms == 1234
        assert await client.wait_ready() == info  # already there: returns at once
        assert client.ready_info == info
        assert list(client.logs) == ["booting"] == seen


async def test_log_callback_failure_does_not_kill_connection() -> None:
    def boom(_: str) -> None:
        raise RuntimeError("callback bug")

    async def agent(a: FakeAgent) -> None:
        await a.send(0, MsgType.LOG, [bytes_field(Tag.MESSAGE, "x")])
        await a.serve()

    async with connect(agent, on_log=boom) as (client, _):
        await client.ping()
        assert "callback bug" in client.logs[-1]


async def test_wait_ready_timeout() -> None:
    async with connect() as (client, _):
        with pytest.raises(GuestTimeoutError, match="READY"):
            await client.wait_ready(timeout=0.05)


async def test_hello_ping_configure_metrics_mount() -> None:
    async with connect() as (client, agent):
        info = await client.hello()
        assert info.agent_version == "fake-1.0"
        await client.ping(timeout=5)
        await client.configure(time_ns=123, seed=b"s" * 32, hostname="box")
        m = await client.metrics()
        assert (m.uptime_ms, m.mem_total, m.nprocs, m.load1_milli) == (0, 1, 5, 6)
        assert m.load1 == 0.006
        await client.mount("/dev/vdb", "/mnt", "erofs", options="noatime", readonly=True)
        await client.umount("/mnt", lazy=True)
    (conf,) = agent.of_type(MsgType.CONFIGURE)
    assert conf.get_int(Tag.TIME_NS) == 123
    assert conf.get_bytes(Tag.SEED) == b"s" * 32
    assert conf.get_str(Tag.HOSTNAME) == "box"
    (mount,) = agent.of_type(MsgType.MOUNT)
    assert mount.get_str(Tag.SOURCE) == "/dev/vdb" and mount.get_str(Tag.OPTIONS) == "noatime"
    assert mount.get_int(Tag.FLAGS) == 1
    assert agent.of_type(MsgType.UMOUNT)[0].get_int(Tag.FLAGS) == 1
    assert len({f.id for f in agent.received}) == len(agent.received)  # unique ids
    assert all(f.id != 0 for f in agent.received)


async def test_configure_rejects_bad_seed() -> None:
    async with connect() as (client, _):
        with pytest.raises(ValueError, match=r"32\.\.256"):
            await client.configure(seed=b"short")


async def test_hello_version_mismatch() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        await a.send(f.id, MsgType.OK, FakeAgent.info(version=2))
        f = await a.recv()
        await a.send(f.id, MsgType.ERROR, err(0, "unsupported version"))

    async with connect(agent) as (client, _):
        with pytest.raises(ProtocolError, match="version 2"):
            await client.hello()
        with pytest.raises(ProtocolError, match="unsupported version"):
            await client.hello()


async def test_error_reply_on_simple_request() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        await a.send(f.id, MsgType.ERROR, err(errno.EPERM, "nope"))
        f = await a.recv()
        await a.send(f.id, MsgType.ERROR, err(errno.EBUSY, "busy"))

    async with connect(agent) as (client, _):
        with pytest.raises(SandboxError, match=r"CONFIGURE: nope \(errno 1\)"):
            await client.configure(hostname="x")
        with pytest.raises(FilesystemError) as info:
            await client.umount("/mnt")
        assert info.value.errno == errno.EBUSY and info.value.path == "/mnt"


async def test_shutdown_then_connection_closed() -> None:
    async with connect() as (client, _):
        await client.shutdown()
        with pytest.raises(SandboxNotRunningError, match="after SHUTDOWN"):
            await client.ping()


async def test_a_guest_flooding_the_connection_does_not_starve_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client reads its socket directly, without anyio's checkpoint per read:
    reads that keep finding data must still let the host's other tasks run."""
    # Small reads, so that many in a row find the socket's buffer non-empty.
    monkeypatch.setattr(client_module, "_READ_SIZE", 4096)
    frame = encode_frame(0, MsgType.LOG, [bytes_field(Tag.MESSAGE, b"x" * 1000)])
    count = 3000
    host, guest = socket.socketpair()
    logs = 0
    since_tick = 0  # frames routed since the ticker last ran
    longest = 0

    def on_log(_: str) -> None:
        nonlocal logs, since_tick, longest
        logs += 1
        since_tick += 1
        longest = max(longest, since_tick)

    async def tick() -> None:
        nonlocal since_tick
        while logs < count:
            since_tick = 0
            await anyio.sleep(0)

    stream = await anyio.abc.UNIXSocketStream.from_socket(host)
    try:
        with anyio.fail_after(30):
            async with AgentClient(stream, on_log=on_log), anyio.create_task_group() as tg:
                tg.start_soon(tick)
                await anyio.to_thread.run_sync(guest.sendall, frame * count)
                while logs < count:
                    await anyio.sleep(0.01)
    finally:
        guest.close()
    assert logs == count
    # A read of 4 KiB holds about four frames; the socket buffers ~200 of them,
    # which one task reading without a checkpoint would route in one go.
    assert longest <= 20


async def test_a_frame_the_socket_took_in_part_is_finished_after_a_cancel() -> None:
    """A frame the socket took only in part is finished under the write lock even
    if its caller is cancelled: a frame cut short would desynchronize the stream."""
    data = os.urandom(CHUNK)  # one FS_CHUNK frame, far more than a socketpair buffers
    stalled, resume = anyio.Event(), anyio.Event()

    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        assert f.type == MsgType.FS_WRITE
        await a.send(f.id, MsgType.OK)
        stalled.set()
        await resume.wait()
        chunk = await a.recv()  # the strict decoder: a cut frame fails here
        assert chunk.type == MsgType.FS_CHUNK and chunk.require_bytes(Tag.DATA) == data
        await a.serve()

    async with connect(agent) as (client, a):
        sock = a.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.write_file, "/f", data)
                await stalled.wait()
                # Wait until the chunk's first bytes are in the agent's socket.
                while struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0] == 0:
                    await anyio.sleep(0.001)
                scope.cancel()  # the write is cancelled; its frame must still go out whole
                resume.set()
        await client.ping(timeout=10)
        assert client.error is None


# --- exec ----------------------------------------------------------------------------------


async def test_exec_collects_output() -> None:
    async with connect() as (client, agent):
        result = await client.exec(["echo", "hello", "world"])
        assert result == ExecResult(
            pid=result.pid, exit_code=0, term_signal=None, timed_out=False, stdout=b"hello world\n"
        )
        assert result.ok and result.returncode == 0
        result = await client.exec(
            ["env"], env={"A": "1", "B": "x=y"}, cwd="/work", user=1000, timeout=2.5
        )
        assert result.stdout == b"A=1\nB=x=y"
        assert result.stderr == b"cwd=/work user=1000"
        assert result.exit_code == 3 and not result.ok
    exec_frame = agent.of_type(MsgType.EXEC)[1]
    assert exec_frame.get_int(Tag.TIMEOUT_MS) == 2500
    assert exec_frame.get_int(Tag.STDIN_MODE) is None


async def test_exec_stdin() -> None:
    async with connect() as (client, agent):
        data = bytes(range(256)) * (CHUNK // 256 + 10)  # more than one STDIN frame
        result = await client.exec(["cat"], stdin=data)
        assert result.stdout == data
    assert agent.of_type(MsgType.EXEC)[0].get_int(Tag.STDIN_MODE) == 1
    stdin = agent.of_type(MsgType.STDIN)
    assert [len(f.require_bytes(Tag.DATA)) for f in stdin] == [CHUNK, len(data) - CHUNK, 0]


async def test_exec_command_not_found_and_other_errors() -> None:
    async with connect() as (client, _):
        with pytest.raises(CommandNotFoundError, match="'missing'"):
            await client.exec(["missing", "arg"])
        with pytest.raises(ExecError, match="Permission denied") as info:
            await client.exec(["denied"])
        assert not isinstance(info.value, CommandNotFoundError)
        # ENOENT about the working directory is not "command not found".
        with pytest.raises(ExecError, match="cannot change directory") as info:
            await client.exec(["nocwd"], cwd="/nope")
        assert not isinstance(info.value, CommandNotFoundError)
        assert (await client.exec(["echo"])).ok  # the connection is still fine


async def test_exec_argument_validation() -> None:
    async with connect() as (client, _):
        with pytest.raises(ValueError, match="empty"):
            await client.exec([])
        with pytest.raises(ValueError, match="NUL"):
            await client.exec(["echo", "a\0b"])
        with pytest.raises(ValueError, match="environment"):
            await client.exec(["echo"], env={"A=B": "c"})
        with pytest.raises(ValueError, match="absolute"):
            await client.exec(["echo"], cwd="relative")


async def test_exec_timed_out_is_reported_not_raised() -> None:
    async with connect() as (client, _):
        result = await client.exec(["timeout"], timeout=1)
        assert result.timed_out and result.term_signal == signal.SIGKILL
        assert result.returncode == -signal.SIGKILL and result.stdout == b"partial"


async def test_exec_backstop_when_agent_never_reports_exit() -> None:
    async with connect(exec_grace=0.1) as (client, agent):
        with pytest.raises(GuestTimeoutError, match="'hang'"):
            await client.exec(["hang"], timeout=0.05)
        # The host tried to kill it before giving up.
        (sig,) = await agent.wait_for(MsgType.SIGNAL)
        assert sig.get_int(Tag.SIGNAL) == signal.SIGKILL
        await client.ping()


async def test_exec_stream_events_and_signals() -> None:
    async with connect() as (client, agent):
        async with await client.exec_stream(["chatty", "2"]) as proc:
            events = [event async for event in proc]
        i = agent.of_type(MsgType.EXEC)[0].id
        assert events == [
            Started(100 + i),
            Stdout(f"{i}:out0;".encode()),
            Stderr(f"{i}:err0;".encode()),
            Stdout(f"{i}:out1;".encode()),
            Stderr(f"{i}:err1;".encode()),
            Exited(exit_code=i % 256, term_signal=None, timed_out=False),
        ]
        assert proc.returncode == i % 256
        assert (await proc.wait()).stdout == b""  # iteration consumed the output

        proc = await client.exec_stream(["sleep"])
        assert proc.returncode is None and proc.exited is None
        await proc.signal(signal.SIGTERM)
        result = await proc.wait()
        assert result.term_signal == signal.SIGTERM and result.returncode == -signal.SIGTERM
        await proc.kill()  # no-op after exit
        assert len(await agent.wait_for(MsgType.SIGNAL)) == 1

        proc = await client.exec_stream(["cat"], stdin=True)
        await proc.write_stdin(b"abc")
        await proc.write_stdin(b"")
        await proc.close_stdin()
        await proc.close_stdin()
        with pytest.raises(ValueError, match="closed"):
            await proc.write_stdin(b"more")
        assert (await proc.wait()).stdout == b"abc"

        proc = await client.exec_stream(["sleep"])
        with pytest.raises(ValueError, match="not a pipe"):
            await proc.write_stdin(b"x")
        await proc.aclose()  # kills and releases
        (_, kill) = await agent.wait_for(MsgType.SIGNAL, 2)
        assert kill.get_int(Tag.SIGNAL) == signal.SIGKILL
        with pytest.raises(ExecError, match="abandoned"):
            await proc.wait()


async def test_eight_concurrent_execs_interleaved() -> None:
    async with connect() as (client, _):
        results: dict[int, ExecResult] = {}

        async def run(k: int) -> None:
            results[k] = await client.exec(["chatty", str(20 + k)])

        async with anyio.create_task_group() as tg:
            for k in range(8):
                tg.start_soon(run, k)
        for k, result in results.items():
            i = result.pid - 100
            n = 20 + k
            assert result.stdout == "".join(f"{i}:out{j};" for j in range(n)).encode()
            assert result.stderr == "".join(f"{i}:err{j};" for j in range(n)).encode()
            assert result.exit_code == i % 256
        assert len({r.pid for r in results.values()}) == 8


async def test_frames_for_unknown_ids_are_dropped() -> None:
    async def agent(a: FakeAgent) -> None:
        await a.send(999, MsgType.STDOUT, [bytes_field(Tag.DATA, b"stray")])
        await a.send(998, MsgType.OK)
        await a.serve()

    async with connect(agent) as (client, _):
        await client.ping()
        assert client.error is None
        assert client.stray_frames == 2  # 998 and 999 are not this session's (random start)


async def test_frames_for_ids_not_yet_issued_never_reach_the_request_that_takes_the_id() -> None:
    # A guest restored from a capture may report a command of the session it
    # was captured with, under an id this session is about to use.
    async def agent(a: FakeAgent) -> None:
        ping = await a.recv()
        stale = ping.id % 0xFFFF_FFFF + 1  # the id the client hands out next
        await a.send(stale, MsgType.STDOUT, [bytes_field(Tag.DATA, b"late")])
        await a.send(
            stale, MsgType.EXITED, [int_field(Tag.EXIT_CODE, 9), int_field(Tag.TIMED_OUT, 0)]
        )
        await a.send(ping.id, MsgType.OK)
        await a.serve()

    async with connect(agent) as (client, fake):
        await client.ping()
        result = await client.exec(["echo", "mine"])
        assert (
            fake.of_type(MsgType.EXEC)[0].id == fake.of_type(MsgType.PING)[0].id % 0xFFFF_FFFF + 1
        )
        assert (result.exit_code, result.stdout) == (0, b"mine\n")
        assert client.error is None and client.stray_frames == 2
        assert sum("never issued" in line for line in client.logs) == 1


async def test_issued_ids_wrap_and_abandoned_ones_are_not_strays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "_first_request_id", lambda: 0xFFFF_FFFF)

    async def agent(a: FakeAgent) -> None:
        for _ in range(2):
            ping = await a.recv()
            await a.send(ping.id, MsgType.OK)
        await a.send(0xFFFF_FFFF, MsgType.OK)  # issued, answered: dropped quietly
        await a.send(1, MsgType.OK)
        await a.send(2, MsgType.OK)  # never issued
        await a.send(0xFFFF_FFFE, MsgType.OK)  # never issued (just before the start)
        await a.serve()

    async with connect(agent) as (client, fake):
        await client.ping()
        await client.ping()
        assert [f.id for f in fake.of_type(MsgType.PING)] == [0xFFFF_FFFF, 1]
        with anyio.fail_after(5):
            while client.stray_frames < 2:
                await anyio.sleep(0.01)
        await client.ping()  # its OK follows every frame above on the wire
        assert client.error is None and client.stray_frames == 2


async def test_a_guest_flooding_unissued_ids_is_bounded_and_harmless() -> None:
    async def agent(a: FakeAgent) -> None:
        ping = await a.recv()
        for k in range(2000):
            await a.send(
                (ping.id + 1000 + k) % 0xFFFF_FFFF + 1,
                MsgType.STDOUT,
                [bytes_field(Tag.DATA, b"x" * 100)],
            )
        await a.send(ping.id, MsgType.OK)
        await a.serve()

    async with connect(agent, log_lines=10) as (client, _):
        await client.ping()
        await client.ping()
        assert client.stray_frames == 2000 and len(client.logs) <= 10
        assert not client._pending


# --- files ----------------------------------------------------------------------------------


async def test_read_file_multi_chunk_and_sinks(tmp_path: Path) -> None:
    async with connect() as (client, agent):
        agent.files["/data"] = b"0123456789" * 10
        agent.read_chunk = 7
        assert await client.read_file("/data") == agent.files["/data"]
        with open(tmp_path / "out", "wb") as f:
            assert await client.read_file_to("/data", f) == 100
        assert (tmp_path / "out").read_bytes() == agent.files["/data"]
        got: list[bytes] = []

        async def sink(chunk: bytes) -> None:
            got.append(chunk)

        await client.read_file_to("/data", sink)
        assert max(map(len, got)) == 7 and b"".join(got) == agent.files["/data"]
        with pytest.raises(PathNotFoundError) as info:
            await client.read_file("/nope")
        assert info.value.errno == errno.ENOENT and info.value.path == "/nope"
        assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(ValueError, match="absolute"):
            await client.read_file("relative")


async def test_read_file_size_mismatch_is_protocol_error() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        await a.send(f.id, MsgType.FS_CHUNK, [bytes_field(Tag.DATA, b"abc")])
        await a.send(f.id, MsgType.OK, [int_field(Tag.SIZE, 4)])

    async with connect(agent) as (client, _):
        with pytest.raises(ProtocolError, match="sent 3 bytes, said 4"):
            await client.read_file("/x")
        with pytest.raises(ProtocolError):
            await client.ping()


async def test_a_window_read_answered_with_more_is_protocol_error() -> None:
    async with connect() as (client, agent):  # the fake agent ignores OFFSET and SIZE
        agent.files["/data"] = b"0123456789" * 10
        with pytest.raises(ProtocolError, match="more than the 10 bytes asked for"):
            await client.read_file_to("/data", lambda _: None, offset=20, length=10)
        sent = agent.of_type(MsgType.FS_READ)[-1]
        assert sent.require_int(Tag.OFFSET) == 20 and sent.require_int(Tag.SIZE) == 10


async def test_write_file_sources(tmp_path: Path) -> None:
    async with connect() as (client, agent):
        big = bytes(range(256)) * (2 * CHUNK // 256 + 3)
        assert await client.write_file("/big", big) == len(big)
        assert agent.files["/big"] == big
        chunks = [f for f in agent.received if f.type == MsgType.FS_CHUNK]
        assert [len(f.require_bytes(Tag.DATA)) for f in chunks] == [
            CHUNK,
            CHUNK,
            len(big) - 2 * CHUNK,
        ]

        async def gen():
            yield b"a"
            yield b""
            yield b"b" * (CHUNK + 1)

        assert await client.write_file("/gen", gen(), mode=0o600, parents=False) == CHUNK + 2
        assert agent.files["/gen"] == b"a" + b"b" * (CHUNK + 1)
        write = agent.of_type(MsgType.FS_WRITE)[1]
        assert write.get_int(Tag.MODE) == 0o600 and write.get_int(Tag.FLAGS) == 0

        host = tmp_path / "host.bin"
        host.write_bytes(b"from host")
        await client.write_file("/h", host)
        await client.write_file("/h", b"+more", append=True)
        assert agent.files["/h"] == b"from host+more"
        assert agent.of_type(MsgType.FS_WRITE)[-1].get_int(Tag.FLAGS) == 3
        await client.write_file("/empty", b"")
        assert agent.files["/empty"] == b""
        with pytest.raises(TypeError):
            await client.write_file("/s", "text")  # type: ignore[arg-type]


async def test_write_file_errors() -> None:
    async with connect() as (client, agent):
        with pytest.raises(FilesystemError, match="Read-only") as info:
            await client.write_file("/ro/x", b"data")
        assert info.value.errno == errno.EROFS
        assert not agent.of_type(MsgType.FS_CHUNK)  # nothing sent after the refusal

        agent.fail_write_after = 1
        with pytest.raises(FilesystemError, match="No space") as info:
            await client.write_file("/full", bytes(10 * CHUNK))
        assert info.value.errno == errno.ENOSPC
        await client.ping()  # answered after every frame sent before it was processed
        # The host noticed the ERROR and stopped well before sending all 10 chunks.
        assert len(agent.of_type(MsgType.FS_CHUNK)) < 10


async def test_dir_and_metadata_ops() -> None:
    async with connect() as (client, agent):
        agent.files.update({"/d/a": b"1", "/d/b": b"22", "/e/c": b""})
        entries = await client.list_dir("/d")
        assert [(e.name, e.kind, e.size, e.mode) for e in entries] == [
            ("a", FileKind.FILE, 1, 0o100644),
            ("b", FileKind.FILE, 2, 0o100644),
        ]
        st = await client.stat("/d/b", follow_symlinks=False)
        assert st.is_file and not st.is_dir and st.size == 2 and st.permissions == 0o640
        assert (st.uid, st.gid, st.mtime_ns) == (1000, 100, 7)
        assert agent.of_type(MsgType.FS_STAT)[0].get_int(Tag.FLAGS) == 1
        await client.mkdir("/new", mode=0o700, parents=True)
        mk = agent.of_type(MsgType.FS_MKDIR)[0]
        assert mk.get_int(Tag.MODE) == 0o700 and mk.get_int(Tag.FLAGS) == 1
        await client.rename("/d/a", "/d/z")
        assert "/d/z" in agent.files and "/d/a" not in agent.files
        await client.chmod("/d/z", 0o755)
        await client.remove("/d/z", recursive=True)
        assert agent.of_type(MsgType.FS_REMOVE)[0].get_int(Tag.FLAGS) == 1
        with pytest.raises(PathNotFoundError):
            await client.stat("/gone")
        with pytest.raises(PathNotFoundError):
            await client.remove("/gone")
        with pytest.raises(PathNotFoundError):
            await client.rename("/gone", "/x")


async def test_bad_kind_is_protocol_error() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        fields = [int_field(Tag.KIND, 9), int_field(Tag.SIZE, 0), int_field(Tag.MODE, 0)]
        fields += [int_field(Tag.MTIME_NS, 0), int_field(Tag.UID, 0), int_field(Tag.GID, 0)]
        await a.send(f.id, MsgType.OK, fields)

    async with connect(agent) as (client, _):
        with pytest.raises(ProtocolError, match="KIND 9"):
            await client.stat("/x")


def dirent(name: bytes) -> list[tuple[int, bytes]]:
    return [
        bytes_field(Tag.NAME, name),
        int_field(Tag.KIND, 1),
        int_field(Tag.SIZE, 5),
        int_field(Tag.MODE, 0o100644),
        int_field(Tag.MTIME_NS, 0),
    ]


@pytest.mark.parametrize(
    "name", [b"../../escape_pwned.txt", b"/etc/x", b"a/b", b".", b"..", b"", b"nul\0"]
)
async def test_list_dir_rejects_names_no_directory_can_hold(name: bytes) -> None:
    """A forged FS_LIST reply must not hand callers a name that leaves the directory."""

    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        await a.send(f.id, MsgType.DIRENT, dirent(b"fine"))
        await a.send(f.id, MsgType.DIRENT, dirent(name))
        await a.send(f.id, MsgType.OK)

    async with connect(agent) as (client, _):
        with pytest.raises(ProtocolError, match=r"FS_LIST of /d: the agent sent the entry name"):
            await client.list_dir("/d")
        with pytest.raises(ProtocolError):  # the connection cannot be trusted any more
            await client.ping()


async def test_list_dir_entry_cap() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        for i in range(5):
            await a.send(f.id, MsgType.DIRENT, dirent(b"f%d" % i))
        await a.send(f.id, MsgType.OK)

    async with connect(agent) as (client, _):
        with pytest.raises(CopyLimitError, match="more than 3 entries"):
            await client.list_dir("/d", max_entries=3)


@pytest.mark.parametrize("target", [b"", b"a\0b", b"x" * 4096])
async def test_readlink_rejects_impossible_targets(target: bytes) -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        assert f.type == MsgType.FS_READLINK and f.get_bytes(Tag.PATH) == b"/l"
        await a.send(f.id, MsgType.OK, [bytes_field(Tag.DATA, target)])

    async with connect(agent) as (client, _):
        with pytest.raises(ProtocolError, match="FS_READLINK of /l"):
            await client.readlink("/l")


async def test_readlink_returns_the_target() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        await a.send(f.id, MsgType.OK, [bytes_field(Tag.DATA, b"../t\xff")])
        f = await a.recv()
        await a.send(f.id, MsgType.ERROR, err(errno.EINVAL, "/f: Invalid argument"))

    async with connect(agent) as (client, _):
        assert os.fsencode(await client.readlink("/l")) == b"../t\xff"
        with pytest.raises(FilesystemError, match="Invalid argument"):
            await client.readlink("/f")


async def test_large_write_does_not_starve_other_requests() -> None:
    async with connect() as (client, agent):
        pings_done_during_write: list[bool] = []
        writing = True

        async def pinger() -> None:
            for _ in range(5):
                await client.ping()
                pings_done_during_write.append(writing)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pinger)
            await client.write_file("/big", bytes(32 * CHUNK))
            writing = False
        assert agent.files["/big"] == bytes(32 * CHUNK)
        assert any(pings_done_during_write)


# --- failures -------------------------------------------------------------------------------


async def test_eof_mid_request_fails_all_pending() -> None:
    async def agent(a: FakeAgent) -> None:
        for _ in range(3):
            await a.recv()
        f = await a.recv()
        await a.send(f.id, MsgType.STARTED, [int_field(Tag.PID, 1)])
        await a.send(f.id, MsgType.STDOUT, [bytes_field(Tag.DATA, b"partial")])
        await a.stream.aclose()

    async with connect(agent) as (client, _):
        errors: list[BaseException] = []

        async def call(fn, *args) -> None:
            try:
                await fn(*args)
            except SandboxNotRunningError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, client.ping)
            tg.start_soon(call, client.read_file, "/x")
            tg.start_soon(call, client.list_dir, "/")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, client.exec, ["cmd"])
        assert len(errors) == 4
        assert all("guest connection closed" in str(e) for e in errors)
        assert isinstance(client.error, SandboxNotRunningError)
        with pytest.raises(SandboxNotRunningError):
            await client.ping()
        with pytest.raises(SandboxNotRunningError):
            await client.wait_ready()


async def test_eof_mid_frame_is_reported() -> None:
    async def agent(a: FakeAgent) -> None:
        await a.recv()
        await a.send_raw(encode_frame(1, MsgType.OK)[:6])
        await a.stream.aclose()

    async with connect(agent) as (client, _):
        with pytest.raises(SandboxNotRunningError, match="mid-frame"):
            await client.ping()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",
        struct.pack(">IIB", 5, 1, 0x77),
        encode_frame(1, MsgType.STDOUT, []),
        encode_frame(0, MsgType.OK, []),
    ],
    ids=["huge-length", "unknown-type", "missing-field", "reply-id-0"],
)
async def test_garbage_fails_pending_with_protocol_error(garbage: bytes) -> None:
    async def agent(a: FakeAgent) -> None:
        await a.recv()
        await a.recv()
        await a.send_raw(garbage)
        await anyio.sleep_forever()

    async with connect(agent) as (client, _):
        errors: list[BaseException] = []

        async def call(fn, *args) -> None:
            try:
                await fn(*args)
            except ProtocolError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, client.ping)
            tg.start_soon(call, client.exec, ["x"])
        assert len(errors) == 2
        assert isinstance(client.error, ProtocolError)
        with pytest.raises(ProtocolError) as info:
            await client.read_file("/x")
        assert info.value.__cause__ is client.error


async def test_unexpected_reply_type_poisons_connection() -> None:
    async def agent(a: FakeAgent) -> None:
        f = await a.recv()
        await a.send(f.id, MsgType.STDOUT, [bytes_field(Tag.DATA, b"?")])
        await a.serve()

    async with connect(agent) as (client, _):
        with pytest.raises(ProtocolError, match=r"unexpected STDOUT .* in reply to PING"):
            await client.ping()
        with pytest.raises(ProtocolError):
            await client.ping()


async def test_request_timeout_then_connection_still_usable() -> None:
    async def agent(a: FakeAgent) -> None:
        slow = await a.recv()  # not answered in time
        await a.recv()  # the second ping: answer late reply first, then it
        await a.send(slow.id, MsgType.OK)
        await a.send(a.received[-1].id, MsgType.OK)
        await a.serve()

    async with connect(agent) as (client, _):
        with pytest.raises(GuestTimeoutError, match=r"PING within 0\.05 s"):
            await client.ping(timeout=0.05)
        await client.ping(timeout=5)
        assert client.error is None
        with pytest.raises(GuestTimeoutError):
            await client.list_dir("/", timeout=0)


async def test_client_close_fails_pending_calls() -> None:
    async def agent(a: FakeAgent) -> None:
        a.answer = False
        await a.serve()

    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg, connect(agent) as (client, _):

        async def call() -> None:
            try:
                await client.ping()
            except SandboxNotRunningError as exc:
                errors.append(exc)

        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
    assert len(errors) == 1 and "closed" in str(errors[0])
    with pytest.raises(SandboxNotRunningError):
        await client.ping()


async def test_stderr_from_a_pseudo_terminal_breaks_the_protocol() -> None:
    # A terminal has one output; a guest that sends STDERR for one is not our agent.
    async with connect() as (client, agent):
        proc = await client.exec_stream(["env"], tty=(24, 80))
        with pytest.raises(ProtocolError, match=r"STDERR \(id \d+\) from a pseudo-terminal"):
            await proc.wait()
        with pytest.raises(ProtocolError):
            await client.ping()  # the connection cannot be trusted any more
    frame = agent.of_type(MsgType.EXEC)[0]
    assert (frame.get_int(Tag.ROWS), frame.get_int(Tag.COLS)) == (24, 80)
    assert frame.get_int(Tag.STDIN_MODE) is None


async def test_output_past_the_window_breaks_the_protocol() -> None:
    # A guest that ignores EXEC WINDOW cannot make the host buffer without bound.
    async def flooder(a: FakeAgent) -> None:
        f = await a.recv()
        assert f.type == MsgType.EXEC and f.get_int(Tag.WINDOW) == 4096
        await a.send(f.id, MsgType.STARTED, [int_field(Tag.PID, 7)])
        with contextlib.suppress(OSError, anyio.BrokenResourceError):
            for _ in range(40):  # 40 x 4 KiB, never acknowledged: over 33 windows
                await a.send(f.id, MsgType.STDOUT, [bytes_field(Tag.DATA, b"y" * 4096)])
            await anyio.sleep(5)

    async with connect(flooder) as (client, _):
        proc = await client.exec_stream(["yes"], window=4096)
        with pytest.raises(ProtocolError, match=r"not acknowledged, over the window of 4096"):
            await proc.wait()
    async with connect() as (client, _):
        with pytest.raises(ValueError, match="window"):
            await client.exec_stream(["yes"], window=10)
