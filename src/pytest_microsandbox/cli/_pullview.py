"""The progress of ``microsandbox image pull``: the runtime's pull and layer
stages (:class:`~..runtime.progress.BuildEvent`) as a progress bar on a
terminal, or as plain lines (a log, a pipe).

On a terminal one line is redrawn in place: the stage under way, a bar of
its units done (bytes of the blob downloading, layers converted), and the
layers being converted meanwhile; a finished stage leaves one line. Elsewhere
each stage writes a line when it starts and one when it ends. Written by hand
rather than with a progress-bar library: one redrawn line is all it takes.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

from ..runtime.progress import BuildEvent
from ._attach import terminal_size
from ._common import human_bytes

__all__ = ["PullView"]

#: Seconds between two redraws of the bar (events come once per MiB).
_REDRAW_S = 0.1
_BAR = 24


class PullView:
    """Listens to progress events and draws them on ``out`` (thread-safe:
    layer conversions report from worker threads).
    """

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self._lock = threading.Lock()
        self._active: dict[int, BuildEvent] = {}  # id -> latest event, in start order
        self._drawn = 0.0
        self._showing = False

    def __call__(self, event: BuildEvent) -> None:
        with self._lock:
            if event.state in ("start", "step"):
                # A step keeps the stage's place (insertion order) in the dict.
                self._active[event.id] = event
            else:
                self._active.pop(event.id, None)
            if self.live:
                self._live(event)
            else:
                self._plain(event)

    def close(self) -> None:
        with self._lock:
            self._active.clear()
            self._erase()

    # -- plain lines ---------------------------------------------------------------------------

    def _plain(self, event: BuildEvent) -> None:
        doing = "pulling" if event.kind == "pull" else "building"
        if event.state == "start":
            self._write(f"{doing} {event.what} ...")
        elif event.state == "done":
            size = f", {human_bytes(event.size)}" if event.size is not None else ""
            self._write(f"done {event.what} in {event.elapsed:.1f} s{size}")
        elif event.state == "failed":
            self._write(f"failed {doing} {event.what} after {event.elapsed:.1f} s: {event.error}")

    def _write(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- the bar -------------------------------------------------------------------------------

    def _live(self, event: BuildEvent) -> None:
        if event.state in ("done", "failed") and event.kind == "pull":
            self._erase()
            size = f", {human_bytes(event.size)}" if event.size is not None else ""
            verb = "pulled" if event.state == "done" else "failed"
            self._write(f"{verb} {event.what} in {event.elapsed:.1f} s{size}")
        now = time.monotonic()
        # Throttled, except the last step of a unit (a blob's final byte count).
        if event.state == "step" and now - self._drawn < _REDRAW_S and event.done != event.total:
            return
        if self._active:
            self._draw()
            self._drawn = now
        else:
            self._erase()

    def _line(self) -> str:
        events = list(self._active.values())
        pulls = [e for e in events if e.kind == "pull"]
        head = pulls[-1] if pulls else events[-1]
        text = head.what
        if head.total:
            share = min(1.0, (head.done or 0) / head.total)
            filled = int(share * _BAR)
            text += f" [{'#' * filled}{'.' * (_BAR - filled)}] {share * 100:3.0f}%"
        if head.step:
            text += f" {head.step}"
        layers = sum(1 for e in events if e.kind == "layer")
        if layers:
            text += f" ({layers} converting)"
        return text

    def _draw(self) -> None:
        # The terminal's own width: $COLUMNS may be an outer program's (a CI runner's).
        width = max(20, terminal_size()[1] - 1)
        self.out.write("\r\x1b[K" + self._line()[:width])
        self.out.flush()
        self._showing = True

    def _erase(self) -> None:
        if self._showing:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._showing = False
