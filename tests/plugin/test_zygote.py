"""Zygotes without a VM: the guest runner's environment, the per-test variables,
the zygote key and its hook, the build lock. (Builds: test_zygote_vm.py.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pytest_microsandbox.guest.messages import GUEST_ENV
from pytest_microsandbox.plugin import _zygote
from pytest_microsandbox.plugin._options import marker_spec, resolve_settings
from pytest_microsandbox.plugin._runner import HostRunner
from pytest_microsandbox.plugin._stats import Stats

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytester moves $HOME: keep the real cache (kernel, images) visible to inner runs.
    from pytest_microsandbox.runtime.paths import cache_dir

    monkeypatch.setenv("MICROSANDBOX_CACHE_DIR", str(cache_dir()))


def _mark(**kw):
    return pytest.mark.sandbox(**kw).mark


def test_guest_env_is_the_allow_list_only():
    host = {
        "PATH": "/venv/bin:/bin",
        "VIRTUAL_ENV": "/venv",
        "HOME": "/home/me",
        "USER": "me",
        "SECRET_TOKEN": "xyz",
        "AWS_SECRET_ACCESS_KEY": "k",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": "/src",
        "PYTHON_KEYRING_PASSWORD": "pw",  # a credential under an allowed prefix
        "PYTEST_PLUGINS": "myplugin",
        "PYTEST_ADDOPTS": "-n 2",  # the host applied it already
        "PYTEST_XDIST_WORKER": "gw1",
        "PYTEST_CURRENT_TEST": "t.py::x (call)",
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_TOKEN": "ghp_x",
        "NO_COLOR": "1",
        "TERM": "xterm",
        "COLUMNS": "120",  # per test: a resize must not rebuild the zygote
        "OLDPWD": "/",
        "ZERO": "a\0b",
    }
    assert _zygote.guest_env(host) == {
        "PATH": "/venv/bin:/bin",
        "VIRTUAL_ENV": "/venv",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": "/src",
        "PYTEST_PLUGINS": "myplugin",
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "NO_COLOR": "1",
        "TERM": "xterm",
        GUEST_ENV: "1",
    }


def test_guest_env_activates_the_guests_venv():
    # The host ran .venv/bin/python -m pytest without activating the venv: its
    # PATH names a pyenv shim the guest does not have, and no venv.
    host = {"PATH": "/root/.pyenv/shims:/usr/bin:/venv/bin:/bin"}
    env = _zygote.guest_env(host, Path("/venv"))
    assert env["PATH"] == "/venv/bin:/root/.pyenv/shims:/usr/bin:/bin"
    assert env["VIRTUAL_ENV"] == "/venv"
    # No PATH on the host: the guest's default, after the venv.
    assert _zygote.guest_env({}, Path("/venv"))["PATH"].startswith("/venv/bin:/usr/local/sbin:")
    # No venv (Python outside one): the host's PATH as it is.
    assert _zygote.guest_env(host)["PATH"] == host["PATH"]
    assert "VIRTUAL_ENV" not in _zygote.guest_env(host)


def test_ready_timeout_reads_its_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(_zygote.READY_TIMEOUT_ENV, raising=False)
    assert _zygote.ready_timeout() == 600
    monkeypatch.setenv(_zygote.READY_TIMEOUT_ENV, "15")
    assert _zygote.ready_timeout() == 15
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(_zygote.READY_TIMEOUT_ENV, bad)
        with pytest.raises(_zygote.ZygoteError, match=_zygote.READY_TIMEOUT_ENV):
            _zygote.ready_timeout()


def test_guest_lines_in_a_message_are_printable_and_bounded():
    text = "ok\n\x1b]0;owned\x07\x1b[2Jclear\n" + "x" * 10_000
    lines = _zygote._last_lines(text, 2).splitlines()
    assert lines[0] == "]0;owned[2Jclear"  # no escape or bell reaches the terminal
    assert len(lines[1]) == 500 and lines[1].endswith("…")


def test_request_env_forwards_named_variables_and_sets_values():
    host = {"COLUMNS": "120", "SECRET_TOKEN": "xyz", "DB": "host-db", "LINES": "40"}
    entries = [("SECRET_TOKEN", None), ("DB", "ini-db"), ("DB", None), ("MISSING", None)]
    assert _zygote.request_env(host, entries) == {
        "COLUMNS": "120",
        "LINES": "40",
        "SECRET_TOKEN": "xyz",
        "DB": "host-db",  # a later entry wins
    }
    # A name the host does not have unsets what an earlier entry set.
    assert _zygote.request_env({}, [("A", "1"), ("A", None)]) == {}
    assert _zygote.request_env({"A": "h"}, [("A", None), ("A", "marker")]) == {"A": "marker"}


def _zygote_plan(pytester: pytest.Pytester) -> _zygote.GuestPlan:
    config = pytester.parseconfigure()
    runner = HostRunner(config, resolve_settings(config), Stats())
    runner.set_files([str(pytester.path / "test_a.py")])
    return runner.plan_for(marker_spec(_mark(), runner.settings, "t"))


def test_zygote_key_hook_reaches_the_plan_and_renames_the_zygote(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    import anyio

    async def fixed_identity(config: object) -> str:
        return "boot"  # no kernel, image or accelerator probe needed

    monkeypatch.setattr(_zygote, "_boot_identity", fixed_identity)
    pytester.makepyfile(test_a="import pytest\n@pytest.mark.sandbox\ndef test_x(): pass\n")
    plain = _zygote_plan(pytester)
    assert plain.extra_key == ""  # no implementation: the key is what it always was

    pytester.makeconftest(
        """
        def pytest_microsandbox_zygote_key(config):
            return (config.rootpath / "data.txt").read_text()
        """
    )
    pytester.makepyfile(
        other_plugin="def pytest_microsandbox_zygote_key(config):\n    return None\n"
    )
    pytester.syspathinsert()
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p other_plugin")
    (pytester.path / "data.txt").write_text("v1")
    v1 = _zygote_plan(pytester)
    assert json.loads(v1.extra_key) == ["v1"]  # None adds nothing
    (pytester.path / "data.txt").write_text("v2")
    v2 = _zygote_plan(pytester)
    assert json.loads(v2.extra_key) == ["v2"]
    # The conftest is a watched file, so compare v1/v2, which differ only by the hook.
    assert v1.watched == v2.watched
    names = [anyio.run(_zygote.zygote_name, plan) for plan in (v1, v2, v2)]
    assert names[0] != names[1] == names[2]


def test_zygote_key_hook_must_return_a_string(pytester: pytest.Pytester):
    pytester.makeconftest("def pytest_microsandbox_zygote_key(config):\n    return 42\n")
    pytester.makepyfile(test_a="import pytest\n@pytest.mark.sandbox\ndef test_x(): pass\n")
    with pytest.raises(pytest.UsageError, match="must return a str or None, got int: 42"):
        _zygote_plan(pytester)


def test_zygote_build_holds_its_entry_lock(tmp_path, monkeypatch: pytest.MonkeyPatch):
    import anyio

    from pytest_microsandbox.runtime import SandboxConfig
    from pytest_microsandbox.runtime._locks import EntryLock
    from pytest_microsandbox.snapshots import _store

    lock_path = _store.named_root(tmp_path) / "zygote-abc.lock"
    seen = []

    async def name(plan: object) -> str:
        return "zygote-abc"

    async def build(*args: object) -> None:
        seen.append(not EntryLock(lock_path, "probe").try_acquire())  # held by the builder

    monkeypatch.setattr(_zygote, "zygote_name", name)

    async def missing(name: str, cache: object) -> bool:
        return False

    monkeypatch.setattr(_zygote, "_exists", missing)
    monkeypatch.setattr(_zygote, "build_zygote", build)
    config = SandboxConfig(name="zygote", cache_dir=tmp_path)
    plan = _zygote.GuestPlan(config=config, cwd="/", args=(), env={}, watched=())
    assert anyio.run(_zygote.ensure_zygote, plan, "b")[0] == "zygote-abc"
    assert seen == [True]
    # No entry was published: the prune after the build swept the lock file.
    assert not lock_path.exists()


def test_the_base_runner_is_told_which_plugins_its_run_leaves_out():
    from pytest_microsandbox.runtime import SandboxConfig

    config = SandboxConfig(name="zygote")
    args = ("-o", "addopts=", "-p", " no:cacheprovider", "-p", "xdist", "-p", "no:x", "t.py")
    plan = _zygote.GuestPlan(config=config, cwd="/p", args=args, env={}, watched=())
    command = plan.base_command()
    assert f"--base {_zygote.CONTROL_DIR} -pno:cacheprovider -pno:x;" in command
    plain = _zygote.GuestPlan(config=config, cwd="/p", args=("t.py",), env={}, watched=())
    assert "-pno:" not in plain.base_command()


def test_a_runner_that_cannot_start_writes_its_exit_and_error_at_once(tmp_path):
    """Every start failure (here: its directory is missing, as in a directory
    image) ends in the exit marker and the log, so the host stops waiting at
    once; before, a failed `cd` outside the detached script left neither.
    """
    import subprocess
    import time

    control = tmp_path / "control"
    command = _zygote.runner_command(str(tmp_path / "missing"), ["x"], control=str(control))
    assert subprocess.run(["sh", "-c", command], timeout=30).returncode == 0
    deadline = time.monotonic() + 30
    while not (control / "exited").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # No wait here: the marker appears whole (written aside, then renamed), so a
    # host that polls never reads it empty. CI once did, with an empty status.
    assert (control / "exited").read_text().strip() not in ("", "0")
    assert "missing" in (control / "log").read_text()


def test_the_exit_marker_carries_the_runner_status_the_moment_it_exists(tmp_path):
    import subprocess
    import time

    for attempt in range(5):
        # A control dir each: a previous attempt's outer shell may still be ending.
        control = tmp_path / f"control{attempt}"
        command = _zygote.runner_command(str(tmp_path), ["x"], control=str(control))
        # The bootstrap cannot run with argument "x": pretend a runner that exits 3.
        command = command.replace(str(_zygote.GUEST_BOOTSTRAP), '-c "raise SystemExit(3)"')
        assert subprocess.run(["sh", "-c", command], timeout=30).returncode == 0
        deadline = time.monotonic() + 60
        while not (control / "exited").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert (control / "exited").read_text().strip() == "3"


def test_a_directory_image_is_refused_before_any_vm(tmp_path):
    import anyio

    from pytest_microsandbox.runtime import SandboxConfig

    config = SandboxConfig(name="zygote", image=str(tmp_path), cache_dir=tmp_path)
    plan = _zygote.GuestPlan(config=config, cwd="/", args=(), env={}, watched=())
    with pytest.raises(_zygote.ZygoteError, match=r"needs\s+SandboxConfig\(host_python=True\)"):
        anyio.run(_zygote.ensure_zygote, plan, "b")


def test_an_image_over_a_system_python_is_refused_before_any_vm(
    tmp_path, monkeypatch: pytest.MonkeyPatch
):
    import anyio

    from pytest_microsandbox.runtime import SandboxConfig

    monkeypatch.setattr(sys, "base_prefix", "/usr")
    # Refused before any pull: nothing listens on this port.
    config = SandboxConfig(
        name="zygote", image="127.0.0.1:9/x/y:1", host_python=True, cache_dir=tmp_path
    )
    plan = _zygote.GuestPlan(config=config, cwd="/", args=(), env={}, watched=())
    with pytest.raises(_zygote.ZygoteError) as info:
        anyio.run(_zygote.ensure_zygote, plan, "b")
    message = str(info.value)
    assert "hide the image's /usr" in message and "image='host'" in message


def test_a_failed_build_is_recorded_for_its_run_only(tmp_path, monkeypatch: pytest.MonkeyPatch):
    import anyio

    from pytest_microsandbox.runtime import SandboxConfig

    calls = []

    async def name(plan: object) -> str:
        return "zygote-abc"

    async def missing(name: str, cache: object) -> bool:
        return False

    async def build(*args: object) -> None:
        calls.append(args)
        raise _zygote.ZygoteError(f"the real cause #{len(calls)}")

    monkeypatch.setattr(_zygote, "zygote_name", name)
    monkeypatch.setattr(_zygote, "_exists", missing)
    monkeypatch.setattr(_zygote, "build_zygote", build)
    config = SandboxConfig(name="zygote", cache_dir=tmp_path)

    def ensure(run_id: str) -> BaseException:
        plan = _zygote.GuestPlan(config=config, cwd="/", args=(), env={}, watched=(), run_id=run_id)
        with pytest.raises(_zygote.ZygoteError) as info:
            anyio.run(_zygote.ensure_zygote, plan, "b")
        return info.value

    first = ensure("run-1")
    assert not isinstance(first, _zygote.BuildFailedEarlierError)
    assert "the real cause #1" in str(first)
    # Later tries in the same run (any process: the record is in the lock file) fail
    # at once with the first build's cause.
    for _ in range(2):
        again = ensure("run-1")
        assert isinstance(again, _zygote.BuildFailedEarlierError)
        assert again.cause == "the real cause #1"
    assert len(calls) == 1
    # Another run tries again; without a run id nothing is recorded.
    assert "the real cause #2" in str(ensure("run-2"))
    assert "the real cause #3" in str(ensure(""))
    assert "the real cause #4" in str(ensure(""))
    assert len(calls) == 4
