"""The stream sessions of a detached sandbox's control socket
(``runtime/_remote_stream.py``) against the real agent as a host process
(HostProcessBackend) served by the supervisor's real server on a unix socket
of the test: no VM. The window, the validation of both sides, the client
classes. Through a VM and a supervisor process: test_remote_stream_vm.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from pytest_microsandbox.runtime import (
    CommandNotFoundError,
    Exited,
    OutputLimitError,
    ProtocolError,
    Sandbox,
    SandboxConfig,
    SandboxError,
    Stdout,
)
from pytest_microsandbox.runtime._remote import RemoteSandbox, read_line, write_line
from pytest_microsandbox.runtime._remote_stream import (
    PIECE,
    STREAM_LINE,
    STREAM_WINDOW,
    _exit_of,
    _piece,
)
from pytest_microsandbox.runtime._state import SandboxRecord, SandboxStatus, StateStore
from pytest_microsandbox.runtime._supervisor import _Server
from pytest_microsandbox.runtime.hostproc import HostProcessBackend

TOKEN = "t" * 64


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Sandbox, RemoteSandbox]]:
    """A host-process sandbox behind the supervisor's server, and a client of it."""
    config = SandboxConfig(name="relay", cache_dir=tmp_path)
    sock = tmp_path / "c.sock"
    async with await Sandbox.create(config, backend=HostProcessBackend()) as sb:
        listener = await anyio.create_unix_listener(sock, mode=0o600)
        record = SandboxRecord(
            "relay", SandboxStatus.RUNNING, time.time(), config.to_json(), os.getpid(), 0,
            control=str(sock), detached=True,
        )  # fmt: skip
        remote = RemoteSandbox(StateStore(tmp_path), record, TOKEN)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _Server(sb, TOKEN, tg).handle)
            try:
                yield sb, remote
            finally:
                tg.cancel_scope.cancel()
        await listener.aclose()


def run(tmp_path: Path, body: Callable[[Sandbox, RemoteSandbox], Awaitable[None]]) -> None:
    async def main() -> None:
        async with served(tmp_path) as (sb, remote):
            with anyio.fail_after(60):
                await body(sb, remote)

    anyio.run(main)


async def _raw(
    remote: RemoteSandbox, request: dict[str, object]
) -> tuple[anyio.abc.SocketStream, BufferedByteReceiveStream, dict[str, object]]:
    stream = await remote._connect()
    await write_line(stream, {"token": TOKEN, **request})
    reader = BufferedByteReceiveStream(stream)
    return stream, reader, await read_line(reader, STREAM_LINE)


def test_exec_stream_pty_and_their_errors_through_the_server(tmp_path: Path) -> None:
    async def body(sb: Sandbox, remote: RemoteSandbox) -> None:
        async with await remote.exec_stream("sh", ["-c", "cat; exit 3"], stdin=True) as handle:
            await handle.write_stdin(b"x" * (PIECE * 2 + 5))  # split in pieces
            await handle.close_stdin()
            out = await handle.wait()
        assert (out.exit_code, len(out.stdout)) == (3, PIECE * 2 + 5)
        with pytest.raises(CommandNotFoundError):
            await remote.exec_stream("no-such-program-here")
        async with await remote.pty("sh", env={"PS1": "$ "}, rows=11, cols=22) as term:
            await term.write("stty size; exit 2\n")
            screen = b""
            while data := await term.read():
                screen += data
            assert b"11 22" in screen and await term.wait() == 2
        async with await remote.exec_stream("sleep", ["100"]) as handle:
            await handle.kill()
            events = [e async for e in handle]
        assert events[-1] == Exited(None, 9, False)

    run(tmp_path, body)


def test_the_supervisor_sends_no_more_than_the_window_until_acked(tmp_path: Path) -> None:
    size = 4 * STREAM_WINDOW

    async def body(sb: Sandbox, remote: RemoteSandbox) -> None:
        args = ["-c", str(size), "/dev/zero"]
        stream, reader, answer = await _raw(
            remote, {"op": "exec_stream", "cmd": "head", "args": args}
        )
        assert answer["ok"] is True
        got = 0
        with anyio.move_on_after(2):  # nothing acked: it stops at the window
            while True:
                message = await read_line(reader, STREAM_LINE)
                got += len(base64.b64decode(message["o"]))
        assert STREAM_WINDOW <= got < STREAM_WINDOW + PIECE
        await write_line(stream, {"ack": got})
        while "x" not in (message := await read_line(reader, STREAM_LINE)):
            data = base64.b64decode(message["o"])
            got += len(data)
            with contextlib.suppress(anyio.BrokenResourceError):  # it may be done already
                await write_line(stream, {"ack": len(data)})
        assert got == size and message["x"] == {
            "exit_code": 0, "term_signal": None, "timed_out": False
        }  # fmt: skip
        await stream.aclose()

    run(tmp_path, body)


