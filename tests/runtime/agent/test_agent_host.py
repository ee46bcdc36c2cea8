"""The C guest agent in host mode (``--serve-fd``), driven over a socketpair.

The frame codec here is deliberately tiny and independent of the host-side
``protocol.py``: these tests pin the agent to docs/protocol.md itself.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._exceptions import AgentBuildError
from pytest_microsandbox.runtime.agent.build import build_agent

# --- a minimal codec -------------------------------------------------------

MAX_FRAME = 1048576 + 65536
CHUNK = 1048576

VERSION, ARG, ENV, CWD, USER, TIMEOUT_MS, STDIN_MODE, DATA, SIGNAL = 1, 2, 3, 4, 5, 7, 8, 9, 10
PATH, PATH2, MODE, FLAGS, PID, EXIT_CODE, TERM_SIGNAL, TIMED_OUT = 11, 12, 13, 14, 15, 16, 17, 18
ERRNO, MESSAGE, NAME, KIND, SIZE, MTIME_NS, UID, GID = 19, 20, 21, 22, 23, 24, 32, 33
SEED, AGENT_VERSION, HOSTNAME, TIME_NS, UPTIME_MS = 29, 30, 31, 28, 40
INT_TAGS = {1, 7, 8, 10, 13, 14, 15, 16, 17, 18, 19, 22, 23, 24, 28, 32, 33, *range(40, 47)}

READY, LOG, HELLO, PING, SHUTDOWN, CONFIGURE, METRICS = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
EXEC, STDIN, SIGNAL_MSG = 0x10, 0x11, 0x12
FS_READ, FS_WRITE, FS_CHUNK, FS_END, FS_LIST, FS_STAT = 0x20, 0x21, 0x22, 0x23, 0x24, 0x25
FS_MKDIR, FS_REMOVE, FS_RENAME, FS_CHMOD = 0x26, 0x27, 0x28, 0x29
STARTED, STDOUT, STDERR, EXITED, DIRENT, OK, ERROR = 0x90, 0x91, 0x92, 0x93, 0xA2, 0xF0, 0xF1

Field = tuple[int, "bytes | str | int"]


def encode_fields(fields: Sequence[Field]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        if isinstance(value, int):
            raw = struct.pack(">q", value)
        elif isinstance(value, str):
            raw = value.encode()
        else:
            raw = value
        out += struct.pack(">BI", tag, len(raw)) + raw
    return bytes(out)


def encode(req_id: int, mtype: int, fields: Sequence[Field] = ()) -> bytes:
    payload = encode_fields(fields)
    return struct.pack(">IIB", 5 + len(payload), req_id, mtype) + payload


@dataclass
class Frame:
    id: int
    type: int
    fields: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, tag: int) -> bytes:
        values = [v for t, v in self.fields if t == tag]
        assert len(values) == 1, f"field {tag} in {self}"
        return values[0]

    def has(self, tag: int) -> bool:
        return any(t == tag for t, _ in self.fields)

    def int(self, tag: int) -> int:
        raw = self.get(tag)
        assert len(raw) == 8
        return struct.unpack(">q", raw)[0]


def decode_payload(payload: bytes) -> list[tuple[int, bytes]]:
    fields, off = [], 0
    while off < len(payload):
        assert len(payload) - off >= 5, "truncated field"
        tag, n = struct.unpack_from(">BI", payload, off)
        off += 5
        assert n <= len(payload) - off, "field overruns"
        assert tag not in INT_TAGS or n == 8
        fields.append((tag, payload[off : off + n]))
        off += n
    return fields


class Agent:
    """One agent process and our end of its socket."""

    def __init__(self, binary: Path) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [str(binary), "--serve-fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self.sock = ours
        self.sock.settimeout(20)
        self.buf = bytearray()
        self.logs: list[bytes] = []
        self.next_id = 1
        self.pending: dict[int, list[Frame]] = {}

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def send(self, req_id: int, mtype: int, fields: Sequence[Field] = ()) -> None:
        self.sock.sendall(encode(req_id, mtype, fields))

    def recv(self) -> Frame:
        while True:
            if len(self.buf) >= 4:
                (length,) = struct.unpack_from(">I", self.buf)
                assert 5 <= length <= MAX_FRAME, f"bad length {length} from agent"
                if len(self.buf) >= 4 + length:
                    req_id, mtype = struct.unpack_from(">IB", self.buf, 4)
                    payload = bytes(self.buf[9 : 4 + length])
                    del self.buf[: 4 + length]
                    frame = Frame(req_id, mtype, decode_payload(payload))
                    if frame.type == LOG:
                        self.logs.append(frame.get(MESSAGE))
                        continue
                    return frame
            data = self.sock.recv(4 << 20)
            assert data, "agent closed the connection"
            self.buf += data

    def recv_for(self, req_id: int) -> Frame:
        """Next frame of one request, parking frames of others."""
        queue = self.pending.setdefault(req_id, [])
        while not queue:
            frame = self.recv()
            self.pending.setdefault(frame.id, []).append(frame)
        return queue.pop(0)

    def call(self, mtype: int, fields: Sequence[Field] = ()) -> Frame:
        req_id = self.new_id()
        self.send(req_id, mtype, fields)
        return self.recv_for(req_id)

    def wait_log(self, needle: bytes) -> None:
        deadline = time.monotonic() + 10
        while not any(needle in m for m in self.logs):
            assert time.monotonic() < deadline
            self.sock.settimeout(0.2)
            try:
                frame = self.recv()
                self.pending.setdefault(frame.id, []).append(frame)
            except TimeoutError:
                pass
            finally:
                self.sock.settimeout(20)


@dataclass
class Result:
    pid: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    exited: Frame | None = None
    error: Frame | None = None

    @property
    def code(self) -> int:
        assert self.exited is not None, self.error
        return self.exited.int(EXIT_CODE)


def exec_fields(argv: list[str], **kw) -> list[Field]:
    fields: list[Field] = [(ARG, a) for a in argv]
    fields += [(ENV, e) for e in kw.get("env", ["PATH=/usr/bin:/bin"])]
    for key, tag in (("cwd", CWD), ("user", USER), ("timeout_ms", TIMEOUT_MS)):
        if key in kw:
            fields.append((tag, kw[key]))
    if kw.get("stdin") is not None:
        fields.append((STDIN_MODE, 1))
    return fields


def finish(agent: Agent, req_id: int) -> Result:
    res = Result()
    out, err = bytearray(), bytearray()
    while True:
        frame = agent.recv_for(req_id)
        if frame.type == STARTED:
            res.pid = frame.int(PID)
        elif frame.type == STDOUT:
            assert res.pid, "output before STARTED"
            out += frame.get(DATA)
        elif frame.type == STDERR:
            err += frame.get(DATA)
        elif frame.type == EXITED:
            res.exited = frame
            break
        elif frame.type == ERROR:
            assert not res.pid, "ERROR after STARTED"
            res.error = frame
            break
        else:
            raise AssertionError(f"unexpected {frame}")
    res.stdout, res.stderr = bytes(out), bytes(err)
    return res


def run(agent: Agent, argv: list[str], **kw) -> Result:
    req_id = agent.new_id()
    agent.send(req_id, EXEC, exec_fields(argv, **kw))
    stdin = kw.get("stdin")
    if isinstance(stdin, bytes):
        for i in range(0, len(stdin), CHUNK):
            agent.send(req_id, STDIN, [(DATA, stdin[i : i + CHUNK])])
        agent.send(req_id, STDIN, [(DATA, b"")])
    return finish(agent, req_id)


# --- fixtures -------------------------------------------------------------


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_agent(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def agent(agent_binary: Path) -> Iterator[Agent]:
    a = Agent(agent_binary)
    ready = a.recv()
    assert ready.id == 0 and ready.type == READY
    assert ready.int(VERSION) == 1
    assert ready.get(AGENT_VERSION)
    yield a
    a.close()


def assert_ok(frame: Frame) -> Frame:
    assert frame.type == OK, frame
    return frame


def assert_error(frame: Frame, errno: int) -> Frame:
    assert frame.type == ERROR, frame
    assert frame.int(ERRNO) == errno, frame
    return frame


# --- connection level ---------------------------------------------------------


def test_hello_ping_metrics_configure(agent: Agent) -> None:
    hello = assert_ok(agent.call(HELLO, [(VERSION, 1)]))
    assert hello.int(VERSION) == 1 and hello.int(UPTIME_MS) >= 0
    assert_error(agent.call(HELLO, [(VERSION, 99)]), errno.EPROTONOSUPPORT)
    assert_ok(agent.call(PING))
    metrics = assert_ok(agent.call(METRICS))
    assert metrics.int(41) > 0 and metrics.int(42) > 0 and metrics.int(45) > 0
    # Host mode validates CONFIGURE but leaves the host's clock and name alone.
    assert_ok(agent.call(CONFIGURE, [(TIME_NS, time.time_ns()), (SEED, os.urandom(32))]))
    assert_error(agent.call(CONFIGURE, [(HOSTNAME, b"")]), 22)


def test_shutdown_replies_then_exits(agent: Agent) -> None:
    assert_ok(agent.call(SHUTDOWN))
    assert agent.proc.wait(timeout=5) == 0


def test_build_is_cached_and_failures_explain_the_fix(agent_binary: Path, tmp_path: Path) -> None:
    assert build_agent(agent_binary.parent.parent) == agent_binary  # cache hit, no rebuild
    assert agent_binary.name.startswith("agent-") and os.access(agent_binary, os.X_OK)
    for bad in ("no-such-compiler-xyz", "false"):
        with pytest.raises(AgentBuildError, match="apt-get install musl-tools"):
            build_agent(tmp_path, compiler=bad)
    assert not [p for p in (tmp_path / "agent").iterdir() if p.name.startswith("agent-")]


def test_serve_unix_and_version(agent_binary: Path, tmp_path: Path) -> None:
    out = subprocess.run([agent_binary, "--version"], capture_output=True, check=True)
    assert out.stdout.startswith(b"msb-agent 1.")
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        proc = subprocess.Popen([agent_binary, "--serve-unix", str(path)])
        listener.settimeout(10)
        conn, _ = listener.accept()
        conn.settimeout(10)
        conn.sendall(encode(7, PING))
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0] + 9:
            chunk = conn.recv(4096)  # READY, then the PING's OK
            assert chunk
            data += chunk
        assert data[8] == READY
        ready_len = 4 + struct.unpack_from(">I", data)[0]
        assert data[ready_len:] == struct.pack(">IIB", 5, 7, OK)
        conn.close()
        assert proc.wait(timeout=5) == 0  # EOF from the host ends host mode


# --- exec ---------------------------------------------------------------------


def test_exit_codes(agent: Agent) -> None:
    assert run(agent, ["true"]).code == 0
    assert run(agent, ["sh", "-c", "exit 42"]).code == 42
    res = run(agent, ["sh", "-c", "kill -9 $$"])
    assert res.exited is not None and res.exited.int(TERM_SIGNAL) == 9
    assert res.exited.int(TIMED_OUT) == 0 and not res.exited.has(EXIT_CODE)


def test_stdout_stderr_kept_apart(agent: Agent) -> None:
    res = run(agent, ["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert (res.stdout, res.stderr, res.code) == (b"out\nout2\n", b"err\n", 0)


def test_env_cwd_and_default_stdin(agent: Agent, tmp_path: Path) -> None:
    res = run(
        agent,
        ["sh", "-c", 'echo "$FOO"; pwd; cat; env | grep -v ^PWD= | sort'],
        env=["FOO=bar baz", "PATH=/usr/bin:/bin"],
        cwd=str(tmp_path),
    )
    # stdin is /dev/null; the environment is exactly ENV (sh adds PWD)
    assert res.stdout == f"bar baz\n{tmp_path}\nFOO=bar baz\nPATH=/usr/bin:/bin\n".encode()


def test_no_agent_descriptor_reaches_the_command(agent: Agent) -> None:
    # Twice: the first exec opens the agent's shared /dev/null, the second reuses it.
    for _ in range(2):
        res = run(agent, ["sh", "-c", "ls /proc/$$/fd"])
        assert res.stdout.split() == [b"0", b"1", b"2"], res.stdout


def agent_fds(agent: Agent, until: int | None = None) -> int:
    """The agent's open descriptors (as seen by a command it runs), read until
    two reads agree, or until ``until``: an earlier test's command may still be
    closing its pipes (seen under load on CI), which is not this test's leak.
    """
    last = -1
    for _ in range(50):
        now = int(run(agent, ["sh", "-c", "ls /proc/$PPID/fd | wc -l"]).stdout)
        if now == until or (until is None and now == last):
            break
        last = now
        time.sleep(0.05)
    return now


def test_a_failed_exec_leaves_no_descriptor_or_child_behind(agent: Agent, tmp_path: Path) -> None:
    before = agent_fds(agent)
    for _ in range(5):
        assert run(agent, ["no-such-program-xyz"]).error is not None
        assert run(agent, ["true"], cwd=str(tmp_path / "missing")).error is not None
    assert agent_fds(agent, until=before) == before
    assert_ok(agent.call(PING))


def test_output_larger_than_a_pipe_arrives_whole_on_both_streams(agent: Agent) -> None:
    # Past a full pipe (64 KiB) the agent enlarges both pipes while the command runs.
    res = run(
        agent, ["sh", "-c", "head -c 3000000 /dev/zero; head -c 700000 /dev/zero >&2; echo x"]
    )
    assert (len(res.stdout), len(res.stderr), res.code) == (3000002, 700000, 0)
    assert res.stdout.endswith(b"x\n")


def test_stdin_pipe(agent: Agent) -> None:
    data = os.urandom(3 * CHUNK + 123)
    res = run(agent, ["sh", "-c", "cat; echo eof >&2"], stdin=data)
    assert res.stdout == data and res.stderr == b"eof\n"


def test_missing_program_and_bad_cwd(agent: Agent, tmp_path: Path) -> None:
    res = run(agent, ["no-such-program-xyz"])
    assert res.error is not None
    assert_error(res.error, 2)
    assert b"command not found: no-such-program-xyz" in res.error.get(MESSAGE)
    res = run(agent, ["/nonexistent/prog"])
    assert res.error is not None and res.error.int(ERRNO) == 2
    res = run(agent, ["true"], cwd=str(tmp_path / "missing"))
    assert res.error is not None and res.error.int(ERRNO) == 2
    assert b"directory" in res.error.get(MESSAGE)
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    res = run(agent, [str(tmp_path / "noexec")])
    assert res.error is not None and res.error.int(ERRNO) == 13  # EACCES


def test_timeout_kills_process_group(agent: Agent) -> None:
    start = time.monotonic()
    res = run(agent, ["sh", "-c", "sleep 30 & echo $!; wait"], timeout_ms=300)
    assert time.monotonic() - start < 5
    assert res.exited is not None
    assert res.exited.int(TIMED_OUT) == 1 and res.exited.int(TERM_SIGNAL) == 9
    grandchild = int(res.stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # it was in the group, so it got SIGKILL too
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("grandchild survived the timeout")


def test_signal(agent: Agent) -> None:
    req_id = agent.new_id()
    agent.send(req_id, EXEC, exec_fields(["sleep", "30"]))
    started = agent.recv_for(req_id)
    assert started.type == STARTED
    agent.send(req_id, SIGNAL_MSG, [(SIGNAL, 15)])
    res = finish(agent, req_id)
    assert res.exited is not None
    assert res.exited.int(TERM_SIGNAL) == 15 and res.exited.int(TIMED_OUT) == 0
    agent.send(req_id, SIGNAL_MSG, [(SIGNAL, 15)])  # after exit: ignored
    agent.send(req_id, STDIN, [(DATA, b"x")])
    assert_ok(agent.call(PING))


def test_user_switch(agent: Agent) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    res = run(agent, ["sh", "-c", "id -u; id -g; id -G"], user="65534:65533")
    assert res.stdout == b"65534\n65533\n65533\n"
    assert run(agent, ["id", "-u"], user="root").stdout == b"0\n"
    res = run(agent, ["true"], user="no-such-user-xyz")
    assert res.error is not None and res.error.int(ERRNO) == 22


def test_16mb_stdout_intact(agent: Agent, tmp_path: Path) -> None:
    blob = os.urandom(16 << 20)
    (tmp_path / "blob").write_bytes(blob)
    res = run(agent, ["sh", "-c", f"cat {tmp_path}/blob; cat {tmp_path}/blob >&2"])
    assert res.code == 0
    assert res.stdout == blob and res.stderr == blob


def test_8_concurrent_execs(agent: Agent, tmp_path: Path) -> None:
    blob = os.urandom(2 << 20)
    (tmp_path / "blob").write_bytes(blob)
    ids = []
    for i in range(8):
        req_id = agent.new_id()
        script = f"sleep 0.2; cat {tmp_path}/blob; echo done-{i} >&2; exit {i}"
        agent.send(req_id, EXEC, exec_fields(["sh", "-c", script]))
        ids.append(req_id)
    start = time.monotonic()
    for i, req_id in enumerate(ids):
        res = finish(agent, req_id)
        assert res.code == i and res.stdout == blob and res.stderr == f"done-{i}\n".encode()
    assert time.monotonic() - start < 1.5  # they ran in parallel


def test_many_requests_in_flight(agent: Agent) -> None:
    ids = []
    for _ in range(100):
        req_id = agent.new_id()
        agent.send(req_id, EXEC, exec_fields(["sleep", "0.3"], stdin=b""))
        ids.append(req_id)
    for req_id in ids:
        assert finish(agent, req_id).code == 0


# --- files --------------------------------------------------------------------


def fs_write(
    agent: Agent, path: str, data: bytes, *, flags: int = 0, mode: int | None = None
) -> Frame:
    req_id = agent.new_id()
    fields: list[Field] = [(PATH, path), (FLAGS, flags)]
    if mode is not None:
        fields.append((MODE, mode))
    agent.send(req_id, FS_WRITE, fields)
    opened = agent.recv_for(req_id)
    if opened.type != OK:
        return opened
    for i in range(0, len(data), CHUNK):
        agent.send(req_id, FS_CHUNK, [(DATA, data[i : i + CHUNK])])
    agent.send(req_id, FS_END)
    return agent.recv_for(req_id)


def fs_read(agent: Agent, path: str) -> tuple[bytes, Frame]:
    req_id = agent.new_id()
    agent.send(req_id, FS_READ, [(PATH, path)])
    data = bytearray()
    while (frame := agent.recv_for(req_id)).type == FS_CHUNK:
        chunk = frame.get(DATA)
        assert 0 < len(chunk) <= CHUNK
        data += chunk
    return bytes(data), frame


def test_fs_write_read_round_trip(agent: Agent, tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 777)
    target = tmp_path / "a" / "b" / "file.bin"
    done = assert_ok(fs_write(agent, str(target), data, flags=1, mode=0o600))
    assert done.int(SIZE) == len(data)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    got, end = fs_read(agent, str(target))
    assert got == data and assert_ok(end).int(SIZE) == len(data)
    # append, and an empty file
    assert_ok(fs_write(agent, str(target), b"tail", flags=2))
    assert target.read_bytes() == data + b"tail"
    assert_ok(fs_write(agent, str(tmp_path / "empty"), b""))
    assert fs_read(agent, str(tmp_path / "empty"))[0] == b""


def test_fs_errors(agent: Agent, tmp_path: Path) -> None:
    assert_error(fs_read(agent, str(tmp_path / "missing"))[1], 2)
    assert_error(fs_read(agent, str(tmp_path))[1], 21)  # EISDIR
    os.mkfifo(tmp_path / "fifo")  # must neither hang the agent nor be streamed
    assert_error(fs_read(agent, str(tmp_path / "fifo"))[1], 22)
    assert_error(fs_write(agent, str(tmp_path / "fifo"), b"x"), 6)  # ENXIO: no reader
    assert_error(fs_write(agent, str(tmp_path / "no" / "parent"), b"x"), 2)
    assert_error(agent.call(FS_STAT, [(PATH, "relative/path")]), 22)
    # chunks after a failed write are discarded; the id is reusable afterwards
    req_id = agent.new_id()
    agent.send(req_id, FS_WRITE, [(PATH, str(tmp_path / "x"))])
    assert_ok(agent.recv_for(req_id))
    agent.send(req_id, FS_CHUNK, [(DATA, b"a"), (DATA, b"b")])  # duplicate field
    assert_error(agent.recv_for(req_id), 71)  # EPROTO
    agent.send(req_id, FS_CHUNK, [(DATA, b"c")])
    agent.send(req_id, FS_END)
    agent.send(req_id, PING)
    assert_ok(agent.recv_for(req_id))


def test_fs_read_does_not_block_others(agent: Agent, tmp_path: Path) -> None:
    blob = os.urandom(48 << 20)
    (tmp_path / "big").write_bytes(blob)
    read_id = agent.new_id()
    agent.send(read_id, FS_READ, [(PATH, str(tmp_path / "big"))])
    first = agent.recv_for(read_id)
    assert first.type == FS_CHUNK
    ping_id = agent.new_id()
    agent.send(ping_id, PING)
    assert_ok(agent.recv_for(ping_id))
    # the ping was answered while the read was still streaming
    assert all(f.type == FS_CHUNK for f in agent.pending[read_id])
    data = bytearray(first.get(DATA))
    while (frame := agent.recv_for(read_id)).type == FS_CHUNK:
        data += frame.get(DATA)
    assert assert_ok(frame).int(SIZE) == len(blob) and data == blob


def test_fs_metadata_ops(agent: Agent, tmp_path: Path) -> None:
    d = tmp_path / "d"
    assert_ok(agent.call(FS_MKDIR, [(PATH, str(d / "x" / "y")), (FLAGS, 1), (MODE, 0o700)]))
    assert stat.S_IMODE((d / "x" / "y").stat().st_mode) == 0o700
    assert_ok(agent.call(FS_MKDIR, [(PATH, str(d / "x" / "y")), (FLAGS, 1)]))  # exists: fine
    assert_error(agent.call(FS_MKDIR, [(PATH, str(d / "x"))]), 17)  # EEXIST
    assert_error(agent.call(FS_MKDIR, [(PATH, str(d / "p" / "q"))]), 2)
    (d / "f.txt").write_bytes(b"hello")
    (d / "link").symlink_to("f.txt")

    req_id = agent.new_id()
    agent.send(req_id, FS_LIST, [(PATH, str(d))])
    entries = {}
    while (frame := agent.recv_for(req_id)).type == DIRENT:
        entries[frame.get(NAME)] = frame
    assert_ok(frame)
    assert set(entries) == {b"x", b"f.txt", b"link"}
    assert entries[b"f.txt"].int(KIND) == 1 and entries[b"f.txt"].int(SIZE) == 5
    assert entries[b"x"].int(KIND) == 2 and entries[b"link"].int(KIND) == 3
    assert stat.S_ISREG(entries[b"f.txt"].int(MODE))
    assert entries[b"f.txt"].int(MTIME_NS) == (d / "f.txt").stat().st_mtime_ns

    st = assert_ok(agent.call(FS_STAT, [(PATH, str(d / "link"))]))
    assert st.int(KIND) == 1 and st.int(SIZE) == 5 and st.int(UID) == os.getuid()
    assert st.int(GID) == os.getgid()
    st = assert_ok(agent.call(FS_STAT, [(PATH, str(d / "link")), (FLAGS, 1)]))
    assert st.int(KIND) == 3
    assert_error(agent.call(FS_STAT, [(PATH, str(d / "nope"))]), 2)

    assert_ok(agent.call(FS_CHMOD, [(PATH, str(d / "f.txt")), (MODE, 0o640)]))
    assert stat.S_IMODE((d / "f.txt").stat().st_mode) == 0o640
    assert_ok(agent.call(FS_RENAME, [(PATH, str(d / "f.txt")), (PATH2, str(d / "g.txt"))]))
    assert (d / "g.txt").read_bytes() == b"hello" and not (d / "f.txt").exists()

    # remove: a symlink to a directory is unlinked, never followed
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    (d / "x" / "y" / "to-outside").symlink_to(outside)
    assert_error(agent.call(FS_REMOVE, [(PATH, str(d / "x"))]), 39)  # ENOTEMPTY
    assert_ok(agent.call(FS_REMOVE, [(PATH, str(d / "g.txt"))]))
    assert_ok(agent.call(FS_REMOVE, [(PATH, str(d)), (FLAGS, 1)]))
    assert not d.exists() and (outside / "keep").exists()
    assert_error(agent.call(FS_REMOVE, [(PATH, str(d)), (FLAGS, 1)]), 2)


# --- malformed input ------------------------------------------------------------


def test_bad_length_resyncs(agent: Agent) -> None:
    agent.sock.sendall(struct.pack(">I", 2) + b"garbage")
    agent.wait_log(b"invalid frame length")
    assert_ok(agent.call(PING))
    agent.sock.sendall(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 16)
    agent.wait_log(b"invalid frame length 1114113")
    assert_ok(agent.call(PING))


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (struct.pack(">BI", PATH, 100) + b"/short", b"overruns"),
        (b"\x0b\x00", b"truncated field header"),
        (struct.pack(">BI", FLAGS, 4) + b"\0\0\0\1", b"has length 4"),
        (encode_fields([(PATH, "/a"), (PATH, "/b")]), b"given twice"),
    ],
)
def test_malformed_fields(agent: Agent, payload: bytes, why: bytes) -> None:
    req_id = agent.new_id()
    agent.sock.sendall(struct.pack(">IIB", 5 + len(payload), req_id, FS_STAT) + payload)
    err = assert_error(agent.recv_for(req_id), 71)
    assert why in err.get(MESSAGE)
    assert_ok(agent.call(PING))


def test_unknown_type_missing_field_and_unknown_tag(agent: Agent) -> None:
    assert_error(agent.call(0x7E), 71)
    assert_error(agent.call(FS_STAT), 71)  # no PATH
    assert_error(agent.call(EXEC), 71)  # no ARG
    assert_ok(agent.call(PING, [(200, b"future field")]))  # unknown tags are ignored
    agent.send(0, PING)  # a request with id 0 gets no reply, only a LOG
    agent.wait_log(b"id 0")
    assert_ok(agent.call(PING))


def test_fs_end_cancels_a_read(agent: Agent, tmp_path: Path) -> None:
    # An endless file (/proc/kcore in a guest): a 1 TiB sparse file here. Without
    # the cancel the agent streams it for hours; with it, only what it had already
    # queued (its output high-water mark, a few MiB) follows the FS_END.
    endless = tmp_path / "endless"
    with open(endless, "wb") as f:
        f.truncate(1 << 40)
    req_id = agent.new_id()
    agent.send(req_id, FS_READ, [(PATH, str(endless))])
    assert agent.recv_for(req_id).type == FS_CHUNK
    agent.send(req_id, FS_END)
    chunks_after = 0
    while (frame := agent.recv_for(req_id)).type == FS_CHUNK:
        chunks_after += 1
        assert chunks_after < 64, "the agent kept streaming after FS_END"
    assert b"cancelled" in assert_error(frame, errno.ECANCELED).get(MESSAGE)
    # the id is free again and the agent serves on
    agent.send(req_id, PING)
    assert_ok(agent.recv_for(req_id))


# --- pseudo-terminals ----------------------------------------------------------

ROWS, COLS, RESIZE = 35, 36, 0x13


def test_pty_exec_one_output_sized_resized(agent: Agent) -> None:
    req_id = agent.new_id()
    fields = exec_fields(["sh", "-c", "read x; stty size; echo err >&2; exit 3"])
    agent.send(req_id, EXEC, [*fields, (ROWS, 7), (COLS, 91)])
    agent.send(req_id, STDIN, [(DATA, b"")])  # no EOF for a terminal: ignored
    agent.send(req_id, RESIZE, [(ROWS, 0), (COLS, 10)])  # bad size: ignored, logged
    agent.wait_log(b"RESIZE for id")
    agent.send(req_id, RESIZE, [(ROWS, 8), (COLS, 92)])
    agent.send(req_id, STDIN, [(DATA, b"go\n")])
    res = finish(agent, req_id)
    assert res.code == 3 and res.stderr == b""  # stderr is the terminal too
    assert res.stdout.replace(b"\r\n", b"\n").endswith(b"8 92\nerr\n")


@pytest.mark.parametrize("size", [[(ROWS, 0), (COLS, 80)], [(ROWS, 24)], [(COLS, 70000)]])
def test_pty_exec_with_a_bad_size_is_refused(agent: Agent, size: list[Field]) -> None:
    assert_error(agent.call(EXEC, [*exec_fields(["true"]), *size]), errno.EINVAL)


def test_resize_of_an_exec_without_a_terminal_is_ignored(agent: Agent) -> None:
    req_id = agent.new_id()
    agent.send(req_id, EXEC, exec_fields(["sh", "-c", "cat"], stdin=b""))
    agent.send(req_id, RESIZE, [(ROWS, 5), (COLS, 5)])
    agent.send(req_id, STDIN, [(DATA, b"x")])
    agent.send(req_id, STDIN, [(DATA, b"")])
    res = finish(agent, req_id)
    assert (res.stdout, res.code) == (b"x", 0)


# --- the relays of published ports -------------------------------------------


def test_the_udp_relay_frames_datagrams_both_ways(agent_binary: Path) -> None:
    # `--connect-udp PORT`: what a published UDP port runs in the guest, here
    # against a real UDP echo server on the host's 127.0.0.1.
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(10)
    port = echo.getsockname()[1]
    relay = subprocess.Popen(
        [str(agent_binary), "--connect-udp", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert relay.stdin is not None and relay.stdout is not None
    try:
        big = bytes(range(256)) * 200
        datagrams = [b"one", b"", big]
        # Several frames in one write, the last split across two.
        framed = b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)
        relay.stdin.write(framed[:-100])
        relay.stdin.flush()
        time.sleep(0.2)
        relay.stdin.write(framed[-100:])
        relay.stdin.flush()
        for expected in datagrams:
            data, peer = echo.recvfrom(65535)
            assert data == expected  # each datagram whole, in order
            echo.sendto(b"re:" + data, peer)
        for expected in datagrams:
            size = int.from_bytes(relay.stdout.read(2), "big")
            assert relay.stdout.read(size) == b"re:" + expected
        relay.stdin.close()  # the host's idle timeout: the relay ends
        assert relay.wait(timeout=10) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        echo.close()
    assert subprocess.run([str(agent_binary), "--connect-udp", "0"]).returncode == 2
