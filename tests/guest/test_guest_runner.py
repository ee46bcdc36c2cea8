"""The guest runner's pure parts, run on the host: finding the channel port,
applying a request's variables, how pytest starts through the bootstrap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_microsandbox.guest import runner
from pytest_microsandbox.guest.messages import CHANNEL_PORT_NAME, READY, Ready, Request
from pytest_microsandbox.plugin._zygote import GUEST_BOOTSTRAP


def test_the_guest_finds_the_channel_port_by_name(tmp_path):
    from pytest_microsandbox.guest.messages import CHANNEL_PORT_NAME as GUEST_NAME
    from pytest_microsandbox.runtime.qemu import CHANNEL_PORT_NAME

    assert GUEST_NAME == CHANNEL_PORT_NAME  # duplicated: keep them equal
    for entry, name in (("vport0p1", "msb.agent"), ("vport0p2", CHANNEL_PORT_NAME)):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name + "\n")
    assert runner.find_channel(str(tmp_path)) == "/dev/vport0p2"
    assert runner.find_channel(str(tmp_path / "missing")) is None


def test_apply_env_sets_only_valid_names(monkeypatch: pytest.MonkeyPatch):
    for name in ("MSB_T_A", "MSB_T_B"):
        monkeypatch.delenv(name, raising=False)
    runner.apply_env({"MSB_T_A": "1", "": "x", "MSB_T_B=C": "y", "MSB_T_B": "a\0b"})
    assert os.environ.get("MSB_T_A") == "1"
    assert os.environ.get("MSB_T_B") is None
    monkeypatch.delenv("MSB_T_A")


def test_the_bootstrap_starts_pytest_as_a_local_run_does(tmp_path: Path):
    """Run by path on the host (no channel port here): pytest starts with
    ``filterwarnings = error`` and ``-W error`` and fails only for the missing
    port. Started as ``python -m pytest_microsandbox.guest``, the package was
    imported first and pytest's "cannot be rewritten" warning failed the run.
    """
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    error\n")
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    control = tmp_path / "control"
    probe = (
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "seen = {}\n"
        "import _pytest.config\n"
        "main = _pytest.config.main\n"
        "def spy(*a, **kw):\n"
        "    seen['before'] = [m for m in sys.modules if m.startswith('pytest_micro')]\n"
        "    return main(*a, **kw)\n"
        "import pytest; pytest.main = spy\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'before', seen['before'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(GUEST_BOOTSTRAP), str(control), "-W", "error",
         "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "PytestAssertRewriteWarning" not in out and "RuntimeWarning" not in out, out
    assert f"no virtio-serial port named {CHANNEL_PORT_NAME} in this guest" in out, out
    # Nothing of the package before pytest.main; pytest exited with a usage error.
    assert "exit 4 before []" in out, out
    assert Ready.decode((control / READY).read_text()).errors == ("pytest exited 4",)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


def test_the_spare_takes_a_request_and_passes_its_line_on():
    channel_r, channel_w = os.pipe()
    taken_r, taken_w = os.pipe()
    request = Request("tests/test_a.py::test_x", "ab" * 16, True, {"A": "1"})
    os.write(channel_w, request.encode())
    try:
        server = runner._Server("/nonexistent", channel_r)
        assert server.take_request(taken_w) == request
        # The runner gets the line (without its newline) and then end of file.
        assert _read_all(taken_r) == request.encode().rstrip(b"\n")
    finally:
        os.close(channel_r)
        os.close(channel_w)


def test_the_spare_ignores_a_line_that_is_not_a_request_and_stops_at_eof():
    channel_r, channel_w = os.pipe()
    taken_r, taken_w = os.pipe()
    os.write(channel_w, b"not json\n")
    try:
        server = runner._Server("/nonexistent", channel_r)
        assert server.take_request(taken_w) is None
        # Passed on all the same: the runner decodes it, ignores it, forks another spare.
        assert _read_all(taken_r) == b"not json"
        os.close(channel_w)
        channel_w = -1
        taken_r, taken_w = os.pipe()
        assert server.take_request(taken_w) is None  # the host closed its side
        os.close(taken_w)  # (the spare exits, which closes it)
        assert _read_all(taken_r) == b""  # nothing passed on: the runner exits
    finally:
        os.close(channel_r)
        if channel_w >= 0:
            os.close(channel_w)


def test_the_spare_keeps_a_vm_request_to_itself():
    """Under vm isolation the runner is not woken: the seq it needs to answer
    for a spare that dies goes into their shared page, and the pipe stays open
    until the spare ends.
    """
    channel_r, channel_w = os.pipe()
    taken_r, taken_w = os.pipe()
    request = Request("tests/test_a.py::test_x", "cd" * 16, False, {"A": "1"})
    os.write(channel_w, request.encode())
    shared = runner._SpareState()
    try:
        server = runner._Server("/nonexistent", channel_r)
        assert server.take_request(taken_w, shared) == request
        assert shared.kept_seq() == request.seq
        assert not shared.answered()
        os.set_blocking(taken_r, False)
        with pytest.raises(BlockingIOError):  # open, and nothing in it
            os.read(taken_r, 1)
        shared.set_answered()
        assert shared.answered()
    finally:
        for fd in (channel_r, channel_w, taken_r, taken_w):
            os.close(fd)
        shared.close()


def test_a_vm_request_whose_seq_does_not_fit_is_passed_on():
    channel_r, channel_w = os.pipe()
    taken_r, taken_w = os.pipe()
    request = Request("tests/test_a.py::test_x", "e" * 300, False)
    os.write(channel_w, request.encode())
    shared = runner._SpareState()
    try:
        server = runner._Server("/nonexistent", channel_r)
        assert server.take_request(taken_w, shared) == request
        assert shared.kept_seq() is None
        assert _read_all(taken_r) == request.encode().rstrip(b"\n")
    finally:
        os.close(channel_r)
        os.close(channel_w)
        shared.close()


@pytest.mark.parametrize("fork", [True, False])
def test_the_spare_s_shortcut_matches_how_requests_are_written(fork: bool):
    # A process-isolation line is passed on before it is decoded when it holds
    # this field; the env cannot fake it (its values are strings).
    line = Request("t.py::x", "ab" * 16, fork, {"fork": "true"}).encode()
    assert (runner._FORK_FIELD in line) is fork