@pytest.mark.parametrize(
    "bad",
    [
        {"ack": 1 << 40},  # more than was sent
        {"ack": -1},
        {"i": "not base64!"},
        {"i": base64.b64encode(b"x" * (PIECE + 1)).decode()},
        {"sig": 1000},
        {"size": [0, 80]},  # not a terminal, and a bad size
        {"what": 1},
        {"i": "", "eof": True},  # two keys
    ],
)
def test_a_client_breaking_the_session_is_cut_off(tmp_path: Path, bad: dict[str, object]) -> None:
    async def body(sb: Sandbox, remote: RemoteSandbox) -> None:
        request = {"op": "exec_stream", "cmd": "sleep", "args": ["100"], "stdin": True}
        stream, reader, answer = await _raw(remote, request)
        assert answer["ok"] is True
        await write_line(stream, bad)
        with pytest.raises((anyio.EndOfStream, anyio.IncompleteRead)):
            await read_line(reader, STREAM_LINE)
        await stream.aclose()
        # The command died with the session: no stream is left on the sandbox.
        with anyio.fail_after(10):
            while any(h._process.returncode is None for h in sb._streams):
                await anyio.sleep(0.05)

    run(tmp_path, body)


def test_bad_stream_requests_and_tokens_are_answered_with_errors(tmp_path: Path) -> None:
    async def body(sb: Sandbox, remote: RemoteSandbox) -> None:
        for request in (
            {"op": "exec_stream", "cmd": 5},
            {"op": "pty", "cmd": "sh", "args": "not a list"},
            {"op": "pty", "cmd": "sh", "env": {"A": 1}},
            {"op": "exec_stream", "cmd": "true", "stdin": "yes"},
        ):
            stream, _, answer = await _raw(remote, request)
            assert (answer["ok"], answer["error"]) == (False, "ProtocolError"), request
            await stream.aclose()
        stream = await remote._connect()
        await write_line(stream, {"token": "wrong", "op": "pty", "cmd": "sh"})
        answer = await read_line(BufferedByteReceiveStream(stream))
        assert answer == {"ok": False, "error": "SandboxError", "message": "wrong or missing token"}
        await stream.aclose()

    run(tmp_path, body)


def test_the_client_validates_what_the_supervisor_sends() -> None:
    assert _piece({"o": base64.b64encode(b"abc").decode()}, "o") == b"abc"
    for bad in ({"o": "%%%"}, {"o": 5}, {"o": base64.b64encode(b"x" * (PIECE + 1)).decode()}):
        with pytest.raises(ProtocolError):
            _piece(bad, "o")
    assert _exit_of({"x": {"exit_code": 1, "term_signal": None, "timed_out": False}}) == Exited(
        1, None, False
    )
    for exit_ in (
        [0, None, False],
        {"exit_code": None, "term_signal": None, "timed_out": False},
        {"exit_code": 1, "term_signal": 9, "timed_out": False},
        {"exit_code": "0", "term_signal": None, "timed_out": False},
        {"exit_code": 1 << 40, "term_signal": None, "timed_out": False},
        {"exit_code": 0, "term_signal": None, "timed_out": 1},
    ):
        with pytest.raises(ProtocolError):
            _exit_of({"x": exit_})
    assert issubclass(ProtocolError, SandboxError) and json.dumps(Stdout.__name__)


def test_remote_exec_output_cap_is_applied_and_its_error_kept(tmp_path: Path) -> None:
    async def body(sb: Sandbox, remote: RemoteSandbox) -> None:
        cut = await remote.exec("head", ["-c", "100", "/dev/zero"], max_output=10,
                                on_output_limit="truncate")  # fmt: skip
        assert (len(cut.stdout), cut.truncated) == (10, True)
        with pytest.raises(OutputLimitError) as info:
            await remote.exec("head", ["-c", "100", "/dev/zero"], max_output=10)
        assert info.value.limit == 10
        async with await remote.exec_stream("head", ["-c", "100", "/dev/zero"]) as handle:
            with pytest.raises(OutputLimitError):
                await handle.wait(max_output=10)

    run(tmp_path, body)


@pytest.mark.parametrize(
    "lines",
    [
        [b'{"zzz": 1}'],  # an unknown message
        [b'{"o": "AAAA", "e": "AAAA"}'],  # two at once
        [b"[1, 2]"],  # not an object
        [b"{" + b" " * STREAM_LINE + b"}"],  # past the line bound
        [b'{"x": {"exit_code": 0, "term_signal": 9, "timed_out": false}}'],
    ],
)
def test_a_supervisor_breaking_the_session_raises_protocol_error(
    tmp_path: Path, lines: list[bytes]
) -> None:
    """A fake supervisor: the client's own checks, whatever the server says."""

    async def fake(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await read_line(BufferedByteReceiveStream(stream))
            await stream.send(b'{"ok": true, "result": {"pid": 7}}\n')
            for line in lines:
                await stream.send(line + b"\n")
            await anyio.sleep(5)

    async def main() -> None:
        sock = tmp_path / "f.sock"
        listener = await anyio.create_unix_listener(sock)
        config = SandboxConfig(name="fake", cache_dir=tmp_path)
        record = SandboxRecord(
            "fake", SandboxStatus.RUNNING, time.time(), config.to_json(), os.getpid(), 0,
            control=str(sock), detached=True,
        )  # fmt: skip
        remote = RemoteSandbox(StateStore(tmp_path), record, TOKEN)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, fake)
            with anyio.fail_after(10):
                term = await remote.pty("sh")
                assert term.pid == 7
                with pytest.raises(ProtocolError):
                    await term.read()
                await term.aclose()
            tg.cancel_scope.cancel()
        await listener.aclose()

    anyio.run(main)
