"""The pytest plugin (entry point ``pytest11: microsandbox``).

This module is what pytest loads: it adds the options, ini keys and hooks, and
its ``pytest_configure`` registers the plugin object (:class:`MicrosandboxPlugin`
in ``_hooks``), which holds the session's state and implements the hooks: the
header and summary, the run-in-guest protocol of marked tests, the failure
sections. The fixtures (``sandbox``, ``sandbox_factory``, ``worker_sandbox``)
are defined in ``_fixtures`` and found here by pytest.

Modules: ``_options`` (options, ini keys, the marker, resolved to settings),
``_hooks`` (the plugin object), ``_fixtures``, ``_backend`` (can a sandbox run
here), ``_runner`` (the host side of the guest runner: plans and the exchange),
``_channel`` (the validator of the runner's answers), ``_replay`` (answers to
pytest hooks), ``_zygote`` (the snapshots marked tests start from), ``_keep``
(``--sandbox-keep-failed``), ``_stats``. The runner itself is
:mod:`pytest_microsandbox.guest`; the protocol is ``docs/runner-protocol.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ._fixtures import (
    SandboxFactory,
    _worker_sandbox_snapshot,
    sandbox,
    sandbox_factory,
    worker_sandbox,
    worker_sandbox_setup,
)
from ._hooks import PLUGIN_KEY, PLUGIN_NAME, MicrosandboxPlugin
from ._options import MARKER_DOC, NO_SANDBOX_MARKER_DOC, add_options, resolve_settings
from ._timings import check_timings_path

__all__ = [
    "MicrosandboxPlugin",
    "SandboxFactory",
    "pytest_addhooks",
    "pytest_addoption",
    "pytest_cmdline_main",
    "pytest_configure",
    "sandbox",
    "sandbox_factory",
    "worker_sandbox",
    "worker_sandbox_setup",
]

_ = _worker_sandbox_snapshot  # a fixture: pytest finds it in this module's namespace


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Register this plugin's hooks (see :mod:`pytest_microsandbox.hookspec`)."""
    from .. import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--sandbox-cache``: print what the cache holds and exit, as ``--markers`` does."""
    if not config.getoption("sandbox_cache", default=False):
        return None
    from _pytest.config import create_terminal_writer  # what --markers writes with

    from ._cachereport import cache_report

    cache = config.getoption("sandbox_cache_dir", default=None) or config.getini(
        "sandbox_cache_dir"
    )
    writer = create_terminal_writer(config)
    for line in cache_report(Path(str(cache)).expanduser() if cache else None):
        writer.line(line)
    return 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    config.addinivalue_line("markers", NO_SANDBOX_MARKER_DOC)
    check_timings_path()
    plugin = MicrosandboxPlugin(config, resolve_settings(config))
    config.stash[PLUGIN_KEY] = plugin
    config.pluginmanager.register(plugin, PLUGIN_NAME)
