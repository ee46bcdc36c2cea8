"""Zygotes without a VM: the guest runner's environment, the per-test variables,
the zygote key and its hook, the build lock. (Builds: test_zygote_vm.py.)
"""

from __future__ import annotations

import json

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
