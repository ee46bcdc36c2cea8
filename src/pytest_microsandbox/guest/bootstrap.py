"""The guest runner's entry point, run by its path (never imported):

    python .../pytest_microsandbox/guest/bootstrap.py CONTROL [pytest args]
    python .../pytest_microsandbox/guest/bootstrap.py --base CONTROL [-pno:NAME ...]

pytest must start here as a local ``python -m pytest`` does. So nothing of this
package is imported before ``pytest.main``: the package is a ``pytest11``
entry-point plugin, and pytest marks such packages for assertion rewriting when
it installs its import hook; one already imported makes it warn "Module already
imported so cannot be rewritten", an error under ``filterwarnings = error`` or
``-W error``. (``python -m pytest_microsandbox.guest``, the earlier way, imported
the package first and also drew a ``runpy`` ``RuntimeWarning``.)

The runner (:mod:`pytest_microsandbox.guest.runner`) is imported from this
file's ``pytest_cmdline_main`` hook, once the import hook is installed and the
entry-point plugins are loaded (the package with them, through that hook), and
registers itself there. ``-p no:...``, ``-W`` and the ini then act as locally.

A go request with ``keep`` (``--sandbox-keep-warm``) runs in a forked child
instead, and the ``--base`` process waits, pristine, for the next request: the
next run's go (or an end request) kills that child and what it started, and
the next child collects in a VM whose code paths are already translated.

``--base`` first runs pytest once on an empty directory (see
:func:`pytest_microsandbox.guest.runner.wait_for_go`); that run loads the
entry-point plugins, the package included, so what is imported between it and
the real run is already known to pytest's rewrite hook. It also keeps what
pytest and pluggy read of the installed distributions (:class:`MetadataMemo`)
for the real run's start: under emulation, scanning every distribution's
metadata again is a good part of a collection after an edit. And it makes the
real run's plugin manager ahead (:class:`PreparedConfig`).
"""

from __future__ import annotations

import faulthandler
import functools
import importlib.metadata
import os
import pathlib
import shutil
import signal
import stat
import sys
import tempfile
import traceback
from typing import TYPE_CHECKING, Any

# Run by path, Python put this file's directory first on sys.path, where it
# would make the runner's modules importable under bare names; ``python -m
# pytest`` puts the working directory there instead (unless -P / PYTHONSAFEPATH).
if not getattr(sys.flags, "safe_path", False) and sys.path:  # 3.11+
    sys.path[0] = os.getcwd()

import pytest

if TYPE_CHECKING:  # nothing of the package is imported before pytest.main
    from pytest_microsandbox.guest.messages import Go

# Over another image the host's Python runs through the host's loader
# (docs/images.md): its children started with sys.executable must too, so the
# host names a wrapper script that does (plugin/_zygote.py SYS_EXECUTABLE_ENV).
_executable = os.environ.pop("MICROSANDBOX_SYS_EXECUTABLE", "")
if _executable:
    sys.executable = _executable


class _CachedDistribution(importlib.metadata.Distribution):
    """A distribution whose files are read, and whose entry points and file list
    are parsed, once per process.
    """

    def __init__(self, dist: importlib.metadata.Distribution) -> None:
        self._dist = dist
        self._texts: dict[str, str | None] = {}

    def read_text(self, filename: str) -> str | None:
        if filename not in self._texts:
            self._texts[filename] = self._dist.read_text(filename)
        return self._texts[filename]

    def locate_file(self, path: Any) -> Any:
        return self._dist.locate_file(path)

    @functools.cached_property
    def entry_points(self) -> importlib.metadata.EntryPoints:
        return importlib.metadata.Distribution.entry_points.fget(self)  # type: ignore[attr-defined,no-any-return]

    @functools.cached_property
    def files(self) -> list[importlib.metadata.PackagePath] | None:
        return importlib.metadata.Distribution.files.fget(self)  # type: ignore[attr-defined,no-any-return]


