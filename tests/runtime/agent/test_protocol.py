"""Tests of the wire codec: round trips, strictness, and fuzzing of hostile input."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytest_microsandbox.runtime._exceptions import ProtocolError
from pytest_microsandbox.runtime.agent.protocol import (
    CHUNK,
    GUEST_TO_HOST,
    HOST_TO_GUEST,
    INT_TAGS,
    MAX_FRAME,
    REPEATABLE_TAGS,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    bytes_field,
    decode_int,
    encode_frame,
    encode_int,
    int_field,
)

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def raw_frame(id_: int, type_: int, payload: bytes, length: int | None = None) -> bytes:
    """A frame with a hand-made payload (and optionally a lying length)."""
    if length is None:
        length = 5 + len(payload)
    return struct.pack(">IIB", length, id_, type_) + payload


def raw_field(tag: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", tag, len(value) if length is None else length) + value


def decode_one(data: bytes, schema=GUEST_TO_HOST) -> Frame:
    frames = FrameDecoder(schema).feed(data)
    assert len(frames) == 1
    return frames[0]


# --- strategies -----------------------------------------------------------------------------


def field_value(tag: Tag) -> st.SearchStrategy[bytes]:
    if tag in INT_TAGS:
        return I64.map(encode_int)
    return st.binary(max_size=64)


@st.composite
def valid_frames(draw: st.DrawFn, schema=GUEST_TO_HOST) -> Frame:
    """Arbitrary frames that satisfy ``schema``."""
    msg = draw(st.sampled_from(sorted(schema)))
    sch = schema[msg]
    id_ = 0 if sch.id_zero else draw(st.integers(1, 2**32 - 1))
    tags: set[Tag] = set(sch.required)
    for group in sch.one_of:
        tags.add(draw(st.sampled_from(sorted(group))))
    excluded = set().union(*sch.one_of) if sch.one_of else set()
    extra = draw(st.sets(st.sampled_from(sorted(set(Tag) - excluded)), max_size=4))
    tags |= extra
    fields: list[tuple[int, bytes]] = []
    for tag in sorted(tags):
        count = draw(st.integers(1, 3)) if tag in REPEATABLE_TAGS else 1
        fields.extend((tag, draw(field_value(tag))) for _ in range(count))
    fields = draw(st.permutations(fields))
    return Frame(id_, msg, list(fields))


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Arbitrary partitions of ``data`` into consecutive pieces."""

    def cut(points: list[int]) -> list[bytes]:
        bounds = [0, *sorted(set(points)), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    return st.lists(st.integers(0, len(data)), max_size=12).map(cut)


# --- encoding --------------------------------------------------------------------------------


def test_encode_layout() -> None:
    data = encode_frame(7, MsgType.PING, [int_field(Tag.VERSION, 1), bytes_field(Tag.PATH, "/x")])
    assert data == (
        struct.pack(">IIB", 5 + 13 + 7, 7, 0x04)
        + b"\x01\x00\x00\x00\x08"
        + (1).to_bytes(8, "big")
        + b"\x0b\x00\x00\x00\x02/x"
    )


def test_int_field_signed() -> None:
    assert decode_int(encode_int(-1)) == -1
    assert encode_int(-1) == b"\xff" * 8
    with pytest.raises(ValueError):
        encode_int(2**63)
    with pytest.raises(ProtocolError, match="length 4"):
        decode_int(b"\0\0\0\0", Tag.PID)


def test_encode_rejects_host_bugs() -> None:
    with pytest.raises(ValueError, match="u32"):
        encode_frame(2**32, MsgType.PING)
    with pytest.raises(ValueError, match="u8"):
        encode_frame(1, 256)
    with pytest.raises(ValueError, match="MAX_FRAME"):
        encode_frame(1, MsgType.FS_CHUNK, [(Tag.DATA, bytes(MAX_FRAME))])


def test_max_size_frame_round_trips() -> None:
    frame = Frame(3, MsgType.FS_CHUNK, [(Tag.DATA, bytes(CHUNK))])
    assert decode_one(frame.encode()) == frame
    # The largest legal frame: length == MAX_FRAME exactly, with DATA <= CHUNK.
    pad = MAX_FRAME - 5 - 5 - CHUNK - 5
    big = encode_frame(3, MsgType.OK, [(Tag.DATA, bytes(CHUNK)), (Tag.MESSAGE, bytes(pad))])
    assert len(big) == 4 + MAX_FRAME
    assert decode_one(big).get_bytes(Tag.MESSAGE) == bytes(pad)


def test_frame_accessors() -> None:
    frame = Frame(
        1,
        MsgType.OK,
        [
            int_field(Tag.SIZE, 42),
            bytes_field(Tag.ARG, "a"),
            bytes_field(Tag.ARG, b"b"),
            bytes_field(Tag.MESSAGE, b"\xffok"),
        ],
    )
    assert frame.get_int(Tag.SIZE) == 42
    assert frame.require_int(Tag.SIZE) == 42
    assert frame.get_int(Tag.PID) is None
    assert frame.get_all(Tag.ARG) == [b"a", b"b"]
    assert frame.get_bytes(Tag.ARG) == b"a"
    assert frame.get_str(Tag.MESSAGE) == "\ufffdok"
    assert frame.has(Tag.SIZE) and not frame.has(Tag.PID)
    assert frame.type_name == "OK"
    with pytest.raises(ProtocolError, match="OK \\(id 1\\) lacks required field PID"):
        frame.require_int(Tag.PID)
    with pytest.raises(ProtocolError, match="length 1"):
        Frame(1, MsgType.OK, [(Tag.PID, b"x")]).get_int(Tag.PID)


# --- decoding: valid input ------------------------------------------------------------------


@given(frames=st.lists(valid_frames(), max_size=8), data=st.data())
def test_round_trip_arbitrary_splits(frames: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(f.encode() for f in frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for piece in data.draw(splits(stream)):
        out.extend(decoder.feed(piece))
    assert out == frames
    assert decoder.buffered == 0


@given(frames=st.lists(valid_frames(HOST_TO_GUEST), max_size=4))
def test_round_trip_host_to_guest(frames: list[Frame]) -> None:
    decoder = FrameDecoder(HOST_TO_GUEST)
    assert decoder.feed(b"".join(f.encode() for f in frames)) == frames


def test_byte_at_a_time() -> None:
    frame = Frame(9, MsgType.STDOUT, [(Tag.DATA, b"hello")])
    decoder = FrameDecoder()
    data = frame.encode() * 2
    out = [f for i in range(len(data)) for f in decoder.feed(data[i : i + 1])]
    assert out == [frame, frame]


def test_partial_frame_is_buffered() -> None:
    decoder = FrameDecoder()
    data = encode_frame(1, MsgType.OK)
    assert decoder.feed(data[:7]) == []
    assert decoder.buffered == 7
    assert decoder.feed(data[7:]) == [Frame(1, MsgType.OK, [])]
    assert decoder.buffered == 0


# --- decoding: specific malformed input -----------------------------------------------------


MALFORMED = {
    "length below minimum": (raw_frame(1, 0xF0, b"", length=4), "below the minimum"),
    "length zero": (b"\0\0\0\0", "below the minimum"),
    "length over MAX_FRAME": (struct.pack(">I", MAX_FRAME + 1), "exceeds MAX_FRAME"),
    "length 4 GiB": (b"\xff\xff\xff\xff", "exceeds MAX_FRAME"),
    "unknown type": (raw_frame(1, 0x77, b""), "unknown message type 0x77"),
    "host-only type from guest": (raw_frame(1, MsgType.EXEC, b""), "not valid in this direction"),
    "unknown tag": (raw_frame(1, 0xF0, raw_field(6, b"")), "unknown tag 6"),
    "unknown high tag": (raw_frame(1, 0xF0, raw_field(200, b"")), "unknown tag 200"),
    "truncated field header": (raw_frame(1, 0xF0, b"\x09\x00\x00"), "truncated field header"),
    "field overruns frame": (
        raw_frame(1, MsgType.STDOUT, raw_field(Tag.DATA, b"ab", length=3)),
        "DATA of length 3 overruns",
    ),
    "field length huge": (
        raw_frame(1, MsgType.STDOUT, raw_field(Tag.DATA, b"", length=0xFFFFFFFF)),
        "overruns",
    ),
    "int field short": (raw_frame(1, MsgType.STARTED, raw_field(Tag.PID, b"\0" * 7)), "PID"),
    "int field long": (raw_frame(1, MsgType.STARTED, raw_field(Tag.PID, b"\0" * 9)), "length 9"),
    "int field empty": (raw_frame(1, MsgType.OK, raw_field(Tag.SIZE, b"")), "expected 8"),
    "repeated field": (
        raw_frame(1, MsgType.STDOUT, raw_field(Tag.DATA, b"a") + raw_field(Tag.DATA, b"b")),
        "DATA given more than once",
    ),
    "missing required": (raw_frame(1, MsgType.STARTED, b""), "missing required field\\(s\\) PID"),
    "error without errno": (
        raw_frame(1, MsgType.ERROR, raw_field(Tag.MESSAGE, b"x")),
        "ERRNO",
    ),
    "exited with neither": (
        raw_frame(1, MsgType.EXITED, raw_field(Tag.TIMED_OUT, encode_int(0))),
        "exactly one of EXIT_CODE or TERM_SIGNAL, got 0",
    ),
    "exited with both": (
        raw_frame(
            1,
            MsgType.EXITED,
            raw_field(Tag.TIMED_OUT, encode_int(0))
            + raw_field(Tag.EXIT_CODE, encode_int(0))
            + raw_field(Tag.TERM_SIGNAL, encode_int(9)),
        ),
        "got 2",
    ),
    "ready with request id": (
        encode_frame(
            5,
            MsgType.READY,
            [
                int_field(Tag.VERSION, 1),
                bytes_field(Tag.AGENT_VERSION, "x"),
                int_field(Tag.UPTIME_MS, 1),
            ],
        ),
        "must have id 0",
    ),
    "reply with id 0": (encode_frame(0, MsgType.OK), "non-zero request id"),
    "data over CHUNK": (
        raw_frame(1, MsgType.STDOUT, raw_field(Tag.DATA, bytes(CHUNK + 1))),
        "exceeds CHUNK",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed(name: str) -> None:
    data, pattern = MALFORMED[name]
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match=pattern):
        decoder.feed(data)
    # Poisoned: even valid input is refused now, and the error says why.
    with pytest.raises(ProtocolError, match="unusable after earlier error"):
        decoder.feed(encode_frame(1, MsgType.OK))
    assert decoder.error is not None


def test_oversized_length_rejected_before_body_arrives() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds MAX_FRAME"):
        decoder.feed(struct.pack(">I", MAX_FRAME + 1)[:4])
    assert decoder.buffered == 0


def test_error_after_good_frames_in_same_feed() -> None:
    decoder = FrameDecoder()
    good = encode_frame(1, MsgType.OK)
    with pytest.raises(ProtocolError):
        decoder.feed(good + raw_frame(1, 0x77, b""))


# --- fuzzing --------------------------------------------------------------------------------


def feed_all(decoder: FrameDecoder, pieces: list[bytes]) -> None:
    """Feed pieces; only ProtocolError may escape, and the buffer stays bounded."""
    for piece in pieces:
        try:
            decoder.feed(piece)
        finally:
            assert decoder.buffered <= 4 + MAX_FRAME
    assert decoder.buffered < 4 + MAX_FRAME


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=2048), cut=st.data())
def test_fuzz_arbitrary_bytes(data: bytes, cut: st.DataObject) -> None:
    decoder = FrameDecoder()
    try:
        feed_all(decoder, cut.draw(splits(data)))
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decoder.feed(b"")


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(valid_frames(), min_size=1, max_size=4))
    stream = bytearray(b"".join(f.encode() for f in frames))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(0, len(stream) - 1)))
        if op == "flip" and stream:
            stream[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and stream:
            del stream[pos : pos + draw(st.integers(1, 8))]
        elif op == "set" and stream:
            stream[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
    return bytes(stream)


@FUZZ
@given(stream=mutated_streams(), cut=st.data())
def test_fuzz_mutated_streams(stream: bytes, cut: st.DataObject) -> None:
    decoder = FrameDecoder()
    try:
        feed_all(decoder, cut.draw(splits(stream)))
    except ProtocolError as exc:
        assert str(exc)


@FUZZ
@given(frame=valid_frames(), cut=st.integers(min_value=0))
def test_fuzz_truncation_never_yields_a_frame(frame: Frame, cut: int) -> None:
    data = frame.encode()
    cut %= len(data)
    assume(cut > 0)
    decoder = FrameDecoder()
    assert decoder.feed(data[:cut]) == []
    assert decoder.buffered == cut
