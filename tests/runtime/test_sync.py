"""The blocking facade cannot drift from the async API it wraps.

``sync.py`` declares its methods by hand (a generated facade would lose the
signatures type checkers and IDEs show), so this test holds every public
method of the async classes to a twin with the same parameters: names, kinds
and defaults.
"""

from __future__ import annotations

import inspect

import pytest

from pytest_microsandbox.runtime._remote import RemoteSandbox, RemoteSandboxFs
from pytest_microsandbox.runtime.pty import PtySession
from pytest_microsandbox.runtime.sandbox import ExecHandle, Sandbox, SandboxFs
from pytest_microsandbox.runtime.sync import (
    SyncExecHandle,
    SyncPtySession,
    SyncRemoteSandbox,
    SyncRemoteSandboxFs,
    SyncSandbox,
    SyncSandboxFs,
)

#: Async-only by nature, each with the reason.
ASYNC_ONLY = {
    (Sandbox, "open_channel"): "returns an anyio byte stream, usable only on the loop",
    (Sandbox, "from_session"): "takes a provisioner's session, whose objects live on the loop",
    (Sandbox, "session"): "the session's agent client and monitor are usable only on the loop",
    (RemoteSandbox, "open_channel"): "returns an anyio byte stream, usable only on the loop",
    (RemoteSandbox, "open"): "a constructor from a store row; SyncRemoteSandbox wraps its result",
    (PtySession, "aclose"): "the blocking twin's is close() (leaving `with` calls it too)",
}

PAIRS = [
    (Sandbox, SyncSandbox),
    (SandboxFs, SyncSandboxFs),
    (ExecHandle, SyncExecHandle),
    (RemoteSandbox, SyncRemoteSandbox),
    (RemoteSandboxFs, SyncRemoteSandboxFs),
    (PtySession, SyncPtySession),
]


def _public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


def _params(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    skip = ("self", "cls")
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name not in skip]


@pytest.mark.parametrize(("async_cls", "sync_cls"), PAIRS, ids=lambda c: c.__name__)
def test_every_async_method_has_a_sync_twin_with_the_same_parameters(async_cls, sync_cls):
    sync_members = _public(sync_cls)
    for name, member in _public(async_cls).items():
        if (async_cls, name) in ASYNC_ONLY:
            continue
        assert name in sync_members, f"{sync_cls.__name__} lacks {name} of {async_cls.__name__}"
        twin = sync_members[name]
        if isinstance(member, property):
            assert isinstance(twin, property), f"{sync_cls.__name__}.{name} is not a property"
            continue
        assert _params(twin) == _params(member), (
            f"{sync_cls.__name__}.{name}{inspect.signature(twin)} differs from "  # type: ignore[arg-type]
            f"{async_cls.__name__}.{name}{inspect.signature(member)}"  # type: ignore[arg-type]
        )


def test_the_async_only_list_names_real_members():
    for cls, name in ASYNC_ONLY:
        assert hasattr(cls, name), f"{cls.__name__}.{name} is gone: drop it from ASYNC_ONLY"
