"""A detached sandbox's streamed execs, terminals, snapshots and forks, relayed
by its supervisor (``runtime/_remote_stream.py``), through the blocking API.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.runtime import (
    CommandNotFoundError,
    Exited,
    SandboxConfig,
    Stderr,
    Stdout,
    SyncRemoteSandbox,
    SyncSandbox,
)
from pytest_microsandbox.runtime._remote_stream import STREAM_WINDOW
from pytest_microsandbox.snapshots import Snapshot

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]


@pytest.fixture(scope="module")
def remote() -> Iterator[SyncRemoteSandbox]:
    sb = SyncSandbox.create(SandboxConfig(name=f"rs-{secrets.token_hex(4)}"), detached=True)
    assert isinstance(sb, SyncRemoteSandbox)
    try:
        yield sb
    finally:
        sb.remove()


def test_exec_stream_relays_output_stdin_and_the_exit(remote: SyncRemoteSandbox) -> None:
    handle = remote.exec_stream("sh", ["-c", "cat; echo err >&2; exit 7"], stdin=True)
    handle.write_stdin(b"typed in\n")
    handle.close_stdin()
    events = list(handle)
    out = b"".join(e.data for e in events if isinstance(e, Stdout))
    err = b"".join(e.data for e in events if isinstance(e, Stderr))
    assert (out, err) == (b"typed in\n", b"err\n")
    assert events[-1] == Exited(7, None, False)


def test_exec_stream_output_larger_than_the_window_arrives_whole(
    remote: SyncRemoteSandbox,
) -> None:
    size = 4 * STREAM_WINDOW + 123
    out = remote.exec_stream("head", ["-c", str(size), "/dev/zero"]).wait()
    assert (out.exit_code, len(out.stdout), out.stdout.count(0)) == (0, size, size)
    with pytest.raises(CommandNotFoundError):
        remote.exec_stream("no-such-program")


def test_pty_session_through_the_supervisor(remote: SyncRemoteSandbox) -> None:
    with remote.pty("/bin/sh", rows=30, cols=100) as session:
        session.write("stty size; exit 3\n")
        screen = b""
        while data := session.read():
            screen += data
        assert b"30 100" in screen
        assert session.wait() == 3 and session.returncode == 3
    with remote.pty("/bin/sh") as session:
        session.resize(40, 120)
        session.write("stty size; sleep 100\n")
        screen = b""
        while b"40 120" not in screen:
            screen += session.read()
        session.write(b"\x03")  # Ctrl-C ends the sleep, not the shell
        session.write("exit 5\n")
        assert session.wait() == 5
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        remote.pty("/bin/sh", rows=0)


def test_snapshot_and_fork_of_a_detached_sandbox(remote: SyncRemoteSandbox) -> None:
    remote.fs().write("/root/mark", "before\n")
    name = f"rs-snap-{secrets.token_hex(4)}"
    path = remote.snapshot(name)
    try:
        assert isinstance(path, Path) and path.is_dir()
        child = remote.fork(sandbox_name=f"{remote.name}-child")
        try:
            assert child.name == f"{remote.name}-child" and child.pid != remote.pid
            child.fs().write("/root/mark", "child\n")
            assert remote.fs().read_text("/root/mark") == "before\n"
            assert child.fs().read_text("/root/mark") == "child\n"
        finally:
            child.remove()
        with SyncSandbox.restore(name) as restored:
            assert restored.fs().read_text("/root/mark") == "before\n"
    finally:
        Snapshot.remove(name)
