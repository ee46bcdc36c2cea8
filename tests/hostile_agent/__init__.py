"""Hostile-agent harness: a guest program takes over the agent's port, as guest root
can, and answers the host with scripted replies (names, sizes, frames, timings).

Host side::

    rules = [Rule(MsgType.FS_LIST, [dirent(b"../../escape"), ok()], path="/g")]
    await take_over(sandbox, rules)   # returns once the impersonator owns the port
    ... drive the host API and assert it fails cleanly ...

After a takeover the sandbox's agent is frozen for good: use a fresh sandbox per
hostile test (clones of one template start in a fraction of a second) and let it
be killed. The guest side is ``guest.py`` (self-contained, stdlib + ctypes); the
frames are built here with the project's own codec, so they can be as malformed
as a test wants (``raw``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from pytest_microsandbox.runtime import Sandbox
from pytest_microsandbox.runtime.agent.protocol import (
    Field,
    MsgType,
    Tag,
    bytes_field,
    encode_frame,
    int_field,
)
from pytest_microsandbox.runtime.agent.results import FileKind

__all__ = [
    "GUEST_SCRIPT",
    "READY_MESSAGE",
    "Rule",
    "chunk",
    "dirent",
    "error",
    "ok",
    "raw",
    "sleep",
    "stat_reply",
    "take_over",
]

GUEST_SCRIPT = Path(__file__).with_name("guest.py")
READY_MESSAGE = "hostile-agent: ready"
_GUEST_DIR = "/root/.hostile-agent"

Action = dict[str, Any]


def _frame(type_: MsgType, fields: list[Field], repeat: int = 1) -> Action:
    # Id 0 here; the guest puts the request's id in.
    return {"frame": encode_frame(0, type_, fields).hex(), "repeat": repeat}


def ok(*fields: Field) -> Action:
    """An OK carrying ``fields``."""
    return _frame(MsgType.OK, list(fields))


def error(errno: int, message: str) -> Action:
    return _frame(MsgType.ERROR, [int_field(Tag.ERRNO, errno), bytes_field(Tag.MESSAGE, message)])


def dirent(
    name: bytes | str, kind: FileKind = FileKind.FILE, size: int = 0, mode: int = 0o100644
) -> Action:
    """One FS_LIST entry; ``name`` is sent as given (any bytes)."""
    return _frame(
        MsgType.DIRENT,
        [
            bytes_field(Tag.NAME, name),
            int_field(Tag.KIND, kind),
            int_field(Tag.SIZE, size),
            int_field(Tag.MODE, mode),
            int_field(Tag.MTIME_NS, 0),
        ],
    )


def stat_reply(kind: FileKind, size: int = 0, mode: int = 0o644) -> Action:
    """The OK of an FS_STAT (``mode``: permission bits; the type bits follow ``kind``)."""
    type_bits = {FileKind.DIRECTORY: 0o040000, FileKind.SYMLINK: 0o120000}.get(kind, 0o100000)
    return ok(
        int_field(Tag.KIND, kind),
        int_field(Tag.SIZE, size),
        int_field(Tag.MODE, type_bits | mode),
        int_field(Tag.MTIME_NS, 0),
        int_field(Tag.UID, 0),
        int_field(Tag.GID, 0),
    )


def chunk(data: bytes, repeat: int = 1) -> Action:
    """An FS_CHUNK of ``data``, sent ``repeat`` times."""
    return _frame(MsgType.FS_CHUNK, [bytes_field(Tag.DATA, data)], repeat)


def raw(data: bytes) -> Action:
    """Bytes sent as they are (a malformed or oversized frame)."""
    return {"raw": data.hex()}


def sleep(seconds: float) -> Action:
    return {"sleep": seconds}


@dataclass
class Rule:
    """Answer requests of ``type`` (and guest ``path``, if given) with ``actions``."""

    type: MsgType
    actions: list[Action] = field(default_factory=list)
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": int(self.type),
            "path": None if self.path is None else self.path.encode().hex(),
            "actions": self.actions,
        }


async def take_over(sb: Sandbox, rules: list[Rule], timeout: float = 120.0) -> None:
    """Start the impersonator in ``sb`` and return once it owns the agent's port.

    Deterministic handshake: the impersonator sends a LOG frame only after the
    real agent is frozen and the port is its own; this waits for that LOG in
    the host client's log. Raises AssertionError with the guest's traceback if
    the takeover fails.
    """
    fs = sb.fs()
    await fs.mkdir(_GUEST_DIR)
    await fs.write(f"{_GUEST_DIR}/guest.py", GUEST_SCRIPT.read_text())
    rules_path = f"{_GUEST_DIR}/rules.json"
    await fs.write(rules_path, json.dumps({"rules": [r.to_json() for r in rules]}))
    # Started and left alone: the exec request stays open while the impersonator
    # runs; its output is never read (the frozen agent forwards nothing).
    # -I -S: stdlib only, no site-packages scan (seconds under TCG).
    await sb.exec_stream(sys.executable, ["-I", "-S", f"{_GUEST_DIR}/guest.py", rules_path])
    with anyio.move_on_after(timeout):
        while READY_MESSAGE not in sb._agent.logs:
            await anyio.sleep(0.05)
        return
    detail = ""
    if await fs.exists(rules_path + ".err"):
        detail = await fs.read_text(rules_path + ".err")
    raise AssertionError(f"the hostile agent did not take over within {timeout:g} s\n{detail}")
