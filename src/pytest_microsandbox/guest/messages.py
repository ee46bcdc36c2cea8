"""The guest runner's messages: what the host and the runner in the guest say to
each other, in the one module both sides import (docs/runner-protocol.md).

On the channel (the virtio-serial port :data:`CHANNEL_PORT_NAME`):

* host -> runner: one :class:`Request` line per test (a JSON object);
* runner -> host: answer lines, each :data:`PREFIX` followed by a JSON object
  ``{"seq": ..., "kind": ..., "data": ...}`` (:class:`Envelope`) whose ``kind``
  names one of the :data:`Message` classes: :class:`Report`,
  :class:`GuestWarning`, :class:`GuestError`, :class:`Done`.

In the runner's control directory (guest tmpfs): :class:`Ready`, written as
:data:`READY` once the runner collected (and as :data:`BASE_READY` by a base
runner waiting for its project), and :class:`Go`, the base runner's start
request, written by the host into the FIFO :data:`GO`.

The runner encodes; the host decodes what the runner wrote, as untrusted input:
a decoder takes any bytes and either returns a well-typed message or raises
:class:`MessageError`. Whether a well-formed message is acceptable (its ``seq``,
its node id, the order of phases) is the host's validator's business
(``plugin/_channel.py``).

Only the standard library: the runner imports this under emulation, where every
import costs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

__all__ = [
    "BASE_READY",
    "CHANNEL_PORT_NAME",
    "END",
    "GO",
    "GUEST_ENV",
    "OUTCOMES",
    "PHASES",
    "PREFIX",
    "READY",
    "STACKS",
    "SUBTEST_REPORT_TYPE",
    "Done",
    "Envelope",
    "Go",
    "GuestError",
    "GuestWarning",
    "Message",
    "MessageError",
    "Outcome",
    "Phase",
    "Ready",
    "Report",
    "Request",
    "encode_answer",
]

#: Starts every answer line the runner writes.
PREFIX = "@@msb@@ "
#: Set in the guest runner's environment; the plugin then runs marked tests in-process.
GUEST_ENV = "MICROSANDBOX_GUEST"
#: The channel's virtio-serial port (``runtime.qemu.CHANNEL_PORT_NAME``, not
#: imported: the runtime is not for the guest).
CHANNEL_PORT_NAME = "msb.chan"
#: Control files: the runner's :class:`Ready`, the base runner's, the FIFO of :class:`Go`.
READY = "ready"
BASE_READY = "base-ready"
GO = "go"
#: Control file: every thread's Python stack, written by the runner on SIGUSR1
#: while it starts and collects (bootstrap.py names it literally).
STACKS = "stacks"

Phase = Literal["setup", "call", "teardown"]
Outcome = Literal["passed", "failed", "skipped"]
PHASES: tuple[Phase, ...] = ("setup", "call", "teardown")
OUTCOMES: tuple[Outcome, ...] = ("passed", "failed", "skipped")

_PREFIX = PREFIX.encode()


class MessageError(ValueError):
    """Raised when bytes from the other side are not a well-formed message.

    ``what`` says what was seen (``"a malformed warning"``); ``line`` is the
    offending line when the fault is in the line itself, ``detail`` why a
    message's fields were refused.
    """

    def __init__(self, what: str, *, line: bytes | None = None, detail: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.line = line
        self.detail = detail


# -- host -> runner -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Run test ``nodeid``. ``seq`` is a random token the host made for this
    request: every line of the answer carries it. ``fork``: the runner keeps
    serving after it (process isolation), else it exits once the test's
    process has ended (vm isolation); either way the test runs in a forked
    process. ``env`` is set in the test's process before its setup. ``keep``
    (vm isolation): the host keeps the VM if the test fails, so the test runs
    in the VM's own mounts, where the kept VM shows what it left.
    """

    nodeid: str
    seq: str
    fork: bool
    env: Mapping[str, str] = field(default_factory=dict)
    keep: bool = False

    def encode(self) -> bytes:
        request = {"nodeid": self.nodeid, "seq": self.seq, "fork": self.fork, "env": dict(self.env)}
        if self.keep:
            request["keep"] = True
        return json.dumps(request).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Request:
        """:raises MessageError: ``line`` is not a request."""
        data = _object(line, "a request")
        nodeid, seq, fork, env = (data.get(k) for k in ("nodeid", "seq", "fork", "env"))
        if not isinstance(nodeid, str) or not isinstance(seq, str) or not isinstance(fork, bool):
            raise MessageError("a malformed request", line=line)
        if env is None:
            env = {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise MessageError("a request whose env is not a str -> str object", line=line)
        keep = data.get("keep", False)
        if not isinstance(keep, bool):
            raise MessageError("a request whose keep is not a boolean", line=line)
        return cls(nodeid=nodeid, seq=seq, fork=fork, env=env, keep=keep)


# -- runner -> host -----------------------------------------------------------------------------


#: How pytest's subtests (pytest >= 9, and the pytest-subtests plugin before it)
#: mark a serialized subtest report.
SUBTEST_REPORT_TYPE = "SubTestReport"


@dataclass(frozen=True)
class Report:
    """One phase's test report, as ``pytest_report_to_serializable`` wrote it, or
    (``subtest``) the report of one subtest, sent during the ``call`` phase.
    """

    KIND: ClassVar[str] = "report"

    nodeid: str
    when: Phase
    outcome: Outcome
    data: Mapping[str, Any]
    subtest: bool = False

    @classmethod
    def from_data(cls, data: object) -> Report:
        if not isinstance(data, dict):
            raise MessageError("a report that is not a test report")
        subtest = data.get("_report_type") == SUBTEST_REPORT_TYPE
        if not subtest and data.get("$report_type") != "TestReport":
            raise MessageError("a report that is not a test report")
        nodeid, when, outcome = data.get("nodeid"), data.get("when"), data.get("outcome")
        if not isinstance(nodeid, str):
            raise MessageError(f"a report whose node id is {nodeid!r}")
        if when not in PHASES:
            raise MessageError(f"a report of unknown phase {when!r}")
        if subtest and when != "call":
            raise MessageError(f"a subtest report of phase {when!r} (subtests report in 'call')")
        if outcome not in OUTCOMES:
            raise MessageError(f"a {when!r} report with outcome {outcome!r}")
        return cls(nodeid=nodeid, when=when, outcome=outcome, data=data, subtest=subtest)

    def to_data(self) -> Mapping[str, Any]:
        return self.data


@dataclass(frozen=True)
class GuestWarning:
    """A warning recorded while the test ran (``pytest_warning_recorded``)."""

    KIND: ClassVar[str] = "warning"

    nodeid: str
    message: str
    category_module: str
    category_name: str
    filename: str
    lineno: int
    when: str = "runtest"

    @classmethod
    def of(cls, recorded: Any, when: str, nodeid: str) -> GuestWarning:
        """From a ``warnings.WarningMessage`` (not imported: it costs under emulation)."""
        category = recorded.category
        return cls(
            nodeid=nodeid,
            message=str(recorded.message),
            category_module=category.__module__ if category else "",
            category_name=category.__name__ if category else "",
            filename=str(recorded.filename),
            lineno=int(recorded.lineno or 0),
            when=when,
        )

    @classmethod
    def from_data(cls, data: object) -> GuestWarning:
        if not isinstance(data, dict) or not isinstance(data.get("nodeid"), str):
            raise MessageError("a warning without a node id")
        w = data.get("warning")
        try:
            if not isinstance(w, dict):
                raise ValueError("no warning object")
            return cls(
                nodeid=data["nodeid"],
                message=_str(w, "message"),
                category_module=_str(w, "category_module"),
                category_name=_str(w, "category_name"),
                filename=_str(w, "filename"),
                lineno=_int_or_none(w.get("lineno")) or 0,
                when=_str(data, "when") or "runtest",
            )
        except ValueError as exc:
            raise MessageError("a malformed warning", detail=str(exc)) from None

    def to_data(self) -> Mapping[str, Any]:
        warning = {
            "message": self.message,
            "category_module": self.category_module,
            "category_name": self.category_name,
            "filename": self.filename,
            "lineno": self.lineno,
        }
        return {"warning": warning, "when": self.when, "nodeid": self.nodeid}


@dataclass(frozen=True)
class GuestError:
    """The runner could not run the test (not collected, for one)."""

    KIND: ClassVar[str] = "error"

    text: str

    @classmethod
    def from_data(cls, data: object) -> GuestError:
        if not isinstance(data, str):
            raise MessageError("a malformed error", detail=f"not a string: {data!r}"[:200])
        return cls(data)

    def to_data(self) -> str:
        return self.text


@dataclass(frozen=True)
class Done:
    """The end of the answer. ``status`` 0: the test process ran the whole protocol;
    else the runner saw it end early, killed by ``signal`` or exiting with ``exit``.
    """

    KIND: ClassVar[str] = "done"

    status: int | None
    signal: int | None = None
    exit: int | None = None

    @classmethod
    def from_data(cls, data: object) -> Done:
        try:
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return cls(
                _int_or_none(data.get("status")),
                _int_or_none(data.get("signal")),
                _int_or_none(data.get("exit")),
            )
        except ValueError as exc:
            raise MessageError("a malformed 'done'", detail=str(exc)) from None

    def to_data(self) -> Mapping[str, Any]:
        return {"status": self.status, "signal": self.signal, "exit": self.exit}


Message = Union[Report, GuestWarning, GuestError, Done]  # noqa: UP007 (3.10 runtime alias)

_KINDS: dict[str, type[Report] | type[GuestWarning] | type[GuestError] | type[Done]] = {
    cls.KIND: cls for cls in (Report, GuestWarning, GuestError, Done)
}


def encode_answer(seq: str, message: Message) -> bytes:
    """One answer line: :data:`PREFIX`, the envelope, a newline."""
    envelope = {"seq": seq, "kind": message.KIND, "data": message.to_data()}
    return (PREFIX + json.dumps(envelope) + "\n").encode()


@dataclass(frozen=True)
class Envelope:
    """An answer line, decoded as far as its frame: the ``seq`` it carries (any
    JSON value: the host compares it with its own), its ``kind`` and its
    undecoded ``data``.
    """

    seq: object
    kind: object
    data: object

    @classmethod
    def decode(cls, line: bytes) -> Envelope:
        """:raises MessageError: ``line`` (without its newline) is not an answer line."""
        if not line.startswith(_PREFIX):
            raise MessageError("a line that is not a protocol line", line=line)
        envelope = _object(line[len(_PREFIX) :], "a protocol line", line)
        return cls(envelope.get("seq"), envelope.get("kind"), envelope.get("data"))

    def message(self) -> Message:
        """The typed message. :raises MessageError: unknown kind or malformed data."""
        kind = _KINDS.get(self.kind) if isinstance(self.kind, str) else None
        if kind is None:
            raise MessageError(f"a line of unknown kind {self.kind!r}")
        return kind.from_data(self.data)


# -- control files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The runner is ready: it collected ``items`` tests (``errors``: why some were
    not), or, as :data:`BASE_READY`, a base runner waits for its :class:`Go`.
    """

    pid: int
    items: int = 0
    errors: tuple[str, ...] = ()

    def encode(self) -> str:
        return json.dumps({"pid": self.pid, "items": self.items, "errors": list(self.errors)})

    @classmethod
    def decode(cls, text: str) -> Ready:
        """:raises MessageError: ``text`` is not a ready file."""
        data = _object(text.encode(), "a ready file")
        pid, items, errors = data.get("pid"), data.get("items", 0), data.get("errors", [])
        if (
            not isinstance(pid, int)
            or not isinstance(items, int)
            or not isinstance(errors, list)
            or not all(isinstance(e, str) for e in errors)
        ):
            raise MessageError("a malformed ready file", line=text.encode())
        return cls(pid=pid, items=items, errors=tuple(errors))


@dataclass(frozen=True)
class Go:
    """A base runner's start request: collect ``args`` (pytest arguments) in ``cwd``.

    ``keep``: the VM is kept warm between runs (``--sandbox-keep-warm``): the
    base runner forks a child for this run and stays as it was, pristine, for
    the next request (another go, or :data:`END`), which first kills this run's
    processes. Without it the base runner becomes the run's runner itself.

    ``prepare``: the project is not in the guest yet; the runner does what
    pytest's start needs no file for (its plugin manager and the default
    plugins' registration, for these ``args``) and waits for the real request,
    sent once the project is in. That work serves the real request when both
    leave out the same plugins (``-p no:NAME``); else the runner starts anew.
    """

    cwd: str
    args: tuple[str, ...]
    keep: bool = False
    prepare: bool = False

    def encode(self) -> str:
        data = {"cwd": self.cwd, "args": list(self.args), "keep": self.keep}
        if self.prepare:
            data["prepare"] = True
        return json.dumps(data)

    @classmethod
    def decode(cls, text: str) -> Go:
        """:raises MessageError: ``text`` is not a go request."""
        data = _object(text.encode(), "a go request")
        cwd, args = data.get("cwd"), data.get("args")
        keep, prepare = data.get("keep", False), data.get("prepare", False)
        if (
            not isinstance(cwd, str)
            or not isinstance(args, list)
            or not all(isinstance(a, str) for a in args)
            or not isinstance(keep, bool)
            or not isinstance(prepare, bool)
        ):
            raise MessageError("a malformed go request", line=text.encode())
        return cls(cwd=cwd, args=tuple(args), keep=keep, prepare=prepare)


#: Written to a kept base runner's go FIFO at the end of a run: kill the run's
#: processes and wait, pristine, for the next go request.
END = "end"


# -- helpers ------------------------------------------------------------------------------------


def _object(raw: bytes, what: str, line: bytes | None = None) -> dict[str, Any]:
    """``raw`` as a JSON object. :raises MessageError: naming ``what`` and quoting ``line``."""
    line = raw if line is None else line
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise MessageError(f"{what} that is not JSON", line=line) from None
    if not isinstance(value, dict):
        raise MessageError(f"{what} that is not an object", line=line)
    return value


def _int_or_none(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"not an integer: {value!r}")


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string: {value!r}")
    return value
