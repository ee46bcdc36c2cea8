"""Build progress on the terminal: the runtime's :class:`~..runtime.progress.BuildEvent`
stream rendered for a person.

On a terminal, one live status line names every stage under way (a zygote
build, the base zygote it needs, the template that boots, the layer being
imaged), what the innermost one does now and for how long; each finished
top-level stage leaves one line. Elsewhere (a CI log) each stage writes one
plain line when it starts, so a long wait is never silent. Quiet under ``-q``
and in xdist workers (whose output nobody sees; the summary counts their builds).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ..runtime.progress import BuildEvent

__all__ = ["ProgressView", "describe_size"]

#: Seconds between updates of the live line while nothing else happens.
_TICK = 0.5


def _verbs(kind: str) -> tuple[str, str, str]:
    """(doing, done, failed to) for a kind of stage: an image is pulled, the rest built."""
    if kind == "pull":
        return "pulling", "pulled", "failed to pull"
    return "building", "built", "failed to build"


def describe_size(size: int | None) -> str:
    if size is None:
        return ""
    if size >= 1 << 30:
        return f", {size / (1 << 30):.1f} GiB"
    return f", {size / (1 << 20):.1f} MiB"


class ProgressView:
    """Renders build events on pytest's terminal reporter (thread-safe: events
    come from the event-loop thread and worker threads).
    """

    def __init__(
        self,
        terminal: Any,
        live: bool,
        uncaptured: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self.terminal = terminal
        self.live = live
        # A pull or build inside a test (sandbox_factory) reports while pytest
        # captures the test's output: the capture manager's
        # global_and_fixture_disabled, as live logging does, gets it to the screen.
        self._uncaptured = uncaptured
        self._lock = threading.Lock()
        self._active: dict[int, BuildEvent] = {}  # id -> latest event, in start order
        self._steps: dict[int, str] = {}
        self._started: dict[int, float] = {}  # id -> its start on our clock
        self._showing = False  # the live line is on screen
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def __call__(self, event: BuildEvent) -> None:
        with self._lock:
            if event.state in ("start", "step"):
                self._active[event.id] = event
                self._started.setdefault(event.id, time.monotonic() - event.elapsed)
                if event.step:
                    self._steps[event.id] = event.step
            else:
                self._active.pop(event.id, None)
                self._steps.pop(event.id, None)
                self._started.pop(event.id, None)
            with self._uncaptured():
                if self.live:
                    self._live(event)
                else:
                    self._plain(event)

    def close(self) -> None:
        self._stop.set()
        with self._lock, self._uncaptured():
            self._active.clear()
            self._erase()

    # -- plain lines (a log) ---------------------------------------------------------------------

    def _plain(self, event: BuildEvent) -> None:
        doing = _verbs(event.kind)[0]
        # xdist's progress dots leave the line open without telling the reporter
        # (its ensure_newline does not know): start a line of our own.
        opened = getattr(self.terminal._tw, "width_of_current_line", 0)
        if event.state in ("start", "failed") and opened:
            self.terminal._tw.line()
        if event.state == "start":
            self.terminal.write_line(f"microsandbox: {doing} {event.what} ...")
        elif event.state == "failed":
            self.terminal.write_line(
                f"microsandbox: {doing} {event.what} failed after {event.elapsed:.1f} s"
            )

    # -- the live line (a terminal) --------------------------------------------------------------

    def _live(self, event: BuildEvent) -> None:
        if event.state in ("done", "failed") and event.parent == 0:
            self._erase()
            _, built, failed = _verbs(event.kind)
            verb = built if event.state == "done" else failed
            self.terminal.write_line(
                f"microsandbox: {verb} {event.what} in {event.elapsed:.1f} s"
                + describe_size(event.size)
            )
        if self._active:
            self._draw()
            if self._ticker is None or not self._ticker.is_alive():
                self._stop.clear()
                self._ticker = threading.Thread(target=self._tick, name="msb-progress", daemon=True)
                self._ticker.start()
        else:
            self._erase()
            self._stop.set()

    def _line(self) -> str:
        events = list(self._active.values())
        now = time.monotonic()
        chain = " > ".join(f"{e.kind} {now - self._started[e.id]:.0f}s" for e in events)
        inner = events[-1]
        step = self._steps.get(inner.id, "")
        doing = _verbs(events[0].kind)[0]
        return f"microsandbox: {doing} {chain}: {inner.what}" + (f" ({step})" if step else "")

    def _draw(self) -> None:
        if not self._showing:
            self.terminal.ensure_newline()
        width = max(20, int(getattr(self.terminal._tw, "fullwidth", 80)) - 1)
        self.terminal.rewrite(self._line()[:width], erase=True)
        self.terminal.flush()
        self._showing = True

    def _erase(self) -> None:
        if self._showing:
            self.terminal.rewrite("", erase=True)
            self.terminal.write_raw("\r", flush=True)
            self._showing = False

    def _tick(self) -> None:
        while not self._stop.wait(_TICK):
            with self._lock:
                if not self._active or not self._showing:
                    return
                with self._uncaptured():
                    self._draw()
