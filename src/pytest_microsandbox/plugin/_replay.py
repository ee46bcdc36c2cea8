"""Report replay: what the guest runner answered for a test, handed to the host's
pytest hooks (``pytest_runtest_logreport``, ``pytest_warning_recorded``) as if
the test had run here, so the terminal, junitxml and other plugins see what a
local run produces.

Only validated messages get here (``_channel.ExchangeValidator``); a report
pytest cannot rebuild is one more protocol violation, and after a violation
nothing the guest sent for the test is shown: the test fails with the violation.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from ..guest.messages import GuestWarning, Message, Report
from ._channel import ReportProtocolError

if TYPE_CHECKING:
    from ..runtime import SandboxConfig

__all__ = ["Outcome", "replay"]


@dataclass
class Outcome:
    """What running one test in a guest produced."""

    messages: list[Message] = field(default_factory=list)  # validated
    error: str | None = None  # crash or timeout: why, with the console tail
    violation: str | None = None  # the answer broke the protocol: nothing is replayed
    console: str = ""
    sandbox_name: str = ""
    kept: str | None = None  # what --sandbox-keep-failed did with the VM
    network_events: str = ""  # the sandbox's network log, for a failed test

    @property
    def failed(self) -> bool:
        if self.error is not None or self.violation is not None:
            return True
        return any(isinstance(m, Report) and m.outcome == "failed" for m in self.messages)


def replay(item: pytest.Item, config: SandboxConfig, outcome: Outcome, start: float) -> None:
    """Fire the item's report and warning hooks for ``outcome`` (``start``: when the
    test started, ``time.time()``); ``config`` is the sandbox's, for the failure
    sections. A report pytest cannot load sets ``outcome.violation``.
    """
    reports: list[pytest.TestReport] = []
    if outcome.violation is None:
        try:
            reports = [_load(item, m) for m in outcome.messages if isinstance(m, Report)]
        except ReportProtocolError as exc:
            outcome.violation = exc.message
    if outcome.violation is not None:
        _fail(item, config, outcome, start, outcome.violation)
        return
    loaded = iter(reports)
    for message in outcome.messages:
        if isinstance(message, Report):
            report = next(loaded)
            if report.failed:
                _add_sections(report, config, outcome)
            item.ihook.pytest_runtest_logreport(report=report)
        elif isinstance(message, GuestWarning):
            _replay_warning(item, message)
    if outcome.error is not None:
        _fail(item, config, outcome, start, outcome.error)


def _load(item: pytest.Item, message: Report) -> pytest.TestReport:
    """The pytest report of a validated message.

    :raises ReportProtocolError: pytest cannot rebuild a report from it.
    """
    data = dict(message.data)
    _retuple(data)
    config = item.config
    try:
        report = config.hook.pytest_report_from_serializable(config=config, data=data)
    except Exception as exc:
        raise ReportProtocolError(
            f"a {message.when!r} report for {item.nodeid} that pytest cannot load "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if (
        not isinstance(report, pytest.TestReport)
        or report.nodeid != item.nodeid
        or report.when != message.when
    ):
        raise ReportProtocolError(
            f"a {message.when!r} report for {item.nodeid} that pytest loads as {report!r}"
        )
    report.location = item.location  # the host's, not what the guest says
    if message.subtest:
        _keep_subtest_kwargs(report, data)
    return report


def _keep_subtest_kwargs(report: pytest.TestReport, data: dict[str, Any]) -> None:
    """Undo a second ``repr`` of a subtest's parameters.

    pytest's ``SubtestContext`` turns every parameter into its ``saferepr`` when
    it is built, including when a serialized report is loaded, so ``i=1`` would
    show as ``i='1'`` (xdist shows the same). The guest already sent the reprs:
    put them back as they were sent.
    """
    sent = data.get("_subtest.context")
    context = getattr(report, "context", None)
    if not isinstance(sent, dict) or context is None:
        return
    kwargs = sent.get("kwargs")
    if isinstance(kwargs, dict) and all(isinstance(v, str) for v in kwargs.values()):
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(context, "kwargs", dict(kwargs))


def _retuple(data: dict[str, Any]) -> None:
    """JSON turned the tuples pytest expects (skip longrepr, location) into lists."""
    for key in ("longrepr", "location"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])


def _fail(
    item: pytest.Item, config: SandboxConfig, outcome: Outcome, start: float, why: str
) -> None:
    longrepr = why
    if outcome.console:
        longrepr += "\n--- guest console (last lines) ---\n" + outcome.console
    report = pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords={k: 1 for k in item.keywords},
        outcome="failed",
        longrepr=longrepr,
        when="call",
        duration=time.time() - start,
        start=start,
        stop=time.time(),
    )
    _add_sections(report, config, outcome)
    item.ihook.pytest_runtest_logreport(report=report)


def _add_sections(report: pytest.TestReport, config: SandboxConfig, outcome: Outcome) -> None:
    if outcome.console:
        report.sections.append(("guest console", outcome.console))
    if outcome.network_events:
        report.sections.append(("sandbox network events", outcome.network_events))
    summary = config.model_dump(mode="json", exclude={"name"})
    summary["sandbox"] = outcome.sandbox_name
    report.sections.append(("sandbox config", json.dumps(summary, indent=1, default=str)))
    if outcome.kept:
        report.sections.append(("sandbox kept", outcome.kept))


def _replay_warning(item: pytest.Item, w: GuestWarning) -> None:
    # Only a category the host has already imported: the guest must not make the
    # host import a module of its choosing.
    category: type[Warning] = UserWarning
    module = sys.modules.get(w.category_module)
    found = getattr(module, w.category_name, None) if module is not None else None
    if isinstance(found, type) and issubclass(found, Warning):
        category = found
    try:
        message: Warning = category(w.message)
    except Exception:
        message = UserWarning(w.message)
    wm = warnings.WarningMessage(message, category, w.filename, w.lineno)
    item.ihook.pytest_warning_recorded.call_historic(
        kwargs={
            "warning_message": wm,
            "when": w.when,
            "nodeid": item.nodeid,
            "location": None,
        }
    )