class MetadataMemo:
    """``importlib.metadata.distributions()`` (no arguments: what pytest's rewrite
    marking and pluggy's entry-point loading call), memoized per ``sys.path``
    entry and its modification time, from the base runner's warm-up to the real
    run's start (:meth:`uninstall`): the environment cannot change in between
    (the base zygote's key covers it), and an entry that appears or changes (the
    project's directory) is read anew.
    """

    def __init__(self) -> None:
        self.original = importlib.metadata.distributions
        self.by_entry: dict[tuple[str, int | None], list[_CachedDistribution]] = {}

    def __call__(self, **kwargs: Any) -> Any:
        if kwargs:
            return self.original(**kwargs)
        found: list[importlib.metadata.Distribution] = []
        for entry in sys.path:
            try:
                mtime: int | None = os.stat(entry or ".").st_mtime_ns
            except OSError:
                mtime = None
            key = (os.path.abspath(entry), mtime)
            dists = self.by_entry.get(key)
            if dists is None:
                dists = [_CachedDistribution(d) for d in self.original(path=[entry])]
                self.by_entry[key] = dists
            found.extend(dists)
        return iter(found)

    def install(self) -> None:
        importlib.metadata.distributions = self

    def uninstall(self) -> None:
        importlib.metadata.distributions = self.original


class FixtureScanMemo:
    """What ``FixtureManager.parsefactories`` finds in a plugin (the
    fixtures it registers), recorded while the base runner warms up
    (:func:`prewarm`) and replayed in the real run for the same plugin object:
    a new session scans every name of every plugin for fixtures again (~2,500
    names, ~0.5 s of a collection under emulation, where the base's warm-up
    translated code is gone in a restored VM's new QEMU), though plugin modules
    imported before the snapshot cannot have changed.

    Only plugins registered with global visibility are replayed (a conftest is
    scanned at its directory): a module's fixtures, and an instance's or class's
    finding of none (an instance's fixtures are bound to it), and only while the
    module (the class and its bases) has as many attributes as when scanned;
    anything else, or a pytest whose ``parsefactories`` has no
    ``holder``/``node`` keywords, goes to pytest's own code. A replay does not
    repeat pytest's warning about a plugin fixture hidden behind decorators;
    the host's own run of the same plugins gives it.
    """

    def __init__(self) -> None:
        from _pytest.fixtures import FixtureManager

        self.cls: Any = FixtureManager
        self.original: Any = FixtureManager.parsefactories
        # id(module or class) -> (it, its attribute count, _register_fixture's kwargs)
        self.found: dict[int, tuple[Any, int, list[dict[str, Any]]]] = {}
        self.recording = True

    def install(self) -> bool:
        import inspect
        import types

        try:
            params = inspect.signature(self.cls.parsefactories).parameters
        except (TypeError, ValueError):
            return False
        if "holder" not in params or "node" not in params:
            return False
        memo, original = self, self.original

        @functools.wraps(original)
        def parsefactories(manager: Any, *args: Any, **kwargs: Any) -> Any:
            holder, node = kwargs.get("holder"), kwargs.get("node")
            session = getattr(manager, "session", None)
            if (
                args
                or holder is None
                or session is None
                or node is not session
                or str(getattr(holder, "__file__", "")).endswith("conftest.py")
            ):
                return original(manager, *args, **kwargs)
            # pytest scans a module's own attributes, and an instance's type's.
            module = isinstance(holder, types.ModuleType)
            scanned = holder if module or inspect.isclass(holder) else type(holder)
            size = len(vars(holder)) if module else sum(len(vars(c)) for c in scanned.__mro__)
            entry = memo.found.get(id(scanned))
            # An instance's fixtures are bound to it: only "none" replays there.
            it, count, registrations = entry or (None, -1, [])
            if it is scanned and count == size and (module or not registrations):
                for registered in registrations:
                    manager._register_fixture(**registered, node=node)
                return None
            if not memo.recording:
                return original(manager, *args, **kwargs)
            calls: list[dict[str, Any]] = []
            register = manager._register_fixture

            def recording(**fields: Any) -> Any:
                calls.append({k: v for k, v in fields.items() if k != "node"})
                return register(**fields)

            manager._register_fixture = recording
            try:
                result = original(manager, *args, **kwargs)
            finally:
                del manager._register_fixture
            memo.found[id(scanned)] = (scanned, size, calls)
            return result

        self.cls.parsefactories = parsefactories
        return True

    def stop_recording(self) -> None:
        self.recording = False


