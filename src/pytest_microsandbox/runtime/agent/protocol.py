"""Pure codec of the guest-agent wire protocol (``docs/protocol.md``); no I/O.

Everything the guest sends is treated as hostile: :class:`FrameDecoder` checks
every frame against the specification and a per-message schema, and raises
:class:`~pytest_microsandbox.runtime._exceptions.ProtocolError` at the first
violation. Encoding is done by :func:`encode_frame`, which raises
:class:`ValueError` for frames the host must never produce (a host bug, not a
guest fault).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .._exceptions import ProtocolError

__all__ = [
    "CHUNK",
    "DRAIN_READS",
    "GUEST_TO_HOST",
    "HEADER_SIZE",
    "HOST_TO_GUEST",
    "INT_TAGS",
    "MAX_FRAME",
    "MIN_FRAME",
    "PROTOCOL_VERSION",
    "REPEATABLE_TAGS",
    "Field",
    "Frame",
    "FrameDecoder",
    "MsgType",
    "Schema",
    "Tag",
    "bytes_field",
    "decode_int",
    "encode_frame",
    "encode_int",
    "int_field",
]

#: Version of the wire protocol spoken by this host (HELLO / READY VERSION).
PROTOCOL_VERSION = 1
#: Largest value of a frame's ``length`` field (bytes after the length field).
MAX_FRAME = 1024 * 1024 + 64 * 1024
#: Smallest value of a frame's ``length`` field: id (4) + type (1).
MIN_FRAME = 5
#: Largest DATA field.
CHUNK = 1024 * 1024
#: Size of the ``length`` prefix.
HEADER_SIZE = 4
#: Reads of an exec's output the agent makes after reaping it (its DRAIN_READS).
DRAIN_READS = 16

_U32 = struct.Struct(">I")
_FIELD_HEADER = struct.Struct(">BI")
_I64 = struct.Struct(">q")
_FRAME_HEADER = struct.Struct(">IIB")
_U32_MAX = 0xFFFF_FFFF


class MsgType(enum.IntEnum):
    """Message types (the frame's ``type`` byte)."""

    READY = 0x01
    LOG = 0x02
    HELLO = 0x03
    PING = 0x04
    SHUTDOWN = 0x05
    CONFIGURE = 0x06
    METRICS = 0x07
    MOUNT = 0x08
    UMOUNT = 0x09
    NET = 0x0A
    EXEC = 0x10
    STDIN = 0x11
    SIGNAL = 0x12
    RESIZE = 0x13
    ACK = 0x14
    FS_READ = 0x20
    FS_WRITE = 0x21
    FS_CHUNK = 0x22
    FS_END = 0x23
    FS_LIST = 0x24
    FS_STAT = 0x25
    FS_MKDIR = 0x26
    FS_REMOVE = 0x27
    FS_RENAME = 0x28
    FS_CHMOD = 0x29
    FS_COPY = 0x2A
    FS_READLINK = 0x2B
    STARTED = 0x90
    STDOUT = 0x91
    STDERR = 0x92
    EXITED = 0x93
    DIRENT = 0xA2
    OK = 0xF0
    ERROR = 0xF1


class Tag(enum.IntEnum):
    """Field tags."""

    VERSION = 1
    ARG = 2
    ENV = 3
    CWD = 4
    USER = 5
    TIMEOUT_MS = 7
    STDIN_MODE = 8
    DATA = 9
    SIGNAL = 10
    PATH = 11
    PATH2 = 12
    MODE = 13
    FLAGS = 14
    PID = 15
    EXIT_CODE = 16
    TERM_SIGNAL = 17
    TIMED_OUT = 18
    ERRNO = 19
    MESSAGE = 20
    NAME = 21
    KIND = 22
    SIZE = 23
    MTIME_NS = 24
    FSTYPE = 25
    OPTIONS = 26
    SOURCE = 27
    TIME_NS = 28
    SEED = 29
    AGENT_VERSION = 30
    HOSTNAME = 31
    UID = 32
    GID = 33
    OFFSET = 34
    ROWS = 35
    COLS = 36
    WINDOW = 37
    UPTIME_MS = 40
    MEM_TOTAL = 41
    MEM_AVAILABLE = 42
    CPU_BUSY_MS = 43
    CPU_IDLE_MS = 44
    NPROCS = 45
    LOAD1_MILLI = 46
    NET = 47


#: Tags whose value is a signed 64-bit big-endian integer (len must be 8).
INT_TAGS: frozenset[Tag] = frozenset(
    {
        Tag.VERSION,
        Tag.TIMEOUT_MS,
        Tag.STDIN_MODE,
        Tag.SIGNAL,
        Tag.MODE,
        Tag.FLAGS,
        Tag.PID,
        Tag.EXIT_CODE,
        Tag.TERM_SIGNAL,
        Tag.TIMED_OUT,
        Tag.ERRNO,
        Tag.KIND,
        Tag.SIZE,
        Tag.MTIME_NS,
        Tag.TIME_NS,
        Tag.UID,
        Tag.GID,
        Tag.OFFSET,
        Tag.ROWS,
        Tag.COLS,
        Tag.WINDOW,
        Tag.UPTIME_MS,
        Tag.MEM_TOTAL,
        Tag.MEM_AVAILABLE,
        Tag.CPU_BUSY_MS,
        Tag.CPU_IDLE_MS,
        Tag.NPROCS,
        Tag.LOAD1_MILLI,
    }
)
#: Tags that may occur more than once in a frame.
REPEATABLE_TAGS: frozenset[Tag] = frozenset({Tag.ARG, Tag.ENV})

#: One field as carried in a :class:`Frame`: ``(tag, raw value bytes)``.
Field = tuple[int, bytes]


def _name(value: int, enum_cls: type[enum.IntEnum]) -> str:
    try:
        return enum_cls(value).name
    except ValueError:
        return f"{value:#04x}"


def encode_int(value: int) -> bytes:
    """Encode ``value`` as an ``i64``; raises ValueError if it does not fit."""
    try:
        return _I64.pack(value)
    except struct.error:
        raise ValueError(f"integer {value} does not fit in a signed 64-bit field") from None


def decode_int(raw: bytes, tag: int = 0) -> int:
    """Decode an ``i64`` field value; raises ProtocolError if ``raw`` is not 8 bytes."""
    if len(raw) != 8:
        raise ProtocolError(f"integer field {_name(tag, Tag)} has length {len(raw)}, expected 8")
    return int(_I64.unpack(raw)[0])


def int_field(tag: Tag, value: int) -> Field:
    """Build an integer field; raises ValueError if ``value`` does not fit in i64."""
    return (int(tag), encode_int(value))


def bytes_field(tag: Tag, value: bytes | str) -> Field:
    """Build a bytes field; ``str`` values are encoded as UTF-8 (surrogateescape)."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return (int(tag), bytes(value))


def encode_frame(id: int, type: int, fields: Iterable[Field] = ()) -> bytes:
    """Serialize one frame.

    Raises ValueError if the id is not a u32, the type or a tag is not a u8, or
    the frame would exceed :data:`MAX_FRAME` — conditions only a host bug can
    cause (callers chunk data at :data:`CHUNK`). It does not validate the
    frame against a schema, so tests can build malformed frames with it.
    """
    if not 0 <= id <= _U32_MAX:
        raise ValueError(f"frame id {id} is not a u32")
    if not 0 <= type <= 0xFF:
        raise ValueError(f"message type {type} is not a u8")
    parts: list[bytes] = []
    length = MIN_FRAME
    for tag, value in fields:
        if not 0 <= tag <= 0xFF:
            raise ValueError(f"tag {tag} is not a u8")
        parts.append(_FIELD_HEADER.pack(tag, len(value)))
        parts.append(value)
        length += _FIELD_HEADER.size + len(value)
        if length > MAX_FRAME:
            raise ValueError(f"frame of length {length} exceeds MAX_FRAME ({MAX_FRAME})")
    return _FRAME_HEADER.pack(length, id, type) + b"".join(parts)


@dataclass(frozen=True)
class Schema:
    """What a message type must carry.

    ``required``: tags that must be present. ``one_of``: groups of tags of
    which exactly one must be present. ``id_zero``: the frame's id must be 0
    (connection level); otherwise it must be non-zero (request scoped).
    """

    required: frozenset[Tag] = frozenset()
    one_of: tuple[frozenset[Tag], ...] = ()
    id_zero: bool = False


def _s(*required: Tag, one_of: tuple[frozenset[Tag], ...] = (), id_zero: bool = False) -> Schema:
    return Schema(frozenset(required), one_of, id_zero)


#: Messages the guest may send, with what each must carry. OK's fields depend
#: on the request, so the client checks them (``Frame.require_*``).
GUEST_TO_HOST: Mapping[MsgType, Schema] = {
    MsgType.READY: _s(Tag.VERSION, Tag.AGENT_VERSION, Tag.UPTIME_MS, id_zero=True),
    MsgType.LOG: _s(Tag.MESSAGE, id_zero=True),
    MsgType.STARTED: _s(Tag.PID),
    MsgType.STDOUT: _s(Tag.DATA),
    MsgType.STDERR: _s(Tag.DATA),
    MsgType.EXITED: _s(Tag.TIMED_OUT, one_of=(frozenset({Tag.EXIT_CODE, Tag.TERM_SIGNAL}),)),
    MsgType.DIRENT: _s(Tag.NAME, Tag.KIND, Tag.SIZE, Tag.MODE, Tag.MTIME_NS),
    MsgType.FS_CHUNK: _s(Tag.DATA),
    MsgType.OK: _s(),
    MsgType.ERROR: _s(Tag.ERRNO, Tag.MESSAGE),
}

#: Messages the host may send; used by fake agents in tests.
HOST_TO_GUEST: Mapping[MsgType, Schema] = {
    MsgType.HELLO: _s(Tag.VERSION),
    MsgType.PING: _s(),
    MsgType.SHUTDOWN: _s(),
    MsgType.CONFIGURE: _s(),
    MsgType.METRICS: _s(),
    MsgType.MOUNT: _s(Tag.SOURCE, Tag.PATH, Tag.FSTYPE),
    MsgType.UMOUNT: _s(Tag.PATH),
    MsgType.NET: _s(Tag.NET),
    MsgType.EXEC: _s(Tag.ARG),
    MsgType.STDIN: _s(Tag.DATA),
    MsgType.SIGNAL: _s(Tag.SIGNAL),
    MsgType.RESIZE: _s(Tag.ROWS, Tag.COLS),
    MsgType.ACK: _s(Tag.SIZE),
    MsgType.FS_READ: _s(Tag.PATH),
    MsgType.FS_WRITE: _s(Tag.PATH),
    MsgType.FS_CHUNK: _s(Tag.DATA),
    MsgType.FS_END: _s(),
    MsgType.FS_LIST: _s(Tag.PATH),
    MsgType.FS_STAT: _s(Tag.PATH),
    MsgType.FS_MKDIR: _s(Tag.PATH),
    MsgType.FS_REMOVE: _s(Tag.PATH),
    MsgType.FS_RENAME: _s(Tag.PATH, Tag.PATH2),
    MsgType.FS_CHMOD: _s(Tag.PATH, Tag.MODE),
    MsgType.FS_COPY: _s(Tag.PATH2, one_of=(frozenset({Tag.PATH, Tag.SOURCE}),)),
    MsgType.FS_READLINK: _s(Tag.PATH),
}


@dataclass(frozen=True)
class Frame:
    """One decoded (or to-be-encoded) message.

    The typed accessors raise ProtocolError when the guest's frame does not
    hold what the caller needs, so reply handling can use them directly.
    """

    id: int
    type: int
    fields: list[Field] = field(default_factory=list)

    @property
    def type_name(self) -> str:
        """The message type's name, or its hex value if unknown."""
        return _name(self.type, MsgType)

    def has(self, tag: Tag) -> bool:
        """Return whether the frame carries ``tag``."""
        return any(t == tag for t, _ in self.fields)

    def get_bytes(self, tag: Tag) -> bytes | None:
        """Return the first value of ``tag``, or None if absent."""
        for t, value in self.fields:
            if t == tag:
                return value
        return None

    def get_all(self, tag: Tag) -> list[bytes]:
        """Return every value of ``tag`` in order (for ARG/ENV)."""
        return [value for t, value in self.fields if t == tag]

    def get_int(self, tag: Tag) -> int | None:
        """Return ``tag`` decoded as i64, or None if absent.

        Raises ProtocolError if the value is not 8 bytes long.
        """
        raw = self.get_bytes(tag)
        return None if raw is None else decode_int(raw, tag)

    def get_str(self, tag: Tag) -> str | None:
        """Return ``tag`` decoded as UTF-8 (invalid bytes replaced), or None if absent."""
        raw = self.get_bytes(tag)
        return None if raw is None else raw.decode("utf-8", "replace")

    def require_bytes(self, tag: Tag) -> bytes:
        """Return the value of ``tag``; raises ProtocolError if absent."""
        raw = self.get_bytes(tag)
        if raw is None:
            raise ProtocolError(f"{self.type_name} (id {self.id}) lacks required field {tag.name}")
        return raw

    def require_int(self, tag: Tag) -> int:
        """Return ``tag`` as i64; raises ProtocolError if absent or not 8 bytes."""
        return decode_int(self.require_bytes(tag), tag)

    def require_str(self, tag: Tag) -> str:
        """Return ``tag`` as text (invalid UTF-8 replaced); raises ProtocolError if absent."""
        return self.require_bytes(tag).decode("utf-8", "replace")

    def encode(self) -> bytes:
        """Serialize with :func:`encode_frame` (raises ValueError like it)."""
        return encode_frame(self.id, self.type, self.fields)


class FrameDecoder:
    """Incremental, strict decoder of a byte stream into :class:`Frame` objects.

    ``feed`` may be given any split of the stream. The decoder buffers at most
    one frame (``HEADER_SIZE + MAX_FRAME`` bytes): the length prefix is checked
    before the body is awaited, so a hostile peer cannot make it allocate more.
    After the first ProtocolError the stream is desynchronized and the decoder
    is poisoned: every later ``feed`` raises ProtocolError again.
    """

    def __init__(self, schema: Mapping[MsgType, Schema] = GUEST_TO_HOST) -> None:
        self._schema = schema
        self._buf = bytearray()
        self._need = HEADER_SIZE  # bytes the current frame needs in _buf
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held; non-zero at EOF means a truncated frame."""
        return len(self._buf)

    @property
    def error(self) -> ProtocolError | None:
        """The error that poisoned the decoder, if any."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data`` and return the frames it completes, in order.

        Raises ProtocolError on the first violation, and on every call after one.
        """
        if self._error is not None:
            raise ProtocolError(f"protocol stream unusable after earlier error: {self._error}")
        try:
            return self._feed(memoryview(data).cast("B"))
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _feed(self, view: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        pos = 0
        end = len(view)
        while pos < end:
            if not self._buf and end - pos >= HEADER_SIZE:
                # Fast path: parse straight from the input when a whole frame is there.
                length = self._check_length(_U32.unpack_from(view, pos)[0])
                if end - pos - HEADER_SIZE >= length:
                    start = pos + HEADER_SIZE
                    frames.append(self._parse(view[start : start + length]))
                    pos = start + length
                    continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) < self._need:
                break
            if self._need == HEADER_SIZE:
                self._need = HEADER_SIZE + self._check_length(_U32.unpack_from(self._buf)[0])
            else:
                frames.append(self._parse(memoryview(self._buf)[HEADER_SIZE:]))
                self._buf = bytearray()
                self._need = HEADER_SIZE
        return frames

    @staticmethod
    def _check_length(length: int) -> int:
        if length < MIN_FRAME:
            raise ProtocolError(f"frame length {length} is below the minimum {MIN_FRAME}")
        if length > MAX_FRAME:
            raise ProtocolError(f"frame length {length} exceeds MAX_FRAME ({MAX_FRAME})")
        return length

    def _parse(self, body: memoryview) -> Frame:
        id_, type_ = struct.unpack_from(">IB", body)
        try:
            msg = MsgType(type_)
        except ValueError:
            raise ProtocolError(f"unknown message type {type_:#04x} (id {id_})") from None
        schema = self._schema.get(msg)
        if schema is None:
            raise ProtocolError(
                f"message type {msg.name} (id {id_}) is not valid in this direction"
            )
        where = f"{msg.name} (id {id_})"
        if schema.id_zero and id_ != 0:
            raise ProtocolError(f"{where} must have id 0")
        if not schema.id_zero and id_ == 0:
            raise ProtocolError(f"{msg.name} must have a non-zero request id")
        fields: list[Field] = []
        seen: set[Tag] = set()
        pos = 5
        end = len(body)
        while pos < end:
            if end - pos < _FIELD_HEADER.size:
                raise ProtocolError(
                    f"{where}: truncated field header at offset {pos} ({end - pos} bytes left)"
                )
            raw_tag, flen = _FIELD_HEADER.unpack_from(body, pos)
            pos += _FIELD_HEADER.size
            try:
                tag = Tag(raw_tag)
            except ValueError:
                raise ProtocolError(f"{where}: unknown tag {raw_tag}") from None
            if flen > end - pos:
                raise ProtocolError(
                    f"{where}: field {tag.name} of length {flen} overruns the frame "
                    f"({end - pos} bytes left)"
                )
            if tag in INT_TAGS and flen != 8:
                raise ProtocolError(
                    f"{where}: integer field {tag.name} has length {flen}, expected 8"
                )
            if tag == Tag.DATA and flen > CHUNK:
                raise ProtocolError(f"{where}: DATA of {flen} bytes exceeds CHUNK ({CHUNK})")
            if tag in seen and tag not in REPEATABLE_TAGS:
                raise ProtocolError(f"{where}: field {tag.name} given more than once")
            seen.add(tag)
            fields.append((tag, bytes(body[pos : pos + flen])))
            pos += flen
        missing = schema.required - seen
        if missing:
            names = ", ".join(sorted(t.name for t in missing))
            raise ProtocolError(f"{where}: missing required field(s) {names}")
        for group in schema.one_of:
            present = group & seen
            if len(present) != 1:
                names = " or ".join(sorted(t.name for t in group))
                raise ProtocolError(f"{where}: needs exactly one of {names}, got {len(present)}")
        return Frame(id_, msg, fields)
