"""The base runner's metadata and fixture-scan memos (guest/bootstrap.py, run by
its path there)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import pytest_microsandbox.guest as guest_package


def _bootstrap() -> ModuleType:
    path = Path(guest_package.__file__).parent / "bootstrap.py"
    spec = importlib.util.spec_from_file_location("msb_bootstrap_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dist_info(site: Path, name: str, plugin: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pytest11]\n{plugin} = {name}_mod\n")
    (info / "RECORD").write_text(f"{name}_mod.py,,\n")


def test_the_memo_answers_as_importlib_and_sees_new_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, project = tmp_path / "site", tmp_path / "project"
    _dist_info(site, "alpha", "alpha_plugin")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module sets sys.path[0]
    memo = _bootstrap().MetadataMemo()
    sys.path[:] = [str(site), str(project)]
    memo.install()
    try:
        first = [(d.metadata["Name"], [e.name for e in d.entry_points]) for d in memo()]
        assert first == [("alpha", ["alpha_plugin"])]
        assert [str(f) for f in next(iter(memo())).files] == ["alpha_mod.py"]
        # Read once: the same objects, even after the files are gone.
        (site / "alpha-1.0.dist-info" / "entry_points.txt").unlink()
        again = next(iter(importlib.metadata.distributions()))
        assert [e.name for e in again.entry_points] == ["alpha_plugin"]
        # An entry that appears (the project copied in) is read anew.
        _dist_info(project, "beta", "beta_plugin")
        assert sorted(d.metadata["Name"] for d in importlib.metadata.distributions()) == [
            "alpha",
            "beta",
        ]
        # Arguments go to importlib's own function.
        assert [d.metadata["Name"] for d in memo(name="beta")] == ["beta"]
    finally:
        memo.uninstall()
    assert importlib.metadata.distributions is memo.original


def _run_with_bootstrap(script: str, tmp_path: Path, *args: Path) -> str:
    """``script`` in a fresh interpreter (the memos patch pytest and pluggy
    process-wide), given bootstrap.py's path and ``args``; its stdout.
    """
    bootstrap = Path(guest_package.__file__).parent / "bootstrap.py"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(bootstrap), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "PYTEST_ADDOPTS": ""},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


FIXTURE_RUNS = """
import sys, types
import importlib.util
import pytest

