"""The guest runner's pure parts, run on the host: finding the channel port,
applying a request's variables, its command line and what it imports.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pytest_microsandbox.guest import runner


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


def test_the_runner_starts_as_a_module_and_imports_nothing_of_the_host_side():
    # What `python -m pytest_microsandbox.guest` loads before pytest.main (which
    # loads the plugin through its entry point, as on the host): no runtime,
    # snapshots or plugin (pydantic, anyio), which would cost seconds under emulation.
    code = (
        "import runpy, sys\n"
        "sys.argv = ['x']\n"
        "try:\n"
        "    runpy.run_module('pytest_microsandbox.guest', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "ours = sorted(m for m in sys.modules if m.startswith('pytest_microsandbox.'))\n"
        "print('loaded', ours, 'pydantic' in sys.modules, 'anyio' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: python -m pytest_microsandbox.guest CONTROL [pytest args]" in out
    assert "exit 2" in out
    loaded = out.split("loaded ", 1)[1]
    assert loaded.strip() == (
        "['pytest_microsandbox._extensions', 'pytest_microsandbox._lazy', "
        "'pytest_microsandbox.guest', 'pytest_microsandbox.guest.messages', "
        "'pytest_microsandbox.guest.runner'] False False"
    )
