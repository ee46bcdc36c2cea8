"""What a microVM buys a test suite: root, a changeable system, no leaks to the host.

Run with the README's main-job command. Each test gets its own VM; nothing it
does reaches the host or the next test.
"""

from __future__ import annotations

import sys
from pathlib import Path


def test_runs_as_root_and_edits_etc_hosts(sandbox):
    sandbox.shell("echo 10.0.0.9 db.internal >> /etc/hosts")
    assert sandbox.shell("id -u").stdout_text == "0\n"
    assert "db.internal" in sandbox.fs().read_text("/etc/hosts")
    # The host's /etc/hosts is untouched.
    assert "db.internal" not in Path("/etc/hosts").read_text()


def test_may_delete_system_files(sandbox):
    out = sandbox.shell("rm -rf /usr/share/zoneinfo /etc/passwd && ls /etc/passwd")
    assert out.exit_code != 0
    assert Path("/etc/passwd").exists()


def test_same_python_and_venv_as_the_host(sandbox):
    out = sandbox.exec(sys.executable, ["-c", "import sys, pytest; print(sys.version)"])
    assert out.stdout_text.strip() == sys.version


def test_has_no_network(sandbox):
    # The guest has no route out: its only NIC is unconfigured and plugged into nothing.
    code = "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)"
    out = sandbox.exec(sys.executable, ["-c", code])
    assert out.exit_code != 0
    assert "unreachable" in out.stderr_text.lower() or "error" in out.stderr_text.lower()


def test_a_runaway_command_is_killed(sandbox):
    import pytest

    from pytest_microsandbox.runtime import ExecTimeoutError

    with pytest.raises(ExecTimeoutError):
        sandbox.shell("while :; do :; done", timeout=1)
    assert sandbox.shell("echo still alive").stdout_text == "still alive\n"
