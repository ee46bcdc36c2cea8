"""The pytest plugin without VMs: options, marker validation, skip logic, header,
the guest protocol's pure parts. (Real-VM runs live in tests/fixtures/.)
"""

from __future__ import annotations

import json
import os
import warnings

import pytest

from pytest_microsandbox.fixtures import _guest, _zygote
from pytest_microsandbox.fixtures._names import safe_name
from pytest_microsandbox.fixtures._remote import guest_args, watched_files
from pytest_microsandbox.fixtures._settings import Settings, marker_spec, resolve_settings
from pytest_microsandbox.fixtures._stats import Stats

pytest_plugins = ["pytester"]

NO_KERNEL = {"MICROSANDBOX_KERNEL_DIR": "/nonexistent-msb-kernel"}


@pytest.fixture(autouse=True)
def _real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytester moves $HOME: keep the real cache (kernel, images) visible to inner runs.
    from pytest_microsandbox.runtime.paths import cache_dir

    monkeypatch.setenv("MICROSANDBOX_CACHE_DIR", str(cache_dir()))


def test_public_facade_exports():
    import pytest_microsandbox as msb

    assert sorted(msb.__all__) == msb.__all__
    for name in msb.__all__:
        assert getattr(msb, name) is not None
    with pytest.raises(AttributeError):
        _ = msb.nope  # type: ignore[attr-defined]


def test_settings_precedence_cmdline_over_ini_over_default(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nsandbox_memory = 1024\nsandbox_cpus = 2\n")
    config = pytester.parseconfig("--sandbox-memory=768")
    s = resolve_settings(config)
    assert (s.memory, s.cpus, s.image, s.network, s.isolation) == (768, 2, "host", "none", "auto")
    assert not s.keep_failed and not s.no_sandbox and not s.require


def test_settings_bool_flags_and_ini(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nsandbox_require = true\n")
    s = resolve_settings(pytester.parseconfig("--no-sandbox", "--sandbox-keep-failed"))
    assert s.require and s.no_sandbox and s.keep_failed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sandbox-network=public"], "only policy is 'none'"),
        (["--sandbox-memory=lots"], "--sandbox-memory must be an integer"),
        (["--sandbox-cpus=0"], "--sandbox-cpus must be between 1 and 64"),
        (["--sandbox-accel=hvf"], "--sandbox-accel must be one of auto, kvm, tcg"),
        (["--sandbox-isolation=thread"], "--sandbox-isolation must be one of"),
    ],
)
def test_bad_options_are_usage_errors(pytester: pytest.Pytester, args, needle):
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert needle in result.stderr.str()


def _mark(**kw):
    return pytest.mark.sandbox(**kw).mark


def test_marker_spec_precedence_marker_over_settings():
    settings = Settings(memory=768, cpus=2)
    spec = marker_spec(_mark(memory=1024, env={"A": "1"}, timeout=5), settings, "t")
    assert (spec.memory, spec.cpus, spec.env, spec.timeout) == (1024, 2, (("A", "1"),), 5.0)
    assert marker_spec(_mark(), settings, "t").memory == 768


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"network": "public"}, "network='public' is not supported yet"),
        ({"memroy": 5}, "unknown @pytest.mark.sandbox argument(s) memroy"),
        ({"timeout": -1}, "timeout=...) must be a positive number"),
        ({"env": {"A": 1}}, "the value of A must be a str without NUL bytes"),
        ({"env": {"A": "x\0"}}, "the value of A must be a str without NUL bytes"),
        ({"env": {"1A": "x"}}, "'1A' is not an environment variable name"),
        ({"env": ["A", 3]}, "expected NAME or NAME=VALUE strings, got 3"),
        ({"env": "A"}, "must be a dict of str to str or a list of host variable names"),
        ({"isolation": "thread"}, "isolation=...) must be one of"),
        ({"memory": 64}, "memory=...) must be between 128"),
    ],
)
def test_marker_rejects_bad_arguments(kw, needle):
    with pytest.raises(pytest.UsageError) as info:
        marker_spec(_mark(**kw), Settings(), "test_x.py::test_y")
    assert needle in str(info.value)
    assert "test_x.py::test_y" in str(info.value)


def test_marker_rejects_positional_arguments():
    with pytest.raises(pytest.UsageError, match="keyword arguments only"):
        marker_spec(pytest.mark.sandbox("big").mark, Settings(), "t")


