"""Per-test timings of the marked-test path, for ``benchmarks/bench_suite.py``.

Off unless ``$MICROSANDBOX_TIMINGS`` names a file by its absolute path (checked
at configure: :func:`check_timings_path`): then the host runner appends
one JSON line per sandboxed test to it (``O_APPEND``, one ``write`` per line, so
xdist workers can share the file). Each line holds host-side step durations,
measured with ``time.monotonic`` around what the runner already does, and the
guest's own phase durations as its reports carry them (``duration`` of the
``setup``, ``call`` and ``teardown`` reports, timed by pytest in the guest):

``nodeid``, ``isolation``,
``plan`` (plan and zygote check), ``start`` (restore a clone, or start this
worker's VM, on this test's path), ``send`` (the request written),
``first`` (request sent -> first answer line), ``exchange`` (request sent ->
``done``), ``replay`` (reports handed to pytest's hooks), ``discard`` (the used
clone's kill handed off, or the worker's VM closed), ``total`` (the whole
``run_item``), ``setup``/``call``/``teardown`` (guest phase durations), and
``guest_span`` (the guest's ``setup`` start to ``teardown`` stop), ``handoff``
(request sent -> the guest's ``setup`` start) and ``tail`` (the guest's
``teardown`` stop -> ``done`` read), these two across the host's and the
guest's wall clocks (the guest's is set from the host's at every restore).

The numbers are for measuring, not for the test's outcome: nothing reads them
back, and a guest can lie about its own durations.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from ..guest.messages import Message, Report

__all__ = ["TIMINGS_ENV", "StepTimer", "check_timings_path", "timer_for"]

TIMINGS_ENV = "MICROSANDBOX_TIMINGS"


def check_timings_path() -> None:
    """:raises pytest.UsageError: ``$MICROSANDBOX_TIMINGS`` is set but not an
    absolute path. A relative one (``=1`` taken for a switch) is a file in the
    current directory, usually the project: it changes the project's layer
    with every test, and every run then rebuilds the project's zygote.
    """
    value = os.environ.get(TIMINGS_ENV)
    if value and not os.path.isabs(value):
        raise pytest.UsageError(
            f"${TIMINGS_ENV} must name the file to append timings to by its absolute "
            f"path, got {value!r} (a relative path lands in the current directory, "
            f"usually the project, and rebuilds its zygote every run); "
            f"e.g. {TIMINGS_ENV}=/tmp/timings.jsonl, or unset it"
        )


@dataclass
class StepTimer:
    """Durations (seconds) of one test's steps, written as one JSON line."""

    path: str
    nodeid: str
    isolation: str
    steps: dict[str, float] = field(default_factory=dict)
    began: float = field(default_factory=time.monotonic)

    def add(self, step: str, seconds: float) -> None:
        self.steps[step] = self.steps.get(step, 0.0) + seconds

    def guest(self, messages: Iterable[Message]) -> None:
        """The guest's phase durations and span, from its reports."""
        first: float | None = None
        last: float | None = None
        for message in messages:
            if not isinstance(message, Report) or message.subtest:
                continue
            data = message.data
            duration, start, stop = data.get("duration"), data.get("start"), data.get("stop")
            if isinstance(duration, (int, float)):
                self.steps[message.when] = float(duration)
            if isinstance(start, (int, float)) and first is None:
                first = float(start)
            if isinstance(stop, (int, float)):
                last = float(stop)
        if first is not None and last is not None:
            self.steps["guest_span"] = last - first
            # Wall clocks, the guest's set from the host's at restore: the hand-off
            # (request sent -> setup started) and the tail (teardown ended -> done
            # read) are estimates, good to a few ms while the clocks agree.
            if "sent_at" in self.steps and "done_at" in self.steps:
                self.steps["handoff"] = first - self.steps.pop("sent_at")
                self.steps["tail"] = self.steps.pop("done_at") - last

    def write(self) -> None:
        self.steps["total"] = time.monotonic() - self.began
        line = json.dumps({"nodeid": self.nodeid, "isolation": self.isolation, **self.steps})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def timer_for(nodeid: str, isolation: str) -> StepTimer | None:
    """A timer for this test when ``$MICROSANDBOX_TIMINGS`` is set, else None."""
    path = os.environ.get(TIMINGS_ENV)
    return StepTimer(path, nodeid, isolation) if path else None