class PluginScanMemo:
    """What pluggy and pytest read of a plugin *module* when a plugin manager
    registers it (which of its names are hooks, with which options) and of a
    hook function (its argument names), kept by the base runner for the real
    run: each new ``Config`` scans every name of every plugin again, ~0.3 s
    of a collection in a restored VM's cold QEMU, though a module imported
    before the snapshot cannot have changed.

    An answer is kept per module object and name, and used only while the
    module has as many attributes as when it was kept (a module that changed is
    read again); classes and instances, whose lookups can bind or run
    descriptors, always go to the original code. The hook options are copied
    out (pluggy completes them in place). Whatever of this a pluggy or pytest
    version lacks is left alone. A memoized answer does not repeat pytest's
    deprecation warning for an old-style hook mark; the host's run gives it.
    """

    def __init__(self) -> None:
        # id(module) -> (module, its attribute count, {(what, name): answer})
        self.answers: dict[int, tuple[Any, int, dict[tuple[str, str], Any]]] = {}
        self.arguments: dict[Any, Any] = {}  # function -> varnames(function)

    def _module_answer(self, what: str, module: Any, name: str, compute: Any) -> Any:
        size = len(vars(module))
        entry = self.answers.get(id(module))
        if entry is None or entry[0] is not module or entry[1] != size:
            entry = (module, size, {})
            self.answers[id(module)] = entry
        table = entry[2]
        key = (what, name)
        if key not in table:
            table[key] = compute()
        return table[key]

    def install(self) -> None:
        import types

        import pluggy._impl
        import pluggy._manager
        from _pytest.config import PytestPluginManager

        memo = self

        def copied(opts: Any) -> Any:
            return None if opts is None else dict(opts)

        for method in ("parse_hookimpl_opts", "parse_hookspec_opts"):
            original = getattr(PytestPluginManager, method, None)
            if original is None:
                continue

            def parse(
                manager: Any, plugin: Any, name: str, _o: Any = original, _m: str = method
            ) -> Any:
                if not isinstance(plugin, types.ModuleType):
                    return _o(manager, plugin, name)
                answer = memo._module_answer(_m, plugin, name, lambda: _o(manager, plugin, name))
                return copied(answer)

            setattr(PytestPluginManager, method, functools.wraps(original)(parse))

        static_hook_attr = getattr(pluggy._manager, "_static_hook_attr", None)
        if static_hook_attr is not None:

            @functools.wraps(static_hook_attr)
            def static_attr(obj: Any, name: str) -> Any:
                if not isinstance(obj, types.ModuleType):
                    return static_hook_attr(obj, name)
                return memo._module_answer("attr", obj, name, lambda: static_hook_attr(obj, name))

            pluggy._manager._static_hook_attr = static_attr

        varnames = getattr(pluggy._impl, "varnames", None)
        if varnames is not None:

            @functools.wraps(varnames)
            def arguments(func: Any, **kwargs: Any) -> Any:
                # A plain function's names come from its code and defaults
                # only; anything else (methods, wrapped callables) is read anew.
                plain = isinstance(func, types.FunctionType) and not hasattr(func, "__wrapped__")
                if kwargs or not plain:
                    return varnames(func, **kwargs)
                key = (func, func.__code__, func.__defaults__)
                if key not in memo.arguments:
                    memo.arguments[key] = varnames(func)
                return memo.arguments[key]

            pluggy._impl.varnames = arguments  # type: ignore[attr-defined]


