"""The plugin object: one per pytest process (``config``), holding the session's
state and implementing the hooks as methods, as pytest's own plugins and
xdist's ``DSession`` do. Registered by the entry point's ``pytest_configure``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from ._backend import accel_decision, availability, in_guest, isolation_for
from ._options import MarkerSpec, Settings, item_spec, marker_spec
from ._progress import ProgressView
from ._stats import Stats
from ._xdist import RELAY_DIR_KEY, RUN_STARTED_KEY, ControllerRelay, WorkerRelay, sandboxed_line

if TYPE_CHECKING:
    from ..runtime import SyncSandbox
    from ..runtime.progress import BuildEvent
    from ._runner import HostRunner

__all__ = [
    "PLUGIN_KEY",
    "PLUGIN_NAME",
    "REPORTS_KEY",
    "SANDBOXES_KEY",
    "MicrosandboxPlugin",
    "get_plugin",
]

#: How long the controller's exit waits for its walk of the venv and Python
#: prefix (a few tenths of a second here; an unwaited walk dies with the process).
_PREWALK_JOIN_S = 30.0
#: The plugin object's name in pytest's plugin manager.
PLUGIN_NAME = "microsandbox-session"
#: The marker's spec of a marked item (set at collection).
SPEC_KEY = pytest.StashKey[MarkerSpec]()
#: The sandboxes a test created through the fixtures (for failure sections).
SANDBOXES_KEY = pytest.StashKey[list["SyncSandbox"]]()
#: The test's reports by phase (set by the makereport wrapper).
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


class MicrosandboxPlugin:
    """The options resolved to :class:`Settings`, what the plugin did (:class:`Stats`),
    the files with marked tests and the host side of the guest runner, created on
    the first marked test (it imports the runtime).
    """

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.stats = Stats()
        self.marked_files: list[str] = []
        # isolation -> tests that run sandboxed with it; tests left on the host
        self.sandboxed: dict[str, int] = {}
        self.on_host = 0
        self._runner: HostRunner | None = None
        self._view: ProgressView | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # Under xdist: the controller's reader of what workers report, or a worker's writer.
        self._relay: ControllerRelay | None = None
        self._relay_out: WorkerRelay | None = None
        self._relayed_counts = False
        # Tree walks made since count as this run's (``runtime.images._walks``).
        self._run_started = time.time()
        self._prewalk: threading.Thread | None = None

    def runner(self) -> HostRunner:
        if self._runner is None:
            with _collector_paused():
                from ._runner import HostRunner

            self._runner = HostRunner(self.config, self.settings, self.stats)
            self._runner.set_files(self.marked_files)
        return self._runner

    def _isolation(self, level: str) -> Literal["vm", "process"]:
        if self.settings.keep_failed:
            # Under process isolation a test runs in a forked process of a shared
            # VM and leaves nothing behind when it ends: only a test's own VM
            # can be kept as it was when the test failed.
            return "vm"
        return isolation_for(level, self.settings.accel, self.settings.cache_dir)

    # -- header and summary ------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        if in_guest() or hasattr(config, "workerinput"):
            return []
        settings = self.settings
        avail = availability()
        if not avail.ok:
            return [f"microsandbox: unavailable: {avail.reason}"]
        from ..runtime.paths import cache_dir

        cache = cache_dir(settings.cache_dir)
        accel, reason = accel_decision(settings.accel, settings.cache_dir)
        kernel = "?"
        try:
            from ..runtime.kernel import find_kernel

            kernel = find_kernel(cache).version
        except Exception as exc:  # the header must not break a run
            kernel = f"missing ({exc})"
        templates = _count(cache / "snapshots" / "templates")
        zygotes = _count(cache / "snapshots" / "named", "zygote-")
        isolation = self._isolation(settings.isolation)
        local = " (--no-sandbox: marked tests run locally)" if settings.no_sandbox else ""
        every = " (--sandbox-all: every test is sandboxed)" if settings.sandbox_all else ""
        return [
            f"microsandbox: accel {accel} ({reason}), kernel {kernel}, cache {cache}",
            f"microsandbox: templates {templates}, zygotes {zygotes}, marked tests isolate by "
            f"{isolation}{local}{every}",
        ]

    def pytest_report_collectionfinish(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> list[str]:
        """After "collected N items": how many run sandboxed, by isolation (quiet under -q,
        like pytest's own header lines; under xdist the workers collect, and the
        controller prints the line they report: ``pytest_xdist_node_collection_finished``).
        """
        if in_guest() or config.option.verbose < 0 or not self.sandboxed:
            return []
        total = sum(self.sandboxed.values())
        if self.settings.no_sandbox:
            return [f"microsandbox: --no-sandbox: {total} of {len(items)} tests would be "
                    "sandboxed; all run on the host"]  # fmt: skip
        return [sandboxed_line(self.sandboxed, self.on_host, len(items))]

    def pytest_terminal_summary(
        self, terminalreporter: Any, exitstatus: int, config: pytest.Config
    ) -> None:
        if in_guest():
            return
        stats = self.stats
        built = stats.builds_line()
        if not stats.created and built is None and not stats.kept:
            return
        p50 = stats.restore_p50()
        terminalreporter.write_sep("-", "microsandbox")
        terminalreporter.write_line(
            f"sandboxes created: {stats.created}; start/restore p50: "
            + (f"{p50 * 1000:.0f} ms" if p50 is not None else "n/a")
        )
        if built is not None:
            terminalreporter.write_line(built)
        for line in stats.kept:
            terminalreporter.write_line(f"kept: {line}")

    # -- build progress ------------------------------------------------------------------------

    # First: the prestart's VM restores while the other plugins start (the
    # terminal's header asks the doctor, ~0.1 s).
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if in_guest():
            return
        from ..runtime.progress import subscribe

        config = session.config
        terminal = config.pluginmanager.get_plugin("terminalreporter")
        quiet = config.option.verbose < 0 or hasattr(config, "workerinput")
        if terminal is not None and not quiet:
            # Builds inside a test report while pytest captures its output.
            capman = config.pluginmanager.get_plugin("capturemanager")
            uncaptured = (
                capman.global_and_fixture_disabled if capman is not None else contextlib.nullcontext
            )
            self._view = ProgressView(terminal, live=terminal.isatty(), uncaptured=uncaptured)
        workerinput = getattr(config, "workerinput", {})
        if workerinput.get(RELAY_DIR_KEY):
            self._relay_out = WorkerRelay(workerinput[RELAY_DIR_KEY], workerinput["workerid"])
        self._unsubscribe = subscribe(self._on_build)
        from ..runtime._walk_sharing import share_walks_since, walk_sharing_enabled

        if walk_sharing_enabled():
            share_walks_since(float(workerinput.get(RUN_STARTED_KEY, self._run_started)))
        self._prestart(config)

    def _prestart(self, config: pytest.Config) -> None:
        """Start the first process-isolated test's VM beside the collection when the
        last run of this project served one live (``_hint``); not in xdist's
        controller (its workers run the tests and prestart their own).
        """
        settings = self.settings
        if settings.no_sandbox or config.option.collectonly or settings.keep_failed:
            return
        if config.pluginmanager.has_plugin("dsession"):
            self._prewalk_for_workers(config)
            return
        if settings.keep_warm:
            # Never in vm isolation: a VM kept for the next run is shared by its tests.
            spec = marker_spec(pytest.mark.sandbox.mark, settings, "the settings")
            if spec.network == "off" and self._isolation(spec.isolation) == "process":
                if availability().ok:
                    self.runner().prestart_warm(spec)
                return
        from ._hint import live_enabled, live_hint

        guess = live_hint(config.rootpath, settings.cache_dir) if live_enabled() else None
        if guess is None:
            return
        spec = marker_spec(pytest.mark.sandbox.mark, settings, "the settings")
        if spec.network != "off" or self._isolation(spec.isolation) != "process":
            return
        # Not asked first: the backend worked for the run the hint comes from,
        # and a prestart that fails is dropped (the first test's own start then
        # reports why); the doctor's imports and checks (~0.1 s) would hold
        # the restore back.
        self.runner().prestart(spec, guess)

    def _prewalk_for_workers(self, config: pytest.Config) -> None:
        """In xdist's controller: walk the venv and the Python prefix (~0.3 s of
        CPU each time, see ``runtime.images._walks``) while the workers start, so
        that they find the walks done instead of each making its own, when the
        last run of this project ran sandboxed tests (``_hint``).
        """
        from ..runtime._walk_sharing import walk_sharing_enabled
        from ._hint import has_live_hint, has_zygote_hint

        if not walk_sharing_enabled():
            return
        root, cache = config.rootpath, self.settings.cache_dir
        if not (has_live_hint(root, cache) or has_zygote_hint(root, cache)):
            return
        if self.settings.image != "host" or not availability().ok:
            return

        def walk() -> None:
            from ..runtime.images import prewalk_host_trees

            with contextlib.suppress(Exception):  # the workers walk themselves then
                prewalk_host_trees(root, cache)

        self._prewalk = threading.Thread(target=walk, name="microsandbox-prewalk", daemon=True)
        self._prewalk.start()

    def _on_build(self, event: BuildEvent) -> None:
        if event.state == "done":
            self.stats.record_build(event.kind, event.elapsed, outermost=event.parent == 0)
        if self._view is not None:
            self._view(event)
        if self._relay_out is not None:
            self._relay_out(event)

    def _on_worker_build(self, event: BuildEvent) -> None:
        # Shown only: the worker's own stats reach the summary through workeroutput.
        if self._view is not None:
            self._view(event)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._prewalk is not None:
            self._prewalk.join(_PREWALK_JOIN_S)
            self._prewalk = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._view is not None:
            self._view.close()

    # -- xdist's controller ------------------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Name the directory the new worker reports its counts and builds in."""
        if in_guest():
            return
        if self._relay is None:
            self._relay = ControllerRelay(self._on_worker_build)
        node.workerinput[RELAY_DIR_KEY] = str(self._relay.directory)
        node.workerinput[RUN_STARTED_KEY] = self._run_started

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """The workers' "N of M tests sandboxed" line, once, on the controller."""
        if self._relayed_counts or self._relay is None or self.settings.no_sandbox:
            return
        counts = self._relay.counts()
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if counts is None or terminal is None or self.config.option.verbose < 0:
            return
        self._relayed_counts = True
        if counts[0]:
            terminal.write_line(sandboxed_line(*counts))

    # -- marked tests ------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """Build what the sandboxed tests start from before the first of them runs,
        so the build's progress has the terminal to itself.
        """
        if in_guest() or self.settings.no_sandbox or session.config.option.collectonly:
            return
        specs = list(dict.fromkeys(i.stash[SPEC_KEY] for i in session.items if SPEC_KEY in i.stash))
        if specs and availability().ok:
            self.runner().prepare([(spec, self._isolation(spec.isolation)) for spec in specs])

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        files: set[str] = set()
        self.sandboxed, self.on_host = {}, 0
        guest = in_guest()
        for item in items:
            spec = item_spec(item, self.settings)
            if spec is None:
                self.on_host += 1
                continue
            item.stash[SPEC_KEY] = spec
            files.add(str(item.path))
            level = "guest" if guest else self._isolation(spec.isolation)
            self.sandboxed[level] = self.sandboxed.get(level, 0) + 1
        self.marked_files = sorted(files)
        if self._relay_out is not None:
            self._relay_out.write_counts(self.sandboxed, self.on_host, len(items))
        if self._runner is not None:  # started before the collection (_prestart)
            self._runner.set_files(self.marked_files)
            if not self.sandboxed.get("process"):
                from ._hint import drop_live_hint

                drop_live_hint(config.rootpath, self.settings.cache_dir)
                self._runner.drop_prestart()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        spec = item.stash.get(SPEC_KEY, None)
        if spec is None or in_guest() or self.settings.no_sandbox:
            return None
        avail = availability()
        if not avail.ok:
            _report_unavailable(item, avail.reason, self.settings.require)
            return True
        self.runner().run_item(item, spec, self._isolation(spec.isolation))
        return True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
        if report.failed and report.when in ("setup", "call"):
            report.sections.extend(sandbox_sections(item))
        return report

    # -- the end of the session --------------------------------------------------------------

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self._runner is not None:
            self._runner.close()
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["microsandbox_stats"] = self.stats.to_dict()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist's controller: add a finished worker's numbers."""
        data = getattr(node, "workeroutput", {}).get("microsandbox_stats")
        if data:
            self.stats.merge(data)


