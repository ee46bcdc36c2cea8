"""What xdist workers tell the controller's terminal while the run goes on.

Under xdist the workers collect and build, and their output goes nowhere; the
person watching sees the controller. xdist only carries its own events from a
worker (``workeroutput`` arrives when the worker ends), so the workers write to
a directory the controller makes and names in ``workerinput``: each worker its
collection counts (every worker collects the same items, so the first file is
the run's) and a JSON line per build event, which a controller thread reads
and hands to the same :class:`~._progress.ProgressView` a single process uses.

The directory lives in the controller's run root (``runtime.paths``): removed
at the end, and by the next run if the controller was killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..runtime.progress import BuildEvent

__all__ = [
    "RELAY_DIR_KEY",
    "RUN_STARTED_KEY",
    "ControllerRelay",
    "WorkerRelay",
    "sandboxed_line",
]

#: The ``workerinput`` key naming the directory the workers write to.
RELAY_DIR_KEY = "microsandbox_relay_dir"
#: The ``workerinput`` key of the run's start (the controller's ``time.time()``):
#: the workers reuse tree walks made since (``runtime.images._walks``).
RUN_STARTED_KEY = "microsandbox_run_started"
#: Seconds between the controller's reads of the workers' event files.
_POLL = 0.2
#: Longest event line read (a longer one is a bug of ours; it is skipped).
_MAX_LINE = 64 * 1024


def sandboxed_line(sandboxed: dict[str, int], on_host: int, total_items: int) -> str:
    """The "N of M tests sandboxed" line after collection."""
    total = sum(sandboxed.values())
    how = ", ".join(f"{n} {level}" for level, n in sorted(sandboxed.items()))
    host = f"; {on_host} on the host" if on_host else ""
    return f"microsandbox: {total} of {total_items} tests sandboxed (isolation: {how}){host}"


def _worker_number(worker_id: str) -> int:
    digits = worker_id.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


class WorkerRelay:
    """A worker's side: writes its counts once and appends every build event."""

    def __init__(self, directory: str, worker_id: str) -> None:
        self.directory = Path(directory)
        self.worker_id = worker_id
        self._lock = threading.Lock()

    def write_counts(self, sandboxed: dict[str, int], on_host: int, total_items: int) -> None:
        data = {"sandboxed": sandboxed, "on_host": on_host, "items": total_items}
        part = self.directory / f"counts-{self.worker_id}.part"
        with contextlib.suppress(OSError):  # the view is a courtesy; never break a run
            part.write_text(json.dumps(data))
            part.rename(self.directory / f"counts-{self.worker_id}.json")

    def __call__(self, event: BuildEvent) -> None:
        line = json.dumps(dataclasses.asdict(event)) + "\n"
        path = self.directory / f"events-{self.worker_id}.jsonl"
        with self._lock, contextlib.suppress(OSError), open(path, "a") as out:
            out.write(line)


class ControllerRelay:
    """The controller's side: the directory, the first worker's counts and a
    thread that replays the workers' build events into ``on_event``.
    """

    def __init__(self, on_event: Callable[[BuildEvent], None]) -> None:
        from ..runtime.paths import make_run_dir

        self.directory = make_run_dir("xdist")
        self._on_event = on_event
        self._offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="msb-xdist", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[dict[str, int], int, int] | None:
        """(sandboxed by isolation, on the host, items) of some worker, or None."""
        for path in sorted(self.directory.glob("counts-*.json")):
            try:
                data = json.loads(path.read_text())
                sandboxed = {str(k): int(v) for k, v in data["sandboxed"].items()}
                return sandboxed, int(data["on_host"]), int(data["items"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._read_all()  # what arrived since the last poll (a failure's last line)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _follow(self) -> None:
        while not self._stop.wait(_POLL):
            self._read_all()

    def _read_all(self) -> None:
        for path in sorted(self.directory.glob("events-*.jsonl")):
            offset = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as src:
                    src.seek(offset)
                    chunk = src.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # a line being written is read next time
            self._offsets[path] = offset + end
            worker = _worker_number(path.stem.removeprefix("events-"))
            for raw in chunk[:end].splitlines():
                event = _decode(raw, worker) if len(raw) <= _MAX_LINE else None
                if event is not None:
                    self._on_event(event)


def _decode(raw: bytes, worker: int) -> BuildEvent | None:
    """A worker's event with ids made unique across workers (0 stays "no parent")."""
    try:
        fields: dict[str, Any] = json.loads(raw)
        offset = (worker + 1) << 32
        fields["id"] = int(fields["id"]) + offset
        fields["parent"] = int(fields["parent"]) + offset if fields.get("parent") else 0
        return BuildEvent(**fields)
    except (ValueError, TypeError, KeyError):
        return None