def test_bad_marker_fails_the_run_with_a_clear_error(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.sandbox(network="public")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest("--no-sandbox")
    assert result.ret != 0
    result.stderr.re_match_lines([r".*test_x: network='public' is not supported yet.*"])


def test_marker_is_registered(pytester: pytest.Pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.sandbox(image=None, memory=None*"])


def test_no_sandbox_runs_marked_tests_locally(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import os, pytest
        @pytest.mark.sandbox(memory=256)
        def test_here():
            assert "MICROSANDBOX_GUEST" not in os.environ
        """
    )
    result = pytester.runpytest("--no-sandbox", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def _suite_without_backend(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A marked test, a sandbox-fixture test and a plain one, with no guest kernel."""
    for key, value in NO_KERNEL.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.sandbox
        def test_marked():
            pass
        def test_fixture(sandbox):
            pass
        def test_plain():
            pass
        """
    )


def test_without_backend_marked_tests_and_fixtures_skip_with_the_fix(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    _suite_without_backend(pytester, monkeypatch)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*no microVM backend: no guest kernel in /nonexistent*"])
    result.stdout.fnmatch_lines(["microsandbox: unavailable: *"])


def test_sandbox_require_turns_the_skip_into_a_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    _suite_without_backend(pytester, monkeypatch)
    result = pytester.runpytest_subprocess("--sandbox-require", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*--sandbox-require is set*"])


def test_header_names_accelerator_kernel_cache_and_templates(pytester: pytest.Pytester):
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.re_match_lines(
        [r"microsandbox: (accel (kvm|tcg) .*kernel .*cache .*|unavailable: .*)"]
    )


def test_guest_args_forward_report_shaping_options(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\naddopts = -n 2\n")
    config = pytester.parseconfig(
        "-p", "no:xdist", "-vv", "--tb=short", "-l", "-W", "error::UserWarning",
        "-o", "xfail_strict=true", "--strict-markers", "-o", "addopts=",
        "-o", "sandbox_env=TOKEN=s3cret", "--sandbox-env", "OTHER=s3cret",
    )  # fmt: skip
    args = guest_args(config, ["/x/test_a.py"])
    assert not [a for a in args if "s3cret" in a]  # test variables never reach the zygote
    assert args[:2] == ["-o", "addopts="]  # no -n, --junitxml, ... from addopts in the guest
    for expected in ("-vv", "--tb=short", "-l", "--strict-markers", "--color=no"):
        assert expected in args
    assert args[args.index("-W") + 1] == "error::UserWarning"
    assert "xfail_strict=true" in args
    assert args[-1] == "/x/test_a.py"
    assert args[args.index("--rootdir") + 1] == str(config.rootpath)


def test_watched_files_are_tests_conftests_and_ini(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\n")
    pytester.makeconftest("")
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text("")
    test = sub / "test_a.py"
    test.write_text("def test(): pass\n")
    config = pytester.parseconfig()
    watched = {p.name for p in watched_files(config, [str(test)])}
    assert watched == {"test_a.py", "conftest.py", "tox.ini"}
    assert len(watched_files(config, [str(test)])) == 4  # two conftests


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
        _guest.GUEST_ENV: "1",
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


def test_sandbox_env_merges_ini_then_command_line_then_marker(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nsandbox_env = TOKEN DB=ini 'GREETING=hello world'\n")
    settings = resolve_settings(pytester.parseconfig("--sandbox-env", "DB=cli"))
    assert settings.env == (
        ("TOKEN", None),
        ("DB", "ini"),
        ("GREETING", "hello world"),
        ("DB", "cli"),
    )
    spec = marker_spec(_mark(env={"DB": "marker"}), settings, "t")
    host = {"TOKEN": "t0k", "DB": "host"}
    env = _zygote.request_env(host, spec.env)
    assert env == {"TOKEN": "t0k", "DB": "marker", "GREETING": "hello world"}
    listed = marker_spec(_mark(env=["DB", "X=1"]), settings, "t")
    assert _zygote.request_env(host, listed.env)["DB"] == "host"
    # The zygote's plan never depends on the test's variables.
    assert spec.without_env() == listed.without_env()


def test_bad_sandbox_env_is_a_usage_error(pytester: pytest.Pytester):
    result = pytester.runpytest("--sandbox-env", "NOT-A-NAME=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--sandbox-env: 'NOT-A-NAME' is not an environment variable name" in (
        result.stderr.str()
    )


def test_the_guest_finds_the_channel_port_by_name(tmp_path):
    from pytest_microsandbox.runtime.qemu import CHANNEL_PORT_NAME

    assert _guest.CHANNEL_PORT_NAME == CHANNEL_PORT_NAME  # duplicated: keep them equal
    for entry, name in (("vport0p1", "msb.agent"), ("vport0p2", CHANNEL_PORT_NAME)):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name + "\n")
    assert _guest.find_channel(str(tmp_path)) == "/dev/vport0p2"
    assert _guest.find_channel(str(tmp_path / "missing")) is None


def test_serialize_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(DeprecationWarning("old"), stacklevel=1)
    data = _guest.serialize_warning(caught[0])
    assert data["message"] == "old"
    assert (data["category_module"], data["category_name"]) == ("builtins", "DeprecationWarning")


def test_safe_names_are_valid_sandbox_names():
    from pytest_microsandbox.runtime import SandboxConfig

    for raw in ("test_x[a/b c]", "-weird", "[", "x" * 200):
        SandboxConfig(name=safe_name(raw))


def test_stats_merge_and_p50():
    a, b = Stats(), Stats()
    a.record_start(0.1)
    b.record_start(0.3)
    b.template_seconds, b.templates_built = 2.0, 1
    a.merge(b.to_dict())
    assert a.created == 2 and a.templates_built == 1
    assert a.restore_p50() == pytest.approx(0.2)


def test_plugin_is_loaded_through_the_entry_point(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["run tests in microVMs*", "*--sandbox-keep-failed*"])
    assert os.environ.get(_guest.GUEST_ENV) is None


def test_a_quiet_run_without_sandboxes_never_imports_the_runtime(pytester: pytest.Pytester):
    # The runtime (pydantic, anyio's event loop, QEMU plumbing) costs ~0.3 s a
    # process: a run that creates no sandbox and prints no header skips it.
    pytester.makeconftest(
        """
        import sys

        def pytest_unconfigure(config):
            loaded = "pytest_microsandbox.runtime" in sys.modules
            print(f"runtime imported: {loaded}")
        """
    )
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-q", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["runtime imported: False"])


def test_the_header_needs_neither_the_config_models_nor_the_engine(pytester: pytest.Pytester):
    # The header (accelerator, kernel, cache) reads a few light modules only:
    # pydantic and the sandbox engine cost ~0.2 s of every default-verbosity run.
    pytester.makeconftest(
        """
        import sys

        def pytest_unconfigure(config):
            heavy = [m for m in ("pytest_microsandbox.runtime.config",
                                 "pytest_microsandbox.runtime.sandbox") if m in sys.modules]
            print(f"heavy modules: {heavy}")
        """
    )
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["microsandbox: *", "heavy modules: []"])


def _zygote_plan(pytester: pytest.Pytester) -> _zygote.GuestPlan:
    from pytest_microsandbox.fixtures._remote import RemoteRunner

    config = pytester.parseconfigure()
    runner = RemoteRunner(config, resolve_settings(config), Stats())
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


def test_misspelt_microsandbox_hook_is_rejected(pytester: pytest.Pytester):
    # The hookspec is registered, so pytest validates implementations against it.
    pytester.makeconftest("def pytest_microsandbox_zygote_kye(config):\n    return 'x'\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    assert "unknown hook 'pytest_microsandbox_zygote_kye'" in str(result.stderr) + str(
        result.stdout
    )


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


class _StubSandbox:
    """What RemoteRunner._exchange uses of a Sandbox, without a VM."""

    name = "stub"

    async def _watched(self, what, call):
        return await call()

    def console_tail(self, lines=40):
        return "console tail"


def _exchange(pytester: pytest.Pytester, answer, timeout=None, earlier=None):
    """Run one exchange against a fake runner: ``answer(request, send)`` plays the guest."""
    import anyio
    from anyio.streams.stapled import StapledObjectStream

    from pytest_microsandbox.fixtures._remote import RemoteRunner

    config = pytester.parseconfigure()
    runner = RemoteRunner(config, resolve_settings(config), Stats())

    async def main():
        to_guest_send, to_guest_recv = anyio.create_memory_object_stream(10)
        to_host_send, to_host_recv = anyio.create_memory_object_stream(10)
        host_side = StapledObjectStream(to_guest_send, to_host_recv)  # bytes both ways
        async with anyio.create_task_group() as tg:

            async def guest():
                request = json.loads(await to_guest_recv.receive())
                await answer(request, to_host_send)

            tg.start_soon(guest)
            outcome = await runner._exchange(
                _StubSandbox(), host_side, "t.py::x", True, timeout, {"A": "1"}, earlier
            )
            tg.cancel_scope.cancel()
        return outcome

    return anyio.run(main)


def _line(seq, kind, data):
    return (_guest.PREFIX + json.dumps({"seq": seq, "kind": kind, "data": data}) + "\n").encode()


def _report(when, outcome="passed", nodeid="t.py::x"):
    return {"$report_type": "TestReport", "nodeid": nodeid, "when": when, "outcome": outcome}


async def _whole_answer(request, send):
    seq = request["seq"]
    for when in ("setup", "call", "teardown"):
        await send.send(_line(seq, "report", _report(when)))
    await send.send(_line(seq, "done", {"status": 0}))


def test_exchange_sends_a_fresh_random_seq_and_the_test_env(pytester: pytest.Pytester):
    requests = []

    async def answer(request, send):
        requests.append(request)
        await _whole_answer(request, send)

    earlier: dict[str, str] = {}
    for _ in range(2):
        outcome = _exchange(pytester, answer, earlier=earlier)
        assert outcome.error is None and outcome.violation is None
        assert [m.when for m in outcome.messages[:3]] == ["setup", "call", "teardown"]
    seqs = [r["seq"] for r in requests]
    assert len(set(seqs)) == 2 and all(len(s) == 32 for s in seqs)
    assert requests[0]["env"] == {"A": "1"} and requests[0]["fork"] is True
    assert earlier == {seqs[0]: "t.py::x", seqs[1]: "t.py::x"}


def test_exchange_rejects_a_late_line_of_an_earlier_request(pytester: pytest.Pytester):
    async def answer(request, send):
        await send.send(_line("old", "done", {"status": None, "signal": 9}))
        await _whole_answer(request, send)

    outcome = _exchange(pytester, answer, earlier={"old": "t.py::before"})
    assert outcome.violation is not None
    assert "a line of the earlier test t.py::before after its end" in outcome.violation


@pytest.mark.parametrize(
    ("forged", "seen"),
    [
        (
            _report("call", nodeid="t.py::other"),
            "a report for another test, 't.py::other', while t.py::x ran",
        ),
        (_report("setup"), "a second 'setup' report for t.py::x"),
    ],
)
def test_exchange_rejects_forged_reports(pytester: pytest.Pytester, forged, seen):
    async def answer(request, send):
        seq = request["seq"]
        await send.send(_line(seq, "report", _report("setup")))
        await send.send(_line(seq, "report", forged))
        await _whole_answer(request, send)

    outcome = _exchange(pytester, answer)
    assert outcome.violation == (
        f"protocol violation: the guest sent {seen}: results from inside the guest cannot be "
        "trusted"
    )


def test_exchange_fails_a_flooding_guest_at_the_cap(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MICROSANDBOX_REPORT_MAX_MB", "0.01")  # 10 KiB

    async def answer(request, send):
        for _ in range(100):
            await send.send(b"x" * 1000)  # no newline: one endless line

    outcome = _exchange(pytester, answer)
    assert outcome.violation is not None
    assert "more than 10485 bytes for t.py::x" in outcome.violation


def test_exchange_reports_a_closed_channel_as_a_crash(pytester: pytest.Pytester):
    async def answer(request, send):
        await send.send(_line(request["seq"], "report", _report("setup")))
        await send.aclose()

    outcome = _exchange(pytester, answer)
    assert outcome.error is not None and outcome.error.startswith("the guest crashed")
    assert outcome.console == "console tail"
    assert [m.when for m in outcome.messages] == ["setup"]  # what arrived is kept


def test_exchange_reports_the_runners_done_for_a_dead_test_process(pytester: pytest.Pytester):
    async def answer(request, send):
        await send.send(_line(request["seq"], "report", _report("setup")))
        await send.send(_line(request["seq"], "done", {"status": None, "exit": 0}))

    outcome = _exchange(pytester, answer)
    assert outcome.error == "the test process in the guest exited with status 0 before it finished"


def test_exchange_times_out(pytester: pytest.Pytester):
    import anyio

    async def answer(request, send):
        await anyio.sleep(30)

    outcome = _exchange(pytester, answer, timeout=0.2)
    assert outcome.error == "the test ran past its 0.2 s timeout in the guest"
