"""The pytest plugin without VMs: the entry point and the plugin object's hooks,
options, marker validation, skip logic, header. (The runner's host side:
test_runner_host.py; zygotes: test_zygote.py; real-VM runs: the *_vm.py files.)
"""

from __future__ import annotations

import os

import pytest

from pytest_microsandbox.guest.messages import GUEST_ENV
from pytest_microsandbox.plugin._names import safe_name
from pytest_microsandbox.plugin._options import Settings, marker_spec, resolve_settings
from pytest_microsandbox.plugin._stats import Stats
from pytest_microsandbox.plugin._zygote import request_env

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
    assert (s.memory, s.cpus, s.image, s.network, s.isolation) == (768, 2, "host", "off", "auto")
    assert not s.keep_failed and not s.no_sandbox and not s.require


def test_settings_bool_flags_and_ini(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nsandbox_require = true\n")
    s = resolve_settings(pytester.parseconfig("--no-sandbox", "--sandbox-keep-failed"))
    assert s.require and s.no_sandbox and s.keep_failed
    assert s.keep_warm == 0  # off unless asked for
    pytester.makeini("[pytest]\nsandbox_keep_warm = 90\n")
    assert resolve_settings(pytester.parseconfig()).keep_warm == 90
    assert resolve_settings(pytester.parseconfig("--sandbox-keep-warm=5")).keep_warm == 5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sandbox-network=public"], "not a network setting; use one of off, none"),
        (["--sandbox-memory=lots"], "--sandbox-memory must be an integer"),
        (["--sandbox-cpus=0"], "--sandbox-cpus must be between 1 and 64"),
        (["--sandbox-accel=hvf"], "--sandbox-accel must be one of auto, kvm, tcg"),
        (["--sandbox-isolation=thread"], "--sandbox-isolation must be one of"),
        (["--sandbox-keep-warm=-1"], "--sandbox-keep-warm must be a number of seconds"),
        (["--sandbox-keep-warm=soon"], "--sandbox-keep-warm must be a number of seconds"),
        (["--sandbox-keep-warm=nan"], "--sandbox-keep-warm must be a number of seconds"),
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
        ({"network": "public"}, "network='public' is not a network setting"),
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
    result.stderr.re_match_lines([r".*test_x: network='public' is not a network setting.*"])


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
    env = request_env(host, spec.env)
    assert env == {"TOKEN": "t0k", "DB": "marker", "GREETING": "hello world"}
    listed = marker_spec(_mark(env=["DB", "X=1"]), settings, "t")
    assert request_env(host, listed.env)["DB"] == "host"
    # The zygote's plan never depends on the test's variables.
    assert spec.without_env() == listed.without_env()


def test_bad_sandbox_env_is_a_usage_error(pytester: pytest.Pytester):
    result = pytester.runpytest("--sandbox-env", "NOT-A-NAME=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--sandbox-env: 'NOT-A-NAME' is not an environment variable name" in (
        result.stderr.str()
    )


def test_safe_names_are_valid_sandbox_names():
    from pytest_microsandbox.runtime import SandboxConfig

    for raw in ("test_x[a/b c]", "-weird", "[", "x" * 200):
        SandboxConfig(name=safe_name(raw))


def test_stats_merge_and_p50():
    a, b = Stats(), Stats()
    a.record_start(0.1)
    b.record_start(0.3)
    b.record_build("layer", 1.5, outermost=False)
    b.record_build("zygote", 2.0, outermost=True)
    a.merge(b.to_dict())
    assert a.created == 2 and a.builds == [("layer", 1.5), ("zygote", 2.0)]
    assert a.restore_p50() == pytest.approx(0.2)
    # Nested stages are counted, not timed twice; one worker needs no caveat.
    assert a.builds_line() == "built this run: 1 layer, 1 zygote in 2.0 s"
    a.merge(Stats().to_dict())
    assert a.builds_line().endswith("in 2.0 s (build time added up over 2 xdist workers, "
                                    "which build in parallel)")  # fmt: skip
    assert Stats().builds_line() is None


def test_plugin_is_loaded_through_the_entry_point(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["run tests in microVMs*", "*--sandbox-keep-failed*"])
    assert os.environ.get(GUEST_ENV) is None


def test_a_quiet_run_without_sandboxes_never_imports_the_runtime(pytester: pytest.Pytester):
    # The runtime (pydantic, anyio's event loop, QEMU plumbing) costs ~0.3 s a
    # process: a run that creates no sandbox and prints no header skips it.
    # (The progress listener's light module, runtime.progress, is loaded; anyio is
    # loaded by its own pytest plugin.)
    pytester.makeconftest(
        """
        import sys

        def pytest_unconfigure(config):
            heavy = ("pydantic", "pytest_microsandbox.runtime.config",
                     "pytest_microsandbox.runtime.sandbox", "pytest_microsandbox.runtime.qemu")
            loaded = any(m in sys.modules for m in heavy)
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


def test_the_runtime_is_imported_with_the_collector_paused_and_restored() -> None:
    import gc

    from pytest_microsandbox.plugin._hooks import _collector_paused

    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # a run that turned it off keeps it off
    try:
        with _collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_misspelt_microsandbox_hook_is_rejected(pytester: pytest.Pytester):
    # The hookspec is registered, so pytest validates implementations against it.
    pytester.makeconftest("def pytest_microsandbox_zygote_kye(config):\n    return 'x'\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    assert "unknown hook 'pytest_microsandbox_zygote_kye'" in str(result.stderr) + str(
        result.stdout
    )


# -- --sandbox-all -----------------------------------------------------------------------------

_SUITE_FOR_ALL = """
import pytest

def test_plain():
    pass

@pytest.mark.sandbox(memory=256)
def test_marked():
    pass

@pytest.mark.sandbox(isolation="vm")
def test_marked_vm():
    pass

@pytest.mark.no_sandbox
def test_opt_out_marker():
    pass

@pytest.mark.sandbox(False)
def test_opt_out_false():
    pass

def plain_doctest():
    '''
    >>> 1 + 1
    2
    '''
"""


def _specs(pytester: pytest.Pytester, *args: str) -> dict[str, object]:
    from pytest_microsandbox.plugin._options import item_spec

    pytester.makepyfile(_SUITE_FOR_ALL)
    items, _ = pytester.inline_genitems("--doctest-modules", *args)
    settings = resolve_settings(items[0].config)
    return {item.name: item_spec(item, settings) for item in items}


def test_sandbox_all_sandboxes_every_test_function_but_the_opt_outs(pytester: pytest.Pytester):
    specs = _specs(pytester, "--sandbox-all", "--sandbox-memory=768")
    on_host = sorted(name.rpartition(".")[2] for name, spec in specs.items() if spec is None)
    # A doctest is not a test function: it stays on the host.
    assert on_host == ["plain_doctest", "test_opt_out_false", "test_opt_out_marker"]
    assert specs["test_plain"].memory == 768  # the settings
    assert specs["test_marked"].memory == 256  # the marker's arguments still apply
    assert specs["test_marked_vm"].isolation == "vm"


def test_without_sandbox_all_only_marked_tests_are_sandboxed(pytester: pytest.Pytester):
    specs = _specs(pytester)
    assert sorted(name for name, spec in specs.items() if spec is not None) == [
        "test_marked",
        "test_marked_vm",
    ]


def test_sandbox_all_ini_key(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nsandbox_all = true\n")
    specs = _specs(pytester)
    assert specs["test_plain"] is not None


def test_marker_takes_true_or_false_alone():
    assert marker_spec(pytest.mark.sandbox(True).mark, Settings(), "t").memory == 512
    with pytest.raises(pytest.UsageError, match="or False alone"):
        marker_spec(pytest.mark.sandbox(False, 2).mark, Settings(), "t")


def test_no_sandbox_marker_is_registered(pytester: pytest.Pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.no_sandbox: run this test on the host*"])


def test_header_counts_sandboxed_tests_by_isolation(pytester: pytest.Pytester):
    pytester.makepyfile(_SUITE_FOR_ALL)
    args = ("--collect-only", "-p", "no:cacheprovider", "--sandbox-isolation=process")
    result = pytester.runpytest("--sandbox-all", *args)
    result.stdout.fnmatch_lines(
        [
            "*--sandbox-all: every test is sandboxed*",
            "collected 5 items",
            "microsandbox: 3 of 5 tests sandboxed (isolation: 2 process, 1 vm); 2 on the host",
        ]
    )
    quiet = pytester.runpytest("--sandbox-all", "-q", *args)
    assert "tests sandboxed" not in quiet.stdout.str()  # quiet, like pytest's header
    local = pytester.runpytest("--sandbox-all", "--no-sandbox", *args)
    local.stdout.fnmatch_lines(
        ["microsandbox: --no-sandbox: 3 of 5 tests would be sandboxed; all run on the host"]
    )
