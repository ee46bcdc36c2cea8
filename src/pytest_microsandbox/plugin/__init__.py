"""The pytest plugin (entry point ``pytest11: microsandbox``).

Options and ini keys, the ``sandbox`` marker, the header and summary lines, the
run-in-guest protocol of marked tests and the fixtures (``sandbox``,
``sandbox_factory``, ``worker_sandbox``).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from .fixtures._backend import availability
from .fixtures._fixtures import (
    REPORTS_KEY,
    _worker_sandbox_snapshot,
    sandbox,
    sandbox_factory,
    sandbox_sections,
    worker_sandbox,
    worker_sandbox_setup,
)
from .fixtures._settings import MARKER_DOC, MarkerSpec, add_options, marker_spec, resolve_settings
from .fixtures._state import STATE_KEY, PluginState, accel_decision, get_state, in_guest

__all__ = [
    "pytest_addhooks",
    "pytest_addoption",
    "pytest_configure",
    "sandbox",
    "sandbox_factory",
    "worker_sandbox",
    "worker_sandbox_setup",
]

_SPEC_KEY = pytest.StashKey[MarkerSpec]()
_ = _worker_sandbox_snapshot  # a fixture: pytest finds it in this module's namespace


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Register this plugin's hooks (see :mod:`pytest_microsandbox.hookspec`)."""
    from . import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    config.stash[STATE_KEY] = PluginState(settings=resolve_settings(config))


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_report_header(config: pytest.Config) -> list[str]:
    if in_guest() or _is_worker(config):
        return []
    settings = get_state(config).settings
    avail = availability()
    if not avail.ok:
        return [f"microsandbox: unavailable: {avail.reason}"]
    from .runtime.paths import cache_dir

    cache = cache_dir(settings.cache_dir)
    accel, reason = accel_decision(settings.accel, settings.cache_dir)
    kernel = "?"
    try:
        from .runtime.kernel import find_kernel

        kernel = find_kernel(cache).version
    except Exception as exc:  # the header must not break a run
        kernel = f"missing ({exc})"
    templates = _count(cache / "snapshots" / "templates")
    zygotes = _count(cache / "snapshots" / "named", "zygote-")
    isolation = _isolation(settings.isolation, settings)
    local = " (--no-sandbox: marked tests run locally)" if settings.no_sandbox else ""
    return [
        f"microsandbox: accel {accel} ({reason}), kernel {kernel}, cache {cache}",
        f"microsandbox: templates {templates}, zygotes {zygotes}, marked tests isolate by "
        f"{isolation}{local}",
    ]


def _count(root: Path, prefix: str = "") -> int:
    try:
        return sum(
            1
            for p in root.iterdir()
            if p.is_dir() and p.name.startswith(prefix) and not p.name.startswith(".")
        )
    except OSError:
        return 0


def _isolation(level: str, settings: Any) -> str:
    """``auto``: vm on KVM; under TCG, process (measured faster: see the README)."""
    if level != "auto":
        return level
    accel, _ = accel_decision(settings.accel, settings.cache_dir)
    return "vm" if accel == "kvm" else "process"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    state = get_state(config)
    files: set[str] = set()
    for item in items:
        mark = item.get_closest_marker("sandbox")
        if mark is None:
            continue
        item.stash[_SPEC_KEY] = marker_spec(mark, state.settings, item.nodeid)
        files.add(str(item.path))
    state.marked_files = sorted(files)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    spec = item.stash.get(_SPEC_KEY, None)
    if spec is None or in_guest():
        return None
    state = get_state(item.config)
    if state.settings.no_sandbox:
        return None
    avail = availability()
    if not avail.ok:
        _report_unavailable(item, avail.reason, state.settings.require)
        return True
    from .fixtures._remote import RemoteRunner

    runner = state.remote(item.config)
    assert isinstance(runner, RemoteRunner)
    isolation = _isolation(spec.isolation, state.settings)
    runner.run_item(item, spec, "vm" if isolation == "vm" else "process")
    return True


def _report_unavailable(item: pytest.Item, reason: str, require: bool) -> None:
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    if require:
        outcome, longrepr, text = "failed", f"{reason} [--sandbox-require is set]", ""
        longrepr_any: Any = longrepr
    else:
        path, lineno, _ = item.location
        outcome, text = "skipped", reason
        longrepr_any = (str(path), (lineno or 0) + 1, f"Skipped: {reason}")
    report = pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords={k: 1 for k in item.keywords},
        outcome=outcome,  # type: ignore[arg-type]
        longrepr=longrepr_any,
        when="setup",
    )
    _ = text
    item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
    if report.failed and report.when in ("setup", "call"):
        report.sections.extend(sandbox_sections(item))
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is None:
        return
    if state.runner is not None:  # only then import it (it imports the runtime)
        from .fixtures._remote import RemoteRunner

        assert isinstance(state.runner, RemoteRunner)
        state.runner.close()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["microsandbox_stats"] = state.stats.to_dict()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    data = getattr(node, "workeroutput", {}).get("microsandbox_stats")
    if data:
        get_state(node.config).stats.merge(data)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if in_guest():
        return
    stats = get_state(config).stats
    if not stats.created and not stats.templates_built and not stats.kept:
        return
    p50 = stats.restore_p50()
    terminalreporter.write_sep("-", "microsandbox")
    terminalreporter.write_line(
        f"sandboxes created: {stats.created}; start/restore p50: "
        + (f"{p50 * 1000:.0f} ms" if p50 is not None else "n/a")
        + f"; templates built: {stats.templates_built} in {stats.template_seconds:.1f} s"
    )
    for line in stats.kept:
        terminalreporter.write_line(f"kept: {line}")
