"""The runner's messages: what the runner encodes, the host decodes to the same
typed message; what does not decode is refused with what was seen.
"""

from __future__ import annotations

import json
import warnings

import pytest

from pytest_microsandbox.guest.messages import (
    PREFIX,
    Done,
    Envelope,
    Go,
    GuestError,
    GuestWarning,
    Message,
    MessageError,
    Ready,
    Report,
    Request,
    encode_answer,
)

NODE = "tests/test_a.py::test_x[1]"
REPORT = {"$report_type": "TestReport", "nodeid": NODE, "when": "call", "outcome": "failed"}


@pytest.mark.parametrize(
    "message",
    [
        Report(NODE, "call", "failed", REPORT),
        GuestWarning(NODE, "careful", "builtins", "UserWarning", "t.py", 3, "runtest"),
        GuestError(f"{NODE}: not found in the guest's collection"),
        Done(status=0),
        Done(status=None, signal=9),
        Done(status=None, exit=3),
    ],
)
def test_an_answer_line_decodes_to_what_was_encoded(message: Message):
    line = encode_answer("5eq", message)
    assert line.startswith(PREFIX.encode()) and line.endswith(b"\n")
    assert line.count(b"\n") == 1  # one line, whatever the data holds
    envelope = Envelope.decode(line[:-1])
    assert (envelope.seq, envelope.kind) == ("5eq", message.KIND)
    assert envelope.message() == message


def test_a_request_round_trips():
    request = Request(NODE, "5eq", True, {"TOKEN": "s3cret", "EMPTY": ""})
    line = request.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert Request.decode(line[:-1]) == request
    kept = Request(NODE, "5eq", False, keep=True)
    assert Request.decode(kept.encode()[:-1]) == kept
    assert b"keep" not in Request(NODE, "5eq", False).encode()  # older runners' lines


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"{nope", "a request that is not JSON"),
        (b"[1]", "a request that is not an object"),
        (b'{"nodeid": 1, "seq": "s", "fork": true}', "a malformed request"),
        (b'{"nodeid": "n", "seq": "s", "fork": 1}', "a malformed request"),
        (b'{"nodeid": "n", "seq": "s", "fork": true, "env": {"A": 1}}', "a request whose env"),
        (b'{"nodeid": "n", "seq": "s", "fork": false, "keep": 1}', "a request whose keep"),
    ],
)
def test_a_malformed_request_is_refused(raw: bytes, what: str):
    with pytest.raises(MessageError) as info:
        Request.decode(raw)
    assert info.value.what.startswith(what)


def test_a_warning_from_a_recorded_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(DeprecationWarning("old"), stacklevel=1)
    w = GuestWarning.of(caught[0], "runtest", NODE)
    assert (w.message, w.category_module, w.category_name) == (
        "old",
        "builtins",
        "DeprecationWarning",
    )
    assert w.filename == __file__ and w.lineno > 0 and w.nodeid == NODE
    assert Envelope.decode(encode_answer("s", w)[:-1]).message() == w


@pytest.mark.parametrize(
    ("line", "what", "quoted"),
    [
        (b"hello", "a line that is not a protocol line", True),
        (PREFIX.encode() + b"{nope", "a protocol line that is not JSON", True),
        (PREFIX.encode() + b'"\xff"', "a protocol line that is not JSON", True),
        (PREFIX.encode() + b"[1]", "a protocol line that is not an object", True),
    ],
)
def test_lines_that_are_not_envelopes(line: bytes, what: str, quoted: bool):
    with pytest.raises(MessageError) as info:
        Envelope.decode(line)
    assert info.value.what == what
    assert info.value.line == line


def _message(kind: object, data: object) -> Message:
    raw = PREFIX + json.dumps({"seq": "s", "kind": kind, "data": data})
    return Envelope.decode(raw.encode()).message()