@contextlib.contextmanager
def _collector_paused() -> Generator[None, None, None]:
    """Python's cyclic collector off for the runtime's import (on the way to the
    first VM, the prestart's included): its ~100k new objects set off a full
    collection of pytest's heap there, ~25 ms; it runs later instead, while
    the VM restores.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def get_plugin(config: pytest.Config) -> MicrosandboxPlugin:
    """This session's plugin object.

    :raises pytest.UsageError: the plugin was not configured.
    """
    try:
        return config.stash[PLUGIN_KEY]
    except KeyError:
        raise pytest.UsageError(
            "pytest-microsandbox is not configured (was the plugin disabled with "
            "-p no:microsandbox?)"
        ) from None


PLUGIN_KEY = pytest.StashKey[MicrosandboxPlugin]()


def sandbox_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """Console tails, diagnostics and configs of the sandboxes a failed test used."""
    out = []
    for sb in item.stash.get(SANDBOXES_KEY, []):
        with contextlib.suppress(Exception):
            # A restored clone's console is usually empty (the kernel boots
            # quiet, nothing is logged after restore): no blank section.
            if tail := sb.console_tail().strip():
                out.append((f"guest console: {sb.name}", tail))
        with contextlib.suppress(Exception):
            out.append((f"guest diagnostics: {sb.name}", sb.diagnostics()))
        with contextlib.suppress(Exception):
            out.append(
                (f"sandbox config: {sb.name}", json.dumps(sb.config.model_dump(mode="json")))
            )
    return out


def _count(root: Path, prefix: str = "") -> int:
    try:
        return sum(
            1
            for p in root.iterdir()
            if p.is_dir() and p.name.startswith(prefix) and not p.name.startswith(".")
        )
    except OSError:
        return 0


def _report_unavailable(item: pytest.Item, reason: str, require: bool) -> None:
    """A marked test's result without a backend: skipped, or failed under ``--sandbox-require``."""
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    longrepr: Any
    if require:
        outcome, longrepr = "failed", f"{reason} [--sandbox-require is set]"
    else:
        path, lineno, _ = item.location
        outcome, longrepr = "skipped", (str(path), (lineno or 0) + 1, f"Skipped: {reason}")
    report = pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords={k: 1 for k in item.keywords},
        outcome=outcome,  # type: ignore[arg-type]
        longrepr=longrepr,
        when="setup",
    )
    item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
