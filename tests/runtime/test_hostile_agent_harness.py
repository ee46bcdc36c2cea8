"""The hostile-agent harness's reply machinery (``serve`` in tests/hostile_agent/guest.py)
against the real AgentClient over a socketpair: no VM and no takeover, just the rules."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType

import anyio
import anyio.abc
import pytest

from hostile_agent import GUEST_SCRIPT, Rule, dirent, ok, raw, sleep, stat_reply
from pytest_microsandbox.runtime import FilesystemError, GuestTimeoutError, ProtocolError
from pytest_microsandbox.runtime.agent.client import AgentClient
from pytest_microsandbox.runtime.agent.protocol import MsgType
from pytest_microsandbox.runtime.agent.results import FileKind

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def load_guest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hostile_guest", GUEST_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def impersonator(rules: list[Rule]) -> AsyncIterator[AgentClient]:
    guest = load_guest()
    host_end, guest_end = socket.socketpair()

    def serve() -> None:
        with contextlib.suppress(OSError):  # the host hung up mid-reply
            guest.serve(guest_end.fileno(), [r.to_json() for r in rules], stop_at_eof=True)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        stream = await anyio.abc.UNIXSocketStream.from_socket(host_end)
        with anyio.fail_after(20):
            async with AgentClient(stream) as client:
                yield client
    finally:
        host_end.close()
        thread.join(5)
        guest_end.close()
    assert not thread.is_alive()


async def test_default_replies() -> None:
    async with impersonator([]) as client:
        await client.ping()
        with pytest.raises(FilesystemError, match="hostile agent: no rule") as info:
            await client.stat("/x")
        assert info.value.errno == errno.EIO


async def test_rules_match_type_and_path_and_send_scripted_frames() -> None:
    rules = [
        Rule(MsgType.FS_STAT, [stat_reply(FileKind.DIRECTORY)], path="/d"),
        Rule(MsgType.FS_STAT, [stat_reply(FileKind.FILE, size=3)]),
        Rule(MsgType.FS_LIST, [dirent(b"a"), dirent(b"b", FileKind.SYMLINK), ok()]),
    ]
    async with impersonator(rules) as client:
        assert (await client.stat("/d")).is_dir
        assert (await client.stat("/other")).size == 3
        assert [(e.name, e.kind) for e in await client.list_dir("/d")] == [
            ("a", FileKind.FILE),
            ("b", FileKind.SYMLINK),
        ]


async def test_stall_and_huge_frame() -> None:
    rules = [
        Rule(MsgType.FS_STAT, [sleep(1)], path="/slow"),
        Rule(MsgType.FS_STAT, [raw(b"\xff\xff\xff\xff")], path="/huge"),
    ]
    async with impersonator(rules) as client:
        with pytest.raises(GuestTimeoutError):
            await client.stat("/slow", timeout=0.2)
        with pytest.raises(ProtocolError, match="exceeds MAX_FRAME"):
            await client.stat("/huge")
