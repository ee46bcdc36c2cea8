"""Every VM-touching ``microsandbox`` command through subprocess, the shells
driven through a real pseudo-terminal of the test (``terminal.Terminal``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from terminal import Terminal

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox
from pytest_microsandbox.snapshots import Snapshot

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

CLI = str(Path(sys.executable).parent / "microsandbox")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"TERM": "xterm"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def saved() -> Iterator[str]:
    """A snapshot of a VM with a file written in it; removed afterwards."""
    name = f"test-cli-{os.getpid()}-{int(time.time())}"
    with SyncSandbox.create(SandboxConfig(name="test-cli")) as sb:
        sb.fs().write("/root/evidence.txt", "written before the snapshot\n")
        sb.snapshot(name)
    yield name
    Snapshot.remove(name)


def test_run_returns_the_commands_exit_code_and_output():
    result = cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_exec_runs_in_a_clone_of_the_snapshot(saved: str):
    result = cli("exec", saved, "--", "cat", "/root/evidence.txt")
    assert (result.returncode, result.stdout) == (0, "written before the snapshot\n")
    # A clone is thrown away: what a command writes is not in the next one.
    assert cli("exec", saved, "--", "sh", "-c", "echo x > /root/evidence.txt").returncode == 0
    again = cli("exec", saved, "--", "cat", "/root/evidence.txt")
    assert again.stdout == "written before the snapshot\n"
    killed = cli("exec", saved, "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15
    missing = cli("exec", saved, "--", "no-such-tool")
    assert missing.returncode == 1 and "command not found" in missing.stderr


def test_snapshot_restore_runs_a_command_and_ls_lists_it(saved: str):
    result = cli("snapshot", "restore", saved, "--", "cat", "/root/evidence.txt")
    assert (result.returncode, result.stdout) == (0, "written before the snapshot\n")
    # Without a command: a shell (here reading a pipe), its exit status returned.
    shell = subprocess.run(
        [CLI, "snapshot", "restore", saved],
        input="cat /root/evidence.txt; exit 2\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert shell.returncode == 2 and "written before the snapshot" in shell.stdout
    listed = cli("snapshot", "ls")
    assert listed.returncode == 0
    assert any(line.split()[:2] == [saved, "snapshot"] for line in listed.stdout.splitlines())


def test_shell_through_a_terminal_size_resize_ctrl_c_exit_status(saved: str):
    term = Terminal([CLI, "shell", saved], ENV, rows=30, cols=100)
    try:
        # Typed before the shell is up: kept, as a terminal keeps type-ahead.
        term.type(b"stty size; cat /root/evidence.txt\n")
        term.expect(b"30 100")
        term.expect(b"written before the snapshot")
        term.resize(40, 120)  # our window changed: the guest's terminal follows
        time.sleep(1)
        term.type(b"stty size\n")
        term.expect(b"40 120")
        term.type(b"sleep 60\n")
        time.sleep(1)
        start = time.monotonic()
        term.type(b"\x03")  # Ctrl-C: the guest's foreground job gets SIGINT
        term.type(b"echo status=$?\n")
        term.expect(b"status=130", timeout=50)
        assert time.monotonic() - start < 50  # the sleep did not run out
        term.type(b"exit 5\n")
        assert term.wait() == 5
    finally:
        term.close()


def test_run_without_a_command_opens_a_shell():
    term = Terminal([CLI, "run"], ENV)
    try:
        term.type(b"echo $((6 * 7))\n")
        term.expect(b"42")
        term.type(b"exit\n")
        assert term.wait() == 0
    finally:
        term.close()


def test_shell_reads_a_script_from_a_pipe(saved: str):
    # No terminal on our side: the end of the input ends the guest's shell.
    result = subprocess.run(
        [CLI, "shell", saved],
        input="cat /root/evidence.txt\nexit 6\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 6, result.stderr
    assert "written before the snapshot" in result.stdout
    eof = subprocess.run(
        [CLI, "shell", saved], input=b"true\n", capture_output=True, timeout=300, env=ENV
    )
    assert eof.returncode == 0, eof.stderr


@pytest.fixture(scope="module")
def detached() -> Iterator[str]:
    """A running detached sandbox with a file written in it; removed afterwards."""
    name = f"cli-det-{os.getpid()}"
    sb = SyncSandbox.create(SandboxConfig(name=name), detached=True)
    try:
        sb.fs().write("/root/live.txt", "in the running sandbox\n")
        yield name
    finally:
        sb.remove()


def test_exec_runs_in_the_running_detached_sandbox(detached: str):
    result = cli("exec", detached, "--", "cat", "/root/live.txt")
    assert (result.returncode, result.stdout) == (0, "in the running sandbox\n"), result.stderr
    # The sandbox itself, not a clone: a write stays for the next command.
    assert cli("exec", detached, "--", "sh", "-c", "echo 2 > /root/two").returncode == 0
    again = cli("exec", detached, "--", "sh", "-c", "cat /root/two; exit 4")
    assert (again.returncode, again.stdout) == (4, "2\n")
    fed = subprocess.run(
        [CLI, "exec", "-i", detached, "--", "wc", "-c"],
        input="12345",
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert (fed.returncode, fed.stdout.strip()) == (0, "5"), fed.stderr


def test_shell_opens_the_running_detached_sandbox_through_a_terminal(detached: str):
    term = Terminal([CLI, "shell", detached], ENV, rows=30, cols=100)
    try:
        term.type(b"stty size; cat /root/live.txt; hostname\n")
        term.expect(b"30 100")
        term.expect(b"in the running sandbox")
        term.expect(detached.encode())
        term.resize(40, 120)
        time.sleep(1)
        term.type(b"stty size\n")
        term.expect(b"40 120")
        term.type(b"sleep 60\n")
        time.sleep(1)
        term.type(b"\x03")
        term.type(b"echo status=$?\n")
        term.expect(b"status=130", timeout=50)
        term.type(b"exit 5\n")
        assert term.wait() == 5
    finally:
        term.close()
    # Leaving the shell leaves the sandbox running.
    assert cli("exec", detached, "--", "true").returncode == 0


def test_exec_names_what_it_looked_for_when_name_is_unknown():
    result = cli("exec", "no-such-sandbox-or-snapshot", "--", "true")
    assert result.returncode == 1
    assert "microsandbox ls" in result.stderr and "microsandbox snapshot ls" in result.stderr


def test_an_attached_sandbox_of_another_process_is_refused_with_the_fix():
    with SyncSandbox.create(SandboxConfig(name=f"cli-att-{os.getpid()}"), register=True) as sb:
        result = cli("shell", sb.name)
        assert result.returncode == 1
        assert "attached to process" in result.stderr and "detached=True" in result.stderr