spec = importlib.util.spec_from_file_location("msb_bootstrap_under_test", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
memo = bootstrap.FixtureScanMemo()
scanned = []
original = memo.original

def counting(manager, *args, **kwargs):
    holder = kwargs.get("holder")
    scanned.append(getattr(holder, "__name__", type(holder).__name__))
    return original(manager, *args, **kwargs)

memo.original = counting
assert memo.install()
assert pytest.main(["-q", "-p", "plug_mod", sys.argv[2]]) == 0  # the base's warm-up
memo.stop_recording()
import plug_mod

@pytest.fixture
def added_later():
    return "new"

plug_mod.added_later = added_later  # a module that changed is scanned again
scanned.clear()
code = pytest.main(["-q", "-p", "plug_mod", sys.argv[3]])
print("SCANNED", sorted(set(scanned)))
sys.exit(code)
"""


def test_the_fixture_memo_replays_plugin_modules_and_rescans_what_changed(tmp_path: Path) -> None:
    (tmp_path / "plug_mod.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef from_plugin():\n    return 'plugin'\n\n"
        "@pytest.fixture(name='renamed')\ndef _renamed():\n    return 'by name'\n\n"
        "class Holder:\n"
        "    @pytest.fixture\n    def from_instance(self):\n        return id(self)\n\n"
        "def pytest_configure(config):\n"
        "    config.pluginmanager.register(Holder(), 'holder')\n"
    )
    warm, real = tmp_path / "warm", tmp_path / "real"
    warm.mkdir()
    real.mkdir()
    (warm / "test_w.py").write_text("def test_w(from_plugin):\n    assert from_plugin\n")
    (real / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef from_conftest():\n    return 'conftest'\n"
    )
    (real / "test_r.py").write_text(
        "def test_r(from_plugin, renamed, from_instance, from_conftest, tmp_path, added_later,"
        " request):\n"
        "    assert (from_plugin, renamed, from_conftest) == ('plugin', 'by name', 'conftest')\n"
        "    assert from_instance == id(request.config.pluginmanager.get_plugin('holder'))\n"
        "    assert added_later == 'new' and tmp_path.is_dir()\n"
    )
    scanned = _run_with_bootstrap(FIXTURE_RUNS, tmp_path, warm, real).split("SCANNED ", 1)[1]
    # Scanned again: the changed module, the conftest, and the holder instance
    # (it has fixtures, bound to each instance); pytest's own modules replayed.
    assert "plug_mod" in scanned and "Holder" in scanned and "conftest" in scanned
    assert "_pytest.tmpdir" not in scanned and "_pytest.fixtures" not in scanned


PLUGIN_RUNS = """
import sys
import importlib.util
import pytest

spec = importlib.util.spec_from_file_location("msb_bootstrap_under_test", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
memo = bootstrap.PluginScanMemo()
memo.install()
assert pytest.main(["-q", "-p", "hooks_mod", sys.argv[2]]) == 0  # the base's warm-up
import hooks_mod
kept = len(memo.answers)

def pytest_report_header(config):
    return "added after the warm-up"

hooks_mod.pytest_report_header = pytest_report_header  # read again: the module changed
code = pytest.main(["-p", "hooks_mod", sys.argv[2]])
print("KEPT", kept, "CALLS", hooks_mod.CALLS)
sys.exit(code)
"""


def test_the_plugin_memo_keeps_hook_options_and_reads_a_changed_module_again(
    tmp_path: Path,
) -> None:
    (tmp_path / "hooks_mod.py").write_text(
        "import pytest\n\nCALLS = []\n\n"
        "@pytest.hookimpl(trylast=True)\ndef pytest_collection_modifyitems(items):\n"
        "    CALLS.append('last')\n\n"
        "@pytest.hookimpl(tryfirst=True)\ndef pytest_runtest_setup(item):\n"
        "    CALLS.append('setup')\n\n"
        "@pytest.hookimpl(wrapper=True)\ndef pytest_runtest_call(item):\n"
        "    CALLS.append('around')\n    return (yield)\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_t.py").write_text("def test_t():\n    pass\n")
    out = _run_with_bootstrap(PLUGIN_RUNS, tmp_path, tmp_path / "tests")
    assert "added after the warm-up" in out
    kept = int(out.split("KEPT ", 1)[1].split()[0])
    assert kept > 20, out  # pytest's own plugin modules, at least
    # Both runs called every hook, each with its options (a wrapper wraps).
    assert "CALLS ['last', 'setup', 'around', 'last', 'setup', 'around']" in out


def test_excluded_plugins_reads_p_no_as_pytest_does() -> None:
    excluded = _bootstrap().excluded_plugins
    args = ["-q", "-p", "no:cacheprovider", "-pno:warnings", "-p", "xdist", "-p", " no:x ", "t.py"]
    assert excluded(args) == ["no:cacheprovider", "no:warnings", "no:x"]
    assert excluded(["t.py", "-p"]) == []  # a trailing -p names nothing
    assert excluded(["--pdb", "-k", "no:x", "--co"]) == []


PREPARED_RUNS = """
import sys, pathlib
import importlib.util
import pytest
import _pytest.config

spec = importlib.util.spec_from_file_location("msb_bootstrap_under_test", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
seen = []

class Seen:
    def pytest_configure(self, config):
        seen.append(config)

def run(prepared_args, args, also=None):
    made = [bootstrap.PreparedConfig.make(tuple(a)) for a in (prepared_args, *(also or []))]
    bootstrap.use_prepared(made)
    code = pytest.main(args, plugins=[Seen()])
    assert _pytest.config.get_config is made[0].original  # used once at most
    config = seen[-1]
    used = [i for i, m in enumerate(made) if config is m.config]
    print("USED" + "".join(map(str, used)) if used else "FRESH",
          config.invocation_params.args == tuple(args),
          config.invocation_params.dir == pathlib.Path.cwd(),
          config.pluginmanager.has_plugin("cacheprovider"),
          code)

# What the base makes before its snapshot serves a run that excludes nothing.
run([], ["-q", sys.argv[2]])
# The project's file arguments come after the prestart: the same config serves.
run(["-q", "-p", "no:cacheprovider"], ["-q", "-p", "no:cacheprovider", sys.argv[2]])
# Another set of excluded plugins: pytest's own get_config.
run(["-q"], ["-q", "-p", "no:cacheprovider", sys.argv[2]])
run(["-q", "-p", "no:cacheprovider"], ["-q", sys.argv[2]])
# Of several (the base's two), the one whose exclusions are the run's.
run([], ["-q", "-pno:cacheprovider", sys.argv[2]], also=[["-pno:cacheprovider"]])
print("BAD", bootstrap.PreparedConfig.make(("-p", "no:main")))  # essential: UsageError
"""


def test_a_prepared_config_serves_the_run_whose_arguments_exclude_the_same_plugins(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_p.py").write_text("def test_p():\n    pass\n")
    out = _run_with_bootstrap(PREPARED_RUNS, tmp_path, project)
    lines = [line for line in out.splitlines() if line.startswith(("USED", "FRESH", "BAD"))]
    assert lines == [
        "USED0 True True True 0",
        "USED0 True True False 0",  # the run's own invocation parameters
        "FRESH True True False 0",
        "FRESH True True True 0",
        "USED1 True True False 0",
        "BAD None",
    ], out