def excluded_plugins(args: list[str] | tuple[str, ...]) -> list[str]:
    """The ``-p no:NAME`` values in ``args``, read as pytest's ``get_config``
    reads them (``consider_preparse`` with ``exclude_only``): all it takes from
    its arguments besides recording them.
    """
    found: list[str] = []
    i = 0
    while i < len(args):
        opt = args[i]
        i += 1
        if opt == "-p":
            if i == len(args):
                break
            value = args[i]
            i += 1
        elif opt.startswith("-p"):
            value = opt[2:]
        else:
            continue
        if value.strip().startswith("no:"):
            found.append(value.strip())
    return found


class PreparedConfig:
    """pytest's ``get_config`` for a run's arguments, done before the run starts:
    a new plugin manager with pytest's default plugins registered and their
    options added, 0.2-0.3 s of a restored VM's cold start, none of it reading
    a file of the project. The base runner makes one before its snapshot for a
    run that leaves out no plugin and one for the plugins the run that built it
    left out (``--base CONTROL -pno:NAME...``), and one for a go request with
    ``prepare`` (sent while the host copies the project in) whose arguments
    leave out others. The real run's ``get_config`` returns the one whose
    excluded plugins (:func:`excluded_plugins`) are the run's, if its ``prog``
    is the same, with the run's own invocation parameters (:func:`use_prepared`);
    otherwise, or once used, pytest's own ``get_config`` runs.
    """

    def __init__(self, args: tuple[str, ...]) -> None:
        import inspect

        import _pytest.config

        self.excluded = excluded_plugins(args)
        self.module: Any = _pytest.config
        self.original: Any = _pytest.config.get_config
        # As pytest.main calls it (pytest >= 8.4 names its parser's prog).
        takes_prog = "prog" in inspect.signature(self.original).parameters
        self.kwargs = {"prog": "pytest.main()"} if takes_prog else {}
        self.config: Any = self.original(list(args), **self.kwargs)

    @classmethod
    def make(cls, args: tuple[str, ...]) -> PreparedConfig | None:
        """None when pytest fails here: the real run's own ``get_config`` then
        fails the same way, and reports it as a run does.
        """
        try:
            return cls(args)
        except Exception:
            return None

    def serves(self, args: list[str] | tuple[str, ...]) -> bool:
        """Whether a run with ``args`` can take this config: the same exclusions."""
        return excluded_plugins(args) == self.excluded


def use_prepared(configs: list[PreparedConfig]) -> None:
    """Make pytest's next ``get_config`` call (once) return the first of
    ``configs`` that serves its arguments, else run pytest's own."""
    if not configs:
        return
    module, original = configs[0].module, configs[0].original

    @functools.wraps(original)
    def get_config(args: Any = None, plugins: Any = None, **kwargs: Any) -> Any:
        module.get_config = original
        for prepared in configs:
            if kwargs == prepared.kwargs and prepared.serves(list(args or ())):
                config = prepared.config
                config.invocation_params = type(config.invocation_params)(
                    args=args or (), plugins=plugins, dir=pathlib.Path.cwd()
                )
                return config
        return original(args, plugins, **kwargs)

    module.get_config = get_config


class _Attach:
    """Registers the runner's server plugin once pytest has parsed its options
    (and so loaded its plugins): the metadata memo, if any, is done then.
    """

    def __init__(self, control: str, memo: MetadataMemo | None = None) -> None:
        self.control = control
        self.memo = memo

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> None:
        if self.memo is not None:
            self.memo.uninstall()
        from pytest_microsandbox.guest import runner

        runner.attach(config, self.control)


def prewarm() -> None:
    """Run pytest once, collecting an empty directory: what a first run costs
    beyond imports (plugin registration, entry-point scans, hook calls) is paid
    here, before the base snapshot, instead of in every project's zygote.
    """
    empty = tempfile.mkdtemp(prefix="msb-warm-")
    try:
        # With the plugins a run has by default (the cache's too), so that the
        # memos know what each of their classes holds.
        pytest.main([empty, "--co", "-q", f"--rootdir={empty}"])
    except BaseException:  # a plugin failing here fails again, visibly, in the real run
        traceback.print_exc()
    finally:
        shutil.rmtree(empty, ignore_errors=True)


