"""The stream path's host end: frames from a hostile guest are bounded, out of
step ends the path, flows get the guest's original destination, windows hold
(no VM: the frames are built here as ``agent --stream`` sends them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest

from pytest_microsandbox.runtime.network import _streams
from pytest_microsandbox.runtime.network._streams import (
    ACK,
    CLOSE,
    DATA,
    EOF,
    MAX_DATA,
    NFT_REHEARSAL_TABLE,
    NFT_TABLE,
    OPEN,
    QUEUE_MAX,
    READY,
    UP_WINDOW,
    WINDOW,
    GuestStream,
    StreamMux,
    StreamProtocolError,
    nft_rehearsal,
    nft_ruleset,
)

TOKEN = "t0ken"


def frame(kind: int, conn: int, payload: bytes = b"") -> bytes:
    return struct.pack("!BII", kind, conn, len(payload)) + payload


def ready() -> bytes:
    return frame(READY, 0, TOKEN.encode())


def open4(conn: int, ip: str, port: int) -> bytes:
    return frame(OPEN, conn, b"\x04" + ipaddress.IPv4Address(ip).packed + port.to_bytes(2, "big"))


def parse(sent: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while sent:
        kind, conn, size = struct.unpack_from("!BII", sent)
        out.append((kind, conn, sent[9 : 9 + size]))
        sent = sent[9 + size :]
    return out


class Harness:
    def __init__(self, on_flow: object = None) -> None:
        self.sent = b""
        self.flows: list[GuestStream] = []
        self.release = asyncio.Event()

        async def write(data: bytes) -> None:
            self.sent += data

        async def default(stream: GuestStream) -> None:
            self.flows.append(stream)
            await self.release.wait()

        self.mux = StreamMux(write, on_flow or default, token=TOKEN, max_flows=2)  # type: ignore[arg-type]
        self.mux.start()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_bytes_before_ready_are_dropped_and_flows_get_the_original_destination() -> None:
    async def main() -> None:
        h = Harness()
        # A captured predecessor's half frame, then this agent's READY.
        h.mux.feed(b"\x02\x00\x00\x00\x07\xff\xff" + ready()[:4])
        assert not h.mux.ready.is_set()
        h.mux.feed(ready()[4:] + open4(1, "198.19.0.1", 8443))
        await settle()
        assert h.mux.ready.is_set()
        assert h.flows[0].get_extra_info("sockname") == ("198.19.0.1", 8443)
        v6 = b"\x06" + ipaddress.IPv6Address("2001:2:0:1::1").packed + (443).to_bytes(2, "big")
        h.mux.feed(frame(OPEN, 2, v6))
        await settle()
        assert h.flows[1].get_extra_info("sockname") == ("2001:2:0:1::1", 443)
        h.release.set()
        await h.mux.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    "bad",
    [
        struct.pack("!BII", DATA, 1, MAX_DATA + 1),  # a frame past the bound
        frame(OPEN, 1, b"\x04\x7f\x00"),  # a short OPEN
        frame(OPEN, 1, b"\x05" + bytes(6)),  # an unknown family
        frame(READY, 0, TOKEN.encode()),  # a second READY
    ],
)
def test_a_frame_out_of_step_ends_the_path(bad: bytes) -> None:
    async def main() -> None:
        h = Harness()
        h.mux.feed(ready())
        with pytest.raises(StreamProtocolError):
            h.mux.feed(bad)
        await h.mux.aclose()

    asyncio.run(main())


def test_ids_only_grow_and_past_max_flows_the_guest_gets_a_reset() -> None:
    async def main() -> None:
        h = Harness()
        h.mux.feed(ready() + open4(5, "1.2.3.4", 1) + open4(6, "1.2.3.4", 2))
        with pytest.raises(StreamProtocolError):
            h.mux.feed(open4(6, "1.2.3.4", 3))  # a reused id
        h2 = Harness()
        h2.mux.feed(ready() + open4(1, "1.2.3.4", 1) + open4(2, "1.2.3.4", 2))
        h2.mux.feed(open4(3, "1.2.3.4", 3))  # max_flows=2
        await settle()
        assert (CLOSE, 3, b"") in parse(h2.sent)
        assert len(h2.flows) == 2
        for x in (h, h2):
            x.release.set()
            await x.mux.aclose()

    asyncio.run(main())


def test_guest_data_is_read_in_order_acknowledged_and_bounded_by_the_window() -> None:
    async def main() -> None:
        h = Harness()
        h.mux.feed(ready() + open4(1, "1.2.3.4", 80))
        await settle()
        flow = h.flows[0]
        chunk = b"x" * MAX_DATA
        for _ in range(UP_WINDOW // MAX_DATA):
            h.mux.feed(frame(DATA, 1, chunk))
        got = b""
        while len(got) < UP_WINDOW:
            got += await flow.read(1 << 20)
        await settle()
        acks = [int.from_bytes(p, "big") for k, _, p in parse(h.sent) if k == ACK]
        assert sum(acks) == UP_WINDOW  # the guest may send the whole window again
        for _ in range(UP_WINDOW // MAX_DATA):
            h.mux.feed(frame(DATA, 1, chunk))
        h.mux.feed(frame(DATA, 1, b"!"))  # one byte past the window: the flow is reset
        await settle()
        assert flow.closed and (CLOSE, 1, b"") in parse(h.sent)
        h.release.set()
        await h.mux.aclose()

    asyncio.run(main())


def test_host_writes_wait_for_the_guests_acks_then_end_with_eof() -> None:
    async def main() -> None:
        h = Harness()
        h.mux.feed(ready() + open4(1, "1.2.3.4", 80))
        await settle()
        flow = h.flows[0]
        flow.write(b"y" * (WINDOW + 10))
        drained = asyncio.ensure_future(flow.drain())
        await settle()
        assert not drained.done()  # the window is full
        data = [p for k, _, p in parse(h.sent) if k == DATA]
        assert sum(map(len, data)) == WINDOW and max(map(len, data)) <= MAX_DATA
        h.mux.feed(frame(ACK, 1, (WINDOW // 4).to_bytes(4, "big")))
        await settle()
        assert drained.done()
        flow.write_eof()
        flow.close()  # graceful: everything written reaches the guest, then EOF
        await settle()
        frames = parse(h.sent)
        assert sum(len(p) for k, _, p in frames if k == DATA) == WINDOW + 10
        assert frames[-1] == (EOF, 1, b"") and (CLOSE, 1, b"") not in frames
        assert flow.closed and not h.mux._streams  # the guest frees its end
        h.release.set()
        await h.mux.aclose()

    asyncio.run(main())


def test_a_denied_flow_is_reset_and_the_guest_close_ends_reads() -> None:
    async def main() -> None:
        h = Harness()
        h.mux.feed(ready() + open4(1, "1.2.3.4", 80) + open4(2, "1.2.3.4", 81))
        await settle()
        h.flows[0].abort()
        await settle()
        assert parse(h.sent)[-1] == (CLOSE, 1, b"")
        reading = asyncio.ensure_future(h.flows[1].read(10))
        h.mux.feed(frame(CLOSE, 2))
        await settle()
        assert reading.result() == b""
        h.release.set()
        await h.mux.aclose()

    asyncio.run(main())


def test_the_redirect_leaves_the_guest_loopback_and_the_hosts_link_alone() -> None:
    rules = nft_ruleset(15001)
    assert "127.0.0.0/8" in rules and "198.18.0.0/16" in rules and "::1" in rules
    assert "198.19" not in rules  # pinned names go through it
    assert rules.count("redirect to :15001") == 2


def test_the_nft_rehearsal_is_the_ruleset_in_its_own_table_deleted_in_the_same_run() -> None:
    rehearsal = nft_rehearsal()
    assert NFT_TABLE not in rehearsal  # never the real redirect's table
    own = f"inet {NFT_REHEARSAL_TABLE}"
    body = nft_ruleset(table=NFT_REHEARSAL_TABLE)
    assert rehearsal.startswith(body)  # the same kernel paths: table, nat chain, rules
    # One nft run is one transaction: ending with the delete, nothing is committed.
    assert rehearsal.removeprefix(body) == f"; delete table {own}"


def test_a_guest_that_stops_reading_cannot_make_the_host_queue_without_bound() -> None:
    async def main() -> None:
        unblock = asyncio.Event()
        flows: list[GuestStream] = []
        sent: list[bytes] = []

        async def stuck(data: bytes) -> None:
            sent.append(data)
            await unblock.wait()  # the guest reads nothing from its port

        async def keep(stream: GuestStream) -> None:
            flows.append(stream)
            await asyncio.Event().wait()

        mux = StreamMux(stuck, keep, token=TOKEN, max_flows=64)
        mux.start()
        mux.feed(ready() + b"".join(open4(i, "1.2.3.4", 80) for i in range(1, 41)))
        await settle()
        for flow in flows:  # 40 x 512 KiB would be 20 MiB
            flow.write(b"z" * WINDOW)
        await settle()
        assert mux._queued <= QUEUE_MAX + MAX_DATA + 9
        assert any(flow._pending for flow in flows)  # held back, not dropped
        unblock.set()
        await settle()
        await mux.aclose()

    asyncio.run(main())


def test_guest_bytes_buffered_on_the_host_are_capped_across_flows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_streams, "INBOUND_MAX", 3 * UP_WINDOW)

    async def main() -> None:
        h = Harness()
        h.mux._max_flows = 8
        h.mux.feed(ready() + b"".join(open4(i, "1.2.3.4", 80) for i in range(1, 5)))
        await settle()
        chunk = b"u" * MAX_DATA
        for conn in range(1, 5):  # nobody reads: the fourth flow overflows the host
            for _ in range(UP_WINDOW // MAX_DATA):
                h.mux.feed(frame(DATA, conn, chunk))
        await settle()
        assert [f.closed for f in h.flows] == [False, False, False, True]
        assert h.mux._inbound == 3 * UP_WINDOW
        h.flows[0].abort()  # a closed flow's unread bytes are released
        assert h.mux._inbound == 2 * UP_WINDOW
        h.release.set()
        await h.mux.aclose()

    asyncio.run(main())
