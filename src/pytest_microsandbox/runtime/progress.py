"""Progress of long work: what is being built and how far along it is.

Building a root-filesystem layer, a template or a zygote takes seconds to
minutes under emulation (later: pulling an image). The code doing it reports
:class:`BuildEvent` objects through :func:`stage`; whoever shows progress (the
pytest plugin: a live status line on a terminal, one line per stage in a CI
log) :func:`subscribe` s to them. Nothing here prints.

Listeners are process-wide rather than per call or per context because builds
run in the event-loop thread of the blocking facade and in worker threads, far
from the caller that would want to show them. A listener is called in the
thread that emits, must be quick, and must not raise (an exception is logged
and dropped: progress never breaks a build).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BuildEvent",
    "Listener",
    "Stage",
    "StageKind",
    "stage",
    "step",
    "subscribe",
    "subscribe_progress",
]

logger = logging.getLogger("pytest_microsandbox.progress")

#: What is built: a root-filesystem layer image, a template (a booted VM's
#: snapshot), the plugin's base zygote or zygote, an image pulled from a registry.
StageKind = Literal["layer", "template", "base zygote", "zygote", "pull"]


@dataclass(frozen=True)
class BuildEvent:
    """One thing that happened to a stage of long work.

    ``state``: ``start`` (``what`` names it), ``step`` (``step`` says what it
    does now; ``done``/``total`` count units of it when known), ``done`` (with
    ``size`` in bytes when known) or ``failed`` (``error``). ``elapsed`` is the
    seconds since the stage started; ``id`` is the same for every event of one
    stage, and ``parent`` the id of the stage it runs inside (0: none).
    """

    id: int
    kind: StageKind
    what: str
    state: Literal["start", "step", "done", "failed"]
    elapsed: float = 0.0
    step: str = ""
    done: int | None = None
    total: int | None = None
    size: int | None = None
    error: str = ""
    parent: int = 0


Listener = Callable[[BuildEvent], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
_ids = itertools.count(1)
#: The innermost stage of this task or thread (context variables follow asyncio
#: tasks and anyio's worker threads).
_current: contextvars.ContextVar[Stage | None] = contextvars.ContextVar(
    "msb_progress_stage", default=None
)


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every event from now on; returns the unsubscribe call."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


#: The name the package facade exports.
subscribe_progress = subscribe


def _emit(event: BuildEvent) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # progress must never break the work it reports
            logger.exception("a progress listener failed on %r", event)


class Stage:
    """A stage being reported: :meth:`step` says what it does now; set :attr:`size`
    (bytes built) before it ends to report it.
    """

    def __init__(self, kind: StageKind, what: str, parent: int) -> None:
        self.id = next(_ids)
        self.kind = kind
        self.what = what
        self.parent = parent
        self.started = time.monotonic()
        self.size: int | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _event(self, state: Literal["start", "step", "done", "failed"], **kw: object) -> None:
        _emit(
            BuildEvent(
                id=self.id, kind=self.kind, what=self.what, state=state,
                elapsed=self.elapsed, parent=self.parent, **kw,  # type: ignore[arg-type]
            )
        )  # fmt: skip

    def step(self, text: str, done: int | None = None, total: int | None = None) -> None:
        self._event("step", step=text, done=done, total=total)


@contextmanager
def stage(kind: StageKind, what: str) -> Iterator[Stage]:
    """Report the work in the ``with`` block as one stage: ``start`` now, then
    ``done`` or (the block raised) ``failed``. Usable in async code: it only
    emits events, it never blocks.
    """
    parent = _current.get()
    current = Stage(kind, what, parent.id if parent is not None else 0)
    token = _current.set(current)
    current._event("start")
    try:
        yield current
    except BaseException as exc:
        current._event("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    else:
        current._event("done", size=current.size)
    finally:
        _current.reset(token)


def step(text: str) -> None:
    """Say what the innermost stage of this task or thread does now (nothing
    when no stage is under way): for code deep inside a stage.
    """
    current = _current.get()
    if current is not None:
        current.step(text)
