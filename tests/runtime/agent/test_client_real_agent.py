"""AgentClient driving the real C agent in host mode (``--serve-fd``) over a socketpair."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from pytest_microsandbox.runtime._exceptions import (
    CommandNotFoundError,
    ConfigError,
    ExecError,
    FilesystemError,
    OutputLimitError,
    PathNotFoundError,
    SandboxNotRunningError,
)
from pytest_microsandbox.runtime.agent.client import AgentClient
from pytest_microsandbox.runtime.agent.protocol import CHUNK, MAX_FRAME, PROTOCOL_VERSION
from pytest_microsandbox.runtime.agent.results import Exited, FileKind, Started, Stderr, Stdout

try:
    from pytest_microsandbox.runtime.agent.build import build_agent
except ImportError:  # pragma: no cover - only while the agent is being written
    build_agent = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(build_agent is None, reason="agent build helper not available yet"),
]

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def agent_binary() -> Path:
    from pytest_microsandbox.runtime._exceptions import AgentBuildError

    try:
        return build_agent()
    except AgentBuildError as exc:
        pytest.skip(f"cannot build the agent here: {exc}")


@asynccontextmanager
async def real_agent(binary: Path) -> AsyncIterator[AgentClient]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [str(binary), "--serve-fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    stream = await anyio.abc.UNIXSocketStream.from_socket(ours)
    try:
        with anyio.fail_after(60):
            async with AgentClient(stream) as client:
                yield client
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def client(agent_binary: Path) -> AsyncIterator[AgentClient]:
    async with real_agent(agent_binary) as c:
        await c.wait_ready(timeout=10)
        yield c


async def test_handshake_and_connection_requests(client: AgentClient) -> None:
    assert client.ready_info is not None and client.ready_info.version == PROTOCOL_VERSION
    info = await client.hello(timeout=5)
    assert info.version == PROTOCOL_VERSION and info.agent_version
    await client.ping(timeout=5)
    await client.configure(time_ns=1, seed=os.urandom(32), hostname="box", timeout=5)
    metrics = await client.metrics(timeout=5)
    assert metrics.mem_total > 0 and metrics.nprocs > 0


async def test_exec_output_exit_codes_env_cwd(client: AgentClient, tmp_path: Path) -> None:
    result = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 7"], env=ENV)
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 7)
    result = await client.exec(
        ["sh", "-c", 'printf "%s|%s|" "$FOO" "$(pwd)"; cat'],
        env={**ENV, "FOO": "bar"},
        cwd=str(tmp_path),
    )
    assert result.stdout == f"bar|{tmp_path}|".encode()  # stdin defaults to /dev/null
    assert result.ok


async def test_exec_stdin_round_trip(client: AgentClient) -> None:
    data = os.urandom(3 * CHUNK + 12345)
    result = await client.exec(["cat"], env=ENV, stdin=data, timeout=30)
    assert result.stdout == data


async def test_exec_errors(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(CommandNotFoundError, match="no-such-program"):
        await client.exec(["no-such-program"], env=ENV)
    with pytest.raises(ExecError, match="directory") as info:
        await client.exec(["true"], env=ENV, cwd=str(tmp_path / "missing"))
    assert not isinstance(info.value, CommandNotFoundError)


async def test_exec_timeout_and_signals(client: AgentClient) -> None:
    result = await client.exec(["sleep", "30"], env=ENV, timeout=0.3)
    assert result.timed_out and result.term_signal == signal.SIGKILL

    async with await client.exec_stream(["sh", "-c", "echo hi; exec sleep 30"], env=ENV) as proc:
        events = [await proc.__anext__(), await proc.__anext__()]
        assert isinstance(events[0], Started) and events[1] == Stdout(b"hi\n")
        await proc.signal(signal.SIGTERM)
        result = await proc.wait()
    assert result.term_signal == signal.SIGTERM and not result.timed_out

    proc = await client.exec_stream(["cat"], env=ENV, stdin=True)
    await proc.write_stdin(b"abc")
    await proc.close_stdin()
    events = [event async for event in proc]
    assert events[-1] == Exited(exit_code=0, term_signal=None, timed_out=False)
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"abc"


async def test_eight_concurrent_execs(client: AgentClient) -> None:
    results = {}

    async def run(k: int) -> None:
        script = f"i=0; while [ $i -lt 200 ]; do echo {k}-$i; i=$((i+1)); done; exit {k}"
        results[k] = await client.exec(["sh", "-c", script], env=ENV, timeout=30)

    async with anyio.create_task_group() as tg:
        for k in range(8):
            tg.start_soon(run, k)
    for k, result in results.items():
        assert result.exit_code == k
        assert result.stdout == "".join(f"{k}-{i}\n" for i in range(200)).encode()


async def test_file_round_trip_and_metadata(client: AgentClient, tmp_path: Path) -> None:
    base = str(tmp_path)
    data = os.urandom(5 * CHUNK + 7)
    assert await client.write_file(f"{base}/a/b/big", data) == len(data)
    assert await client.read_file(f"{base}/a/b/big") == data
    assert (tmp_path / "a/b/big").read_bytes() == data

    host_file = tmp_path / "host.txt"
    host_file.write_bytes(b"host data")
    await client.write_file(f"{base}/copy", host_file, mode=0o600)
    await client.write_file(f"{base}/copy", b"+", append=True)
    chunks: list[bytes] = []
    assert await client.read_file_to(f"{base}/copy", chunks.append) == 10
    assert b"".join(chunks) == b"host data+"

    st = await client.stat(f"{base}/copy")
    assert st.is_file and st.size == 10 and st.permissions == 0o600
    assert st.uid == os.getuid()
    await client.chmod(f"{base}/copy", 0o644)
    assert (await client.stat(f"{base}/copy")).permissions == 0o644

    await client.mkdir(f"{base}/x/y", parents=True)
    await client.rename(f"{base}/copy", f"{base}/x/moved")
    names = {e.name: e for e in await client.list_dir(f"{base}/x")}
    assert names["y"].kind is FileKind.DIRECTORY and names["moved"].size == 10
    os.symlink("moved", tmp_path / "x/link")
    assert (await client.stat(f"{base}/x/link", follow_symlinks=False)).kind is FileKind.SYMLINK

    await client.remove(f"{base}/x", recursive=True)
    with pytest.raises(PathNotFoundError):
        await client.stat(f"{base}/x")
    with pytest.raises(PathNotFoundError):
        await client.read_file(f"{base}/nope")
    with pytest.raises(FilesystemError) as info:
        await client.mkdir(f"{base}/a")  # exists, no parents=True
    assert info.value.errno != 0


async def test_copy_file_within_the_guest(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 3)  # several loop steps of the agent's copy
    (tmp_path / "src.bin").write_bytes(data)
    size = await client.copy_file(str(tmp_path / "src.bin"), str(tmp_path / "d/e/dst.bin"), 0o640)
    assert size == len(data)
    assert (tmp_path / "d/e/dst.bin").read_bytes() == data
    assert (tmp_path / "d/e/dst.bin").stat().st_mode & 0o777 == 0o640
    with pytest.raises(PathNotFoundError):
        await client.copy_file(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(FilesystemError):
        await client.copy_file(str(tmp_path), str(tmp_path / "y"))  # a directory


async def test_concurrent_file_transfers_and_execs(client: AgentClient, tmp_path: Path) -> None:
    blobs = {k: os.urandom(CHUNK * 2 + k) for k in range(4)}

    async def transfer(k: int) -> None:
        path = f"{tmp_path}/f{k}"
        await client.write_file(path, blobs[k])
        assert await client.read_file(path) == blobs[k]

    async def pings() -> None:
        for _ in range(20):
            await client.ping(timeout=10)

    async with anyio.create_task_group() as tg:
        for k in blobs:
            tg.start_soon(transfer, k)
        tg.start_soon(pings)
        tg.start_soon(client.exec, ["sh", "-c", "head -c 3000000 /dev/zero"], ENV)


async def test_shutdown_closes_connection(agent_binary: Path) -> None:
    async with real_agent(agent_binary) as client:
        await client.wait_ready(timeout=10)
        await client.shutdown(timeout=10)
        with anyio.fail_after(10):
            while client.error is None:
                await anyio.sleep(0.01)
        with pytest.raises(SandboxNotRunningError, match="after SHUTDOWN"):
            await client.ping()


# -- limits (#19: unbounded output, smaller bad inputs) --------------------------------------

MIB = 1 << 20
#: 5 MB of output on stdout and stderr together, interleaved.
FLOOD = "head -c 3000000 /dev/zero; head -c 2000000 /dev/zero >&2; echo done >&2"


async def test_output_over_the_cap_kills_and_raises(client: AgentClient) -> None:
    with pytest.raises(OutputLimitError, match="more than 1048576 bytes") as info:
        await client.exec(["sh", "-c", FLOOD], ENV, max_output=MIB)
    err = info.value
    assert err.limit == MIB
    # exactly the cap was kept, no more: host memory is bounded by it
    assert len(err.stdout) + len(err.stderr) == MIB
    assert "exec_stream" in str(err) and "max_output_bytes" in str(err)
    assert (await client.exec(["true"], ENV)).ok  # the connection is fine


async def test_output_over_the_cap_truncates_on_request(client: AgentClient) -> None:
    result = await client.exec(["sh", "-c", FLOOD], ENV, max_output=MIB, on_output_limit="truncate")
    assert result.ok  # ran to its end
    assert len(result.stdout) + len(result.stderr) == MIB
    assert result.stdout_truncated or result.stderr_truncated
    small = await client.exec(["echo", "hi"], ENV, max_output=MIB, on_output_limit="truncate")
    assert small.stdout == b"hi\n" and not small.stdout_truncated and not small.stderr_truncated


async def test_exec_stream_still_delivers_everything(client: AgentClient) -> None:
    proc = await client.exec_stream(["sh", "-c", FLOOD], ENV)
    out = err = 0
    async with proc:
        async for event in proc:
            if isinstance(event, Stdout):
                out += len(event.data)
            elif isinstance(event, Stderr):
                err += len(event.data)
    assert (out, err) == (3_000_000, 2_000_005)


async def test_auto_acknowledged_window_delivers_everything(client: AgentClient) -> None:
    # The process acknowledges what its reader took: a window far smaller than
    # the output neither stalls the command nor breaks the protocol, iterated
    # or collected by wait().
    proc = await client.exec_stream(["sh", "-c", FLOOD], ENV, window=65536, auto_ack=True)
    out = 0
    async with proc:
        async for event in proc:
            if isinstance(event, Stdout):
                out += len(event.data)
            if out >= 1_000_000:
                break
        with anyio.fail_after(60):  # a guard against a stall, not a speed assertion
            result = await proc.wait()
    assert out + len(result.stdout) == 3_000_000
    assert len(result.stderr) == 2_000_005


async def test_read_over_max_size_stops_the_agent(client: AgentClient, tmp_path: Path) -> None:
    endless = tmp_path / "endless"  # stands in for /proc/kcore: 1 TiB, sparse
    with open(endless, "wb") as f:
        f.truncate(1 << 40)
    with anyio.fail_after(60):  # a guard against a hang, not a speed assertion
        with pytest.raises(OutputLimitError, match="copy_to_host") as info:
            await client.read_file(str(endless), max_size=MIB)
    assert info.value.limit == MIB
    (tmp_path / "small").write_bytes(b"x" * MIB)
    assert await client.read_file(str(tmp_path / "small"), max_size=MIB) == b"x" * MIB
    assert (await client.exec(["true"], ENV)).ok


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0])
async def test_bad_exec_timeout_is_a_config_error(client: AgentClient, timeout: float) -> None:
    with pytest.raises(ConfigError, match=r"^timeout: must be a finite number of seconds > 0"):
        await client.exec(["true"], ENV, timeout=timeout)


async def test_oversized_argument_or_env_names_it(client: AgentClient) -> None:
    with pytest.raises(ExecError, match=r"argv\[2\] is 200000 bytes.*MAX_ARG_STRLEN"):
        await client.exec(["echo", "a", "x" * 200_000], ENV)
    with pytest.raises(ExecError, match="environment variable BIG is 200004 bytes"):
        await client.exec(["true"], {**ENV, "BIG": "x" * 200_000})
    many = [f"{i:03d}" + "x" * 100_000 for i in range(12)]
    with pytest.raises(ExecError, match=rf"over the {MAX_FRAME}-byte limit of one EXEC request"):
        await client.exec(["echo", *many], ENV)
    assert (await client.exec(["echo", "x" * 100_000], ENV)).ok  # below both limits


# -- pseudo-terminals (tty=(rows, cols)) --------------------------------------------------


async def _read_until(proc, needle: bytes, timeout: float = 20) -> bytes:
    seen = b""
    with anyio.fail_after(timeout):
        while needle not in seen:
            event = await proc.__anext__()
            assert isinstance(event, (Started, Stdout)), event
            if isinstance(event, Stdout):
                seen += event.data
    return seen


async def test_pty_is_the_controlling_terminal_and_merges_output(client: AgentClient) -> None:
    script = "tty; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo ALL-TTY; stty size; echo err >&2"
    proc = await client.exec_stream(["sh", "-c", script], env=ENV, tty=(33, 101), timeout=30)
    async with proc:
        result = await proc.wait()
    out = result.stdout.replace(b"\r\n", b"\n")
    assert b"/dev/pts/" in out and b"ALL-TTY\n" in out and b"33 101\n" in out
    assert b"err\n" in out and result.stderr == b""  # one output, as on a terminal


async def test_pty_input_resize_ctrl_c_and_exit_status(client: AgentClient) -> None:
    proc = await client.exec_stream(["sh"], env={**ENV, "PS1": "$ "}, tty=(24, 80))
    async with proc:
        await proc.write_stdin(b"stty size\n")
        await _read_until(proc, b"24 80")
        await proc.resize(50, 132)
        await proc.write_stdin(b"stty size\n")
        await _read_until(proc, b"50 132")
        # Ctrl-C reaches the foreground job (sleep), not through SIGNAL: the shell lives on.
        await proc.write_stdin(b"sleep 30\n")
        await anyio.sleep(0.5)
        with anyio.fail_after(10):  # well before the sleep's 30 s
            await proc.write_stdin(b"\x03")
            await proc.write_stdin(b"echo status=$?\n")
            await _read_until(proc, b"status=130")
        await proc.write_stdin(b"exit 7\n")
        result = await proc.wait()
    assert result.exit_code == 7


async def test_pty_size_is_checked(client: AgentClient) -> None:
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        await client.exec_stream(["sh"], env=ENV, tty=(0, 80))
    async with await client.exec_stream(["cat"], env=ENV, stdin=True) as proc:
        with pytest.raises(ValueError, match="no terminal"):
            await proc.resize(10, 10)


async def test_the_agent_keeps_to_the_output_window(client: AgentClient) -> None:
    size, window = 3_000_000, 65536
    proc = await client.exec_stream(["head", "-c", str(size), "/dev/zero"], env=ENV, window=window)
    async with proc:
        got = 0
        while got < window:
            event = await proc.__anext__()
            if isinstance(event, Stdout):
                got += len(event.data)
        assert got == window  # every read the agent made fit in the window
        with anyio.move_on_after(1):  # nothing more until the host acknowledges
            event = await proc.__anext__()
            raise AssertionError(f"the agent sent {event!r} past its window")
        await proc.ack(got)
        async for event in proc:
            if isinstance(event, Stdout):
                got += len(event.data)
                await proc.ack(len(event.data))
    assert got == size and proc.returncode == 0


async def test_hello_disowns_the_previous_sessions_commands(
    client: AgentClient, tmp_path: Path
) -> None:
    # A HELLO starts a new host session (the first request after a restore),
    # which numbers its requests afresh: a command of the previous session runs
    # on, but its output and exit must reach no request of the new one.
    marker = tmp_path / "went-on"
    old = await client.exec_stream(
        ["sh", "-c", f"sleep 0.5; echo late; echo ran > {marker}"], env=ENV
    )
    await client.hello(timeout=10)
    assert any("1 request(s) of the previous one disowned" in line for line in client.logs)
    for _ in range(6):
        result = await client.exec(["sh", "-c", "sleep 0.2; echo mine"], env=ENV, timeout=10)
        assert (result.exit_code, result.stdout) == (0, b"mine\n")
    with anyio.fail_after(10):
        while not marker.exists():
            await anyio.sleep(0.05)
    with anyio.move_on_after(0.5) as waited:
        await old.wait()
    assert waited.cancelled_caught  # its exit was reaped silently
    await old.aclose()
    await client.ping(timeout=5)
    assert client.error is None