@pytest.mark.parametrize(
    ("kind", "data", "what", "detail"),
    [
        ("exec", {}, "a line of unknown kind 'exec'", ""),
        (None, {}, "a line of unknown kind None", ""),
        ("report", [], "a report that is not a test report", ""),
        ("report", {**REPORT, "$report_type": "CollectReport"},
         "a report that is not a test report", ""),
        ("report", {**REPORT, "nodeid": None}, "a report whose node id is None", ""),
        ("report", {**REPORT, "when": "collect"}, "a report of unknown phase 'collect'", ""),
        ("report", {**REPORT, "outcome": "rerun"}, "a 'call' report with outcome 'rerun'", ""),
        ("warning", "x", "a warning without a node id", ""),
        ("warning", {"nodeid": NODE}, "a malformed warning", "no warning object"),
        (
            "warning",
            {"nodeid": NODE, "warning": {"lineno": "x"}},
            "a malformed warning",
            "not an integer: 'x'",
        ),
        ("warning", {"nodeid": NODE, "warning": {"message": 1}}, "a malformed warning",
         "message is not a string: 1"),
        ("error", {"text": "x"}, "a malformed error", "not a string: {'text': 'x'}"),
        ("done", [], "a malformed 'done'", "not an object"),
        ("done", {"status": "0"}, "a malformed 'done'", "not an integer: '0'"),
        ("done", {"status": True}, "a malformed 'done'", "not an integer: True"),
    ],
)  # fmt: skip
def test_malformed_data_is_refused(kind: object, data: object, what: str, detail: str):
    with pytest.raises(MessageError) as info:
        _message(kind, data)
    assert (info.value.what, info.value.detail, info.value.line) == (what, detail, None)


def test_absent_optional_fields_decode_as_none_or_empty():
    assert _message("done", {"status": None}) == Done(status=None)
    w = _message("warning", {"nodeid": NODE, "warning": {}})
    assert w == GuestWarning(NODE, "", "", "", "", 0, "runtest")


def test_control_files_round_trip_and_refuse_what_they_are_not():
    ready = Ready(pid=7, items=3, errors=("E1",))
    assert Ready.decode(ready.encode()) == ready
    assert Ready.decode('{"pid": 7}') == Ready(pid=7)
    go = Go(cwd="/src", args=("-q", "tests/test_a.py"))
    assert Go.decode(go.encode()) == go
    kept = Go(cwd="/src", args=("t.py",), keep=True)
    assert Go.decode(kept.encode()) == kept
    assert not Go.decode('{"cwd": "/", "args": []}').keep  # an older host's request
    early = Go(cwd="/src", args=("t.py",), prepare=True)
    assert Go.decode(early.encode()) == early
    assert "prepare" not in go.encode()  # the other requests encode as before
    for bad in ('{"pid": "7"}', '{"pid": 7, "errors": [1]}', "[]", "{"):
        with pytest.raises(MessageError):
            Ready.decode(bad)
    for bad in ('{"cwd": "/"}', '{"cwd": 1, "args": []}', '{"cwd": "/", "args": [1]}',
                '{"cwd": "/", "args": [], "keep": 1}',
                '{"cwd": "/", "args": [], "prepare": 1}'):  # fmt: skip
        with pytest.raises(MessageError):
            Go.decode(bad)


def test_subtest_reports_decode_as_call_phase_subtests():
    from pytest_microsandbox.guest.messages import MessageError, Report

    data = {"_report_type": "SubTestReport", "nodeid": "t.py::t", "when": "call",
            "outcome": "failed"}  # fmt: skip
    assert Report.from_data(data).subtest
    plain = {"$report_type": "TestReport", "nodeid": "t.py::t", "when": "call", "outcome": "passed"}
    assert not Report.from_data(plain).subtest
    with pytest.raises(MessageError, match="subtest report of phase 'setup'"):
        Report.from_data({**data, "when": "setup"})
    with pytest.raises(MessageError, match="not a test report"):
        Report.from_data({**data, "_report_type": "Other"})
