"""The runtime object: what outlives a single call, owned in one place.

A :class:`Runtime` owns, through one anyio task group, the background work of
sandboxes (each agent client's reader, the pool's pre-starts) and the
long-lived resources that layers above register with it (the snapshot layer's
pools of pre-started VMs), and it knows every VM started through it, so that
closing it leaves nothing running.

Use one explicitly (``async with Runtime():`` around your sandboxes), or let
the first sandbox of an event loop start that loop's **default runtime**: it
runs in a task of its own and closes when that task is cancelled, which
``asyncio.run``/``anyio.run`` do to every task left when the main one
returns, and which the process's portal thread (``_portal.py``) does at exit.
The default runtimes, one per event loop, are this module's documented state;
:func:`_kill_all_at_exit` is the last resort for a loop that was never shut
down (QEMU also dies with its owner: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc

from .backend import VMHandle

__all__ = ["Runtime", "RuntimeResource", "current_runtime"]

R = TypeVar("R", bound="RuntimeResource")

_log = logging.getLogger(__name__)


class RuntimeResource(Protocol):
    """Something a runtime closes when it closes (a pool of pre-started VMs)."""

    async def aclose(self) -> None:
        """Release everything; called once, shielded from cancellation."""

    def close_now(self) -> None:
        """Release what can be released without awaiting (the loop is gone)."""


class Runtime:
    """Owns the background tasks, resources and VMs of the sandboxes using it."""

    def __init__(self) -> None:
        self._tg: anyio.abc.TaskGroup | None = None
        self._resources: dict[Hashable, RuntimeResource] = {}
        self._vms: set[VMHandle] = set()
        self._closed = False
        self._token: contextvars.Token[Runtime | None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: The task a default runtime lives in (held: the loop keeps only weak references).
        self.owner: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Runtime:
        if self._tg is not None or self._closed:
            raise RuntimeError("a Runtime is entered once")
        self.loop = asyncio.get_running_loop()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._token is not None:
            with contextlib.suppress(ValueError):  # left in another context
                _current.reset(self._token)
            self._token = None
        self._closed = True
        assert self._tg is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._close_resources()
                # Sandboxes never stopped: killed and reaped while the loop runs.
                for vm in list(self._vms):
                    with contextlib.suppress(Exception):
                        await vm.kill()
                self._vms.clear()
        finally:
            # What is left (agent readers of sandboxes never stopped) is cancelled.
            self._tg.cancel_scope.cancel()
            try:
                suppress = await self._tg.__aexit__(exc_type, exc, tb)
            finally:
                self.kill_now()
        return suppress

    async def _close_resources(self) -> None:
        resources, self._resources = list(self._resources.values()), {}
        for resource in reversed(resources):
            try:
                await resource.aclose()
            except Exception:
                _log.exception("closing %r failed", resource)

    # -- for the layers that use it ----------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background, in this runtime's task group; an
        exception it raises is logged, never propagated.

        :raises RuntimeError: the runtime is not entered or already closed.
        """
        if self._tg is None or self._closed:
            raise RuntimeError("the runtime is closed")

        async def run() -> None:
            try:
                await fn(*args)
            except Exception:
                _log.exception("background task %r failed", fn)

        self._tg.start_soon(run)

    def resource(self, key: Hashable, factory: Callable[[], R]) -> R:
        """The resource registered under ``key``, made by ``factory`` on first use."""
        found = self._resources.get(key)
        if found is None:
            found = self._resources[key] = factory()
        return found  # type: ignore[return-value]

    async def close_resources(self, kind: Hashable) -> None:
        """Close and unregister the resources whose key is a tuple starting with ``kind``."""
        for key in [k for k in self._resources if isinstance(k, tuple) and k[:1] == (kind,)]:
            resource = self._resources.pop(key)
            with anyio.CancelScope(shield=True):
                await resource.aclose()

    def drop_resource(self, key: Hashable) -> RuntimeResource | None:
        """Unregister and return the resource under ``key`` (the caller closes it)."""
        return self._resources.pop(key, None)

    def track(self, vm: VMHandle) -> Callable[[], None]:
        """Remember ``vm`` until the returned callable is called (when it is
        stopped): a runtime that closes kills the VMs it still knows.
        """
        self._vms.add(vm)
        return lambda: self._vms.discard(vm)

    def kill_now(self) -> None:
        """Kill every VM and resource without awaiting (the loop is gone)."""
        for resource in list(self._resources.values()):
            with contextlib.suppress(Exception):
                resource.close_now()
        self._resources.clear()
        for vm in list(self._vms):
            with contextlib.suppress(Exception):
                vm.kill_now()
        self._vms.clear()


_current: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "pytest_microsandbox_runtime", default=None
)
#: The default runtime of each event loop that has needed one.
_defaults: dict[asyncio.AbstractEventLoop, Runtime] = {}
#: Default runtimes made but not entered yet, and the event set once they are.
_entering: dict[Runtime, anyio.Event] = {}


async def current_runtime() -> Runtime:
    """The runtime entered in this context, else this event loop's default one
    (started on first use).
    """
    runtime = _current.get()
    if runtime is not None and not runtime.closed:
        return runtime
    loop = asyncio.get_running_loop()
    runtime = _defaults.get(loop)
    if runtime is not None and not runtime.closed:
        entering = _entering.get(runtime)
        if entering is not None:
            # Another task of this loop is starting it: a runtime not entered yet
            # refuses work (spawn raises), so wait until its owner entered it.
            await entering.wait()
            if runtime.closed or _defaults.get(loop) is not runtime:
                raise RuntimeError("the default runtime closed while it started")
        return runtime
    _forget_closed_loops()
    runtime = Runtime()
    _defaults[loop] = runtime
    started = _entering[runtime] = anyio.Event()

    async def own() -> None:
        try:
            async with runtime:
                _entering.pop(runtime, None)
                started.set()
                await anyio.sleep_forever()
        finally:
            started.set()
            _entering.pop(runtime, None)
            if _defaults.get(loop) is runtime:
                del _defaults[loop]

    # The owner task is deliberately not in a task group: it lives as long as
    # the loop, and the loop's shutdown cancelling it is what closes the runtime.
    runtime.owner = loop.create_task(own(), name="pytest-microsandbox default runtime")
    await started.wait()
    return runtime


def _forget_closed_loops() -> None:
    """Kill what the default runtimes of closed loops left (a loop closed
    without cancelling its tasks never ran their shutdown).
    """
    for loop, runtime in list(_defaults.items()):
        if loop.is_closed():
            del _defaults[loop]
            runtime.kill_now()


def _kill_all_at_exit() -> None:
    for runtime in list(_defaults.values()):
        runtime.kill_now()
    _defaults.clear()


atexit.register(_kill_all_at_exit)
