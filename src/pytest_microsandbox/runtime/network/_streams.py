"""The stream path: the guest's TCP connections as byte streams over the agent.

The guest's nftables rule (set here, through the agent) redirects its
outbound IPv4 TCP to the agent's ``--stream`` listener, which reads each
connection's original destination and moves its bytes over the agent channel
as frames (``agent.c``: ``stream_mux``), IPv4 and IPv6. Each connection becomes a
:class:`GuestStream` handed to the same per-flow handler as a WireGuard flow
(:meth:`~._stack.NetworkStack`'s), which decides it before any host socket
opens. Everything read here comes from the guest: frame sizes, windows and
the number of connections are bounded, and any breach ends the flow (or, for
a frame out of step, the whole path; flows then go over WireGuard again).

Frame: type u8, connection id u32, length u32 (big endian), then that many
bytes (at most :data:`MAX_DATA`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

__all__ = [
    "ACK",
    "CLOSE",
    "DATA",
    "EOF",
    "INBOUND_MAX",
    "MAX_DATA",
    "NFT_PATHS",
    "NFT_REHEARSAL_TABLE",
    "NFT_TABLE",
    "OPEN",
    "QUEUE_MAX",
    "READY",
    "STREAM_ARGS",
    "STREAM_PORT",
    "UP_WINDOW",
    "WINDOW",
    "ExecTransport",
    "GuestStream",
    "MuxTransport",
    "PortTransport",
    "StreamMux",
    "StreamProtocolError",
    "nft_rehearsal",
    "nft_ruleset",
]

READY, OPEN, DATA, EOF, CLOSE, ACK = range(6)
#: Largest frame payload either side sends (agent.c: SM_MAX_DATA).
MAX_DATA = 65536
#: Bytes the host may have unacknowledged per connection toward the guest
#: (agent.c: SM_DOWN_WINDOW; 512 KiB and 2 MiB measured alike within the
#: load's noise, 17-26 MB/s at load 3.6-4.1).
WINDOW = 2048 * 1024
#: Bytes the guest may have unacknowledged per connection toward the host
#: (agent.c: SM_UP_WINDOW): what the host buffers per flow.
UP_WINDOW = 256 * 1024
#: Guest bytes buffered on the host across all flows: a flow past it is reset.
INBOUND_MAX = 64 << 20
#: Bytes queued toward the guest across all connections: past it, writers wait
#: (a guest that stops reading its port cannot make the host buffer 512 MiB).
QUEUE_MAX = 8 << 20
#: The guest port of the agent's listener (127.0.0.1 in the guest).
STREAM_PORT = 15001
#: The agent's flag (``/proc/self/exe --stream PORT``).
STREAM_ARGS = "--stream"
_HEADER = struct.Struct("!BII")
#: The nftables table the agent's rule lives in.
NFT_TABLE = "msb_stream"
#: The table a pooled clone's rehearsal adds and deletes in one transaction.
NFT_REHEARSAL_TABLE = "msb_rehearsal"
#: Where the guest's nft may be (the stream path's redirect; none: WireGuard only).
NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")


class MuxTransport(Protocol):
    """The bytes between the host and ``agent --stream``."""

    async def send(self, data: bytes) -> None: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class ExecTransport:
    """Frames over the agent process's stdin and stdout (the agent channel):
    the fallback where the VM has no stream port.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def send(self, data: bytes) -> None:
        await self._handle.write_stdin(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        from ..agent.results import Stdout

        async for event in self._handle:
            data = getattr(event, "data", b"")
            if isinstance(event, Stdout) and data:
                yield data
            if data:  # the exec's output window
                await self._handle.ack(len(data))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._handle.kill()


class PortTransport:
    """Frames over the VM's own virtio-serial port (``msb.stream``), held by
    the agent's listener running on its own (closing the port ends it).
    """

    def __init__(self, port: Any) -> None:
        self._port = port

    async def send(self, data: bytes) -> None:
        await self._port.send(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        import anyio

        while True:
            try:
                yield await self._port.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._port.aclose()


class StreamProtocolError(Exception):
    """The guest's stream frames are out of step (internal: the path ends)."""


def nft_ruleset(port: int = STREAM_PORT, table: str = NFT_TABLE) -> str:
    """The guest's rule (``nft`` commands, one transaction, replacing any
    earlier one): outbound TCP, except to the guest's own loopback and to the
    host's link (198.18.0.0/16: DNS over TCP stays on WireGuard), is
    redirected to the agent's listener (127.0.0.1 or [::1]). Pinned names'
    addresses (198.19.0.0/16, 2001:2:0:1::/64) are redirected like any other.
    """
    t = f"inet {table}"
    return (
        f"add table {t}; delete table {t}; add table {t}; "
        f"add chain {t} out {{ type nat hook output priority -100; }}; "
        f"add rule {t} out meta nfproto ipv4 meta l4proto tcp "
        f"ip daddr != {{ 127.0.0.0/8, 198.18.0.0/16 }} redirect to :{port}; "
        f"add rule {t} out meta nfproto ipv6 meta l4proto tcp "
        f"ip6 daddr != ::1 redirect to :{port}"
    )


def nft_rehearsal() -> str:
    """A pooled clone's ``nft`` rehearsal: the same ruleset in a table of its
    own, deleted again in the same transaction, so nothing is ever committed
    (no redirect exists at any moment) while the guest runs the paths a
    sandbox's own :func:`nft_ruleset` takes: nft's start and parser, the
    kernel's table, nat chain and rule set-up. In a fresh TCG clone these run
    cold (measured: the first ``nft`` 130-260 ms under TCG, competing with
    the sandbox's first command for the one vCPU).
    """
    return f"{nft_ruleset(table=NFT_REHEARSAL_TABLE)}; delete table inet {NFT_REHEARSAL_TABLE}"


class GuestStream:
    """One guest connection: the reader/writer surface the flow handler uses
    (``read``, ``write``, ``drain``, ``write_eof``, ``close``,
    ``get_extra_info("sockname")`` for the original destination).
    """

    def __init__(self, mux: StreamMux, conn_id: int, dst: tuple[str, int]) -> None:
        self._mux = mux
        self.id = conn_id
        self._dst = dst
        self._in: deque[bytes] = deque()
        self._in_bytes = 0
        self._in_eof = False
        self._consumed = 0
        self._readable = asyncio.Event()
        self._pending = bytearray()  # host -> guest, not yet framed (window full)
        self._unacked = 0
        self._eof_wanted = False
        self._eof_sent = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._host_done = False
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._dst if name in ("sockname", "original_dst") else default

    # -- guest -> host
    def _feed(self, data: bytes) -> None:
        if self._in_bytes + len(data) > UP_WINDOW:
            raise StreamProtocolError(f"connection {self.id}: more than the window unacknowledged")
        if self._mux._inbound + len(data) > INBOUND_MAX:
            raise StreamProtocolError(f"connection {self.id}: the host's buffers are full")
        self._in.append(data)
        self._in_bytes += len(data)
        self._mux._inbound += len(data)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._in_eof = True
        self._readable.set()

    async def read(self, n: int = -1) -> bytes:
        while not self._in and not self._in_eof and not self.closed and not self._host_done:
            self._readable.clear()
            await self._readable.wait()
        if not self._in:
            return b""
        data = self._in.popleft()
        if 0 < n < len(data):
            data, rest = data[:n], data[n:]
            self._in.appendleft(rest)
        self._in_bytes -= len(data)
        self._mux._inbound -= len(data)
        self._consumed += len(data)
        if self._consumed >= UP_WINDOW // 4:  # in quarters, as the guest does
            self._mux._send(ACK, self.id, self._consumed.to_bytes(4, "big"))
            self._consumed = 0
        return data

    # -- host -> guest
    def write(self, data: bytes) -> None:
        if self.closed or self._eof_wanted:
            return
        self._pending += data
        self._pump()

    def _pump(self) -> None:
        while (
            self._pending
            and self._unacked < WINDOW
            and not self.closed
            and self._mux._queued < QUEUE_MAX
        ):
            size = min(MAX_DATA, WINDOW - self._unacked, len(self._pending))
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self._unacked += size
            self._mux._send(DATA, self.id, chunk)
        if self._eof_wanted and not self._pending and not self._eof_sent and not self.closed:
            self._eof_sent = True
            self._mux._send(EOF, self.id, b"")
            if self._host_done:  # nothing more to send or read: the guest frees its end
                self.closed = True
                self._mux._forget(self.id)
        if not self._pending or self.closed:
            self._drained.set()
        else:
            self._drained.clear()

    def _ack(self, n: int) -> None:
        self._unacked = max(0, self._unacked - n)
        self._pump()

    async def drain(self) -> None:
        await self._drained.wait()
        if self.closed:
            raise ConnectionResetError(f"guest connection {self.id} closed")

    def write_eof(self) -> None:
        self._eof_wanted = True
        self._pump()

    def close(self) -> None:
        """The host is done: what it wrote still reaches the guest, then EOF."""
        if self.closed or self._host_done:
            return
        self._host_done = True
        self._eof_wanted = True
        self._readable.set()
        if self._eof_sent:  # its EOF went earlier: nothing is left to send
            self.closed = True
            self._mux._forget(self.id)
            self._drained.set()
            return
        self._pump()

    def abort(self) -> None:
        """Reset the guest's connection now (a denied flow: it sees the reset)."""
        if not self.closed:
            self._mux._send(CLOSE, self.id, b"")
        self._closed_by_guest()

    def _closed_by_guest(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._mux._forget(self.id)
        self._readable.set()
        self._drained.set()


#: Handles one guest connection (the stack's TCP flow handler).
OnFlow = Callable[[GuestStream], Awaitable[None]]


class StreamMux:
    """The host end of one ``agent --stream``: demultiplexes its stdout into
    :class:`GuestStream` flows and multiplexes their writes into its stdin.

    ``write_stdin`` sends bytes to the agent process; :meth:`feed` takes what
    it sends as it comes, nothing before its READY frame carrying ``token``;
    ``on_flow`` runs per connection (the caller tracks and bounds the tasks,
    as for WireGuard flows).
    """

    def __init__(
        self,
        write_stdin: Callable[[bytes], Awaitable[None]],
        on_flow: OnFlow,
        *,
        token: str,
        max_flows: int = 1024,
    ) -> None:
        self._write_stdin = write_stdin
        self._on_flow = on_flow
        self._max_flows = max_flows
        self._streams: dict[int, GuestStream] = {}
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._queued = 0
        self._inbound = 0
        self._out_ready = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()
        token_bytes = token.encode()
        self._ready_frame = _HEADER.pack(READY, 0, len(token_bytes)) + token_bytes
        self.failed: str | None = None
        self._last_id = 0

    def start(self) -> None:
        self._writer = asyncio.ensure_future(self._write_loop())

    def _send(self, kind: int, conn_id: int, payload: bytes) -> None:
        frame = _HEADER.pack(kind, conn_id, len(payload)) + payload
        self._out.append(frame)
        self._queued += len(frame)
        self._out_ready.set()

    async def _write_loop(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready.clear()
            batch, self._out = b"".join(self._out), []
            if batch:
                await self._write_stdin(batch)
                self._queued -= len(batch)
                for stream in list(self._streams.values()):
                    if stream._pending:
                        stream._pump()  # writers held back by QUEUE_MAX

    def _forget(self, conn_id: int) -> None:
        stream = self._streams.pop(conn_id, None)
        if stream is not None:  # what it never read is released
            self._inbound -= stream._in_bytes
            stream._in.clear()
            stream._in_bytes = 0

    def feed(self, data: bytes) -> None:
        """Take the agent's stdout; frames complete so far are dispatched.

        :raises StreamProtocolError: a frame is out of step or breaks a bound.
        """
        self._buf += data
        if not self.ready.is_set():
            # Whatever precedes this agent's READY (its token) is not its own:
            # a captured predecessor's frames in a restored guest. Dropped.
            at = self._buf.find(self._ready_frame)
            if at < 0:
                del self._buf[: max(0, len(self._buf) - len(self._ready_frame) + 1)]
                return
            del self._buf[: at + len(self._ready_frame)]
            self.ready.set()
        while len(self._buf) >= _HEADER.size:
            kind, conn_id, size = _HEADER.unpack_from(self._buf)
            if size > MAX_DATA:
                raise StreamProtocolError(f"frame of {size} bytes (at most {MAX_DATA})")
            if len(self._buf) < _HEADER.size + size:
                return
            payload = bytes(self._buf[_HEADER.size : _HEADER.size + size])
            del self._buf[: _HEADER.size + size]
            self._dispatch(kind, conn_id, payload)

    def _dispatch(self, kind: int, conn_id: int, payload: bytes) -> None:
        if kind == READY:
            raise StreamProtocolError("a second READY")
        if kind == OPEN:
            self._open(conn_id, payload)
            return
        stream = self._streams.get(conn_id)
        if stream is None:
            return  # closed by the host meanwhile
        if kind == DATA:
            try:
                stream._feed(payload)
            except StreamProtocolError:
                stream.abort()
        elif kind == EOF:
            stream._feed_eof()
        elif kind == CLOSE:
            stream._closed_by_guest()
        elif kind == ACK and len(payload) == 4:
            stream._ack(int.from_bytes(payload, "big"))

    def _open(self, conn_id: int, payload: bytes) -> None:
        family = payload[0] if payload else 0
        if (family, len(payload)) not in ((4, 7), (6, 19)) or conn_id <= self._last_id:
            raise StreamProtocolError(f"bad OPEN for connection {conn_id}")
        self._last_id = conn_id
        if len(self._streams) >= self._max_flows:
            self._send(CLOSE, conn_id, b"")
            return
        addr = payload[1:-2]
        ip = str(ipaddress.IPv4Address(addr) if family == 4 else ipaddress.IPv6Address(addr))
        port = int.from_bytes(payload[-2:], "big")
        stream = GuestStream(self, conn_id, (ip, port))
        self._streams[conn_id] = stream
        task = asyncio.ensure_future(self._run_flow(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_flow(self, stream: GuestStream) -> None:
        try:
            await self._on_flow(stream)
        except Exception:  # one flow's failure ends that flow only
            pass
        finally:
            stream.close()

    def end(self, reason: str) -> None:
        """The agent process ended (or broke the protocol): every flow ends."""
        self.failed = self.failed or reason
        for stream in list(self._streams.values()):
            stream._closed_by_guest()

    async def aclose(self) -> None:
        self.end("closed")
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