def run(control: str, args: list[str], memo: MetadataMemo | None = None) -> int:
    """pytest with ``args``, serving the host from its run loop (see the runner)."""
    os.makedirs(control, exist_ok=True)
    try:
        code = int(pytest.main(args, plugins=[_Attach(control, memo)]))
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        if memo is not None:
            memo.uninstall()
    from pytest_microsandbox.guest import runner

    # pytest.main returned: the loop never started (usage error, a conftest that
    # failed, an internal error); what pytest printed is in the runner's log.
    runner.stopped(control, code)
    return code


def fresh_log() -> None:
    """Start the runner's log over (its stdout and stderr: one regular file,
    ``>log 2>&1``) for the run a go request starts: the base's warm-up and the
    earlier kept runs wrote there first, and the host shows the log's tail as a
    failed run's output. Left alone when stdout is anything else.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if not stat.S_ISREG(os.fstat(1).st_mode):
            return
        os.ftruncate(1, 0)
        os.lseek(1, 0, os.SEEK_SET)  # stderr's too: the same open file
    except OSError:
        pass


#: Open for as long as the handler may write to it (faulthandler needs that).
_stacks_file: Any = None


def dump_stacks_on_request(control: str) -> None:
    """On SIGUSR1, write every thread's Python stack to ``control``/stacks (the
    host's ``STACKS``): the host sends it when the runner takes too long to start
    or collect (a conftest or an import that hangs in the guest) and shows where
    it was. A file of its own, because pytest captures fd 2 while it collects.
    The runner removes the handler once it has collected, before any test runs.
    """
    global _stacks_file
    os.makedirs(control, exist_ok=True)
    _stacks_file = open(os.path.join(control, "stacks"), "a")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=_stacks_file, all_threads=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--base":
        control, excluding = argv[1], tuple(argv[2:])
        dump_stacks_on_request(control)
        memo = MetadataMemo()
        memo.install()
        fixtures = FixtureScanMemo()
        fixtures.install()
        PluginScanMemo().install()
        start_dir = os.getcwd()
        prewarm()
        fixtures.stop_recording()
        # Before the snapshot: for a run that leaves out no plugin (most do),
        # and for one that leaves out what the run that built this base did;
        # a prepare request for other arguments adds its own.
        made = [PreparedConfig.make(()), PreparedConfig.make(excluding) if excluding else None]
        prepared = [config for config in made if config is not None]
        from pytest_microsandbox.guest import runner

        request = runner.wait_for_go(control)
        while request is not None and request.prepare:
            args = request.args
            if not any(config.serves(args) for config in prepared):
                config = PreparedConfig.make(args)
                prepared += [config] if config is not None else []
            request = runner.read_go(control)

        def start(go: Go) -> int:
            """The run ``go`` asks for, in this process."""
            use_prepared(prepared)  # a kept run's child: its own copies
            fresh_log()
            return run(control, runner.enter(go, start_dir), memo)

        def fork(populate: bool) -> runner.KeptRun:
            forked = runner.KeptRun.spare(control, populate)
            if isinstance(forked, runner.KeptRun):
                return forked
            code = start(forked)  # the child
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

        # Kept warm (--sandbox-keep-warm): each run in a child of this process,
        # which stays pristine (never collects) for the next run's go request;
        # once a run has ended the next run's child is forked and made ready.
        running: runner.KeptRun | None = None
        spare: runner.KeptRun | None = None
        while request is None or request.keep:
            if running is not None:
                running.end()
                running = None
            if request is not None:
                running = spare or fork(populate=False)
                spare = None
                while not running.start(request):
                    running = fork(populate=False)
            elif spare is None:
                spare = fork(populate=True)
            request = runner.read_go(control)
        for child in (running, spare):
            if child is not None:
                child.end()
        return start(request)
    if not argv:
        print(
            "usage: bootstrap.py CONTROL [pytest args] | --base CONTROL [-pno:NAME ...]",
            file=sys.stderr,
        )
        return 2
    dump_stacks_on_request(argv[0])
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
