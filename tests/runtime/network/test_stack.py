"""The shim between QEMU's frames and the WireGuard server: hostile frames are
dropped, replies are well-formed (no VM; the event log's bounds too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest

from pytest_microsandbox.runtime.network import NetworkPolicy, NetworkStack
from pytest_microsandbox.runtime.network._stack import _GUEST_ETH_IP, _GW_IP, _ip_checksum, _Shim

MAC = bytes.fromhex("02aabbccddee")


class _Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((data, addr))


def frame(
    payload: bytes,
    *,
    dport: int = 51820,
    proto: int = 17,
    flags: int = 0x4000,
    total: int | None = None,
    ulen: int | None = None,
    ethertype: bytes = b"\x08\x00",
) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, ulen if ulen is not None else 8 + len(payload), 0)
    length = total if total is not None else 20 + len(udp) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, length, 0, flags, 64, proto, 0,
        _GUEST_ETH_IP.packed, _GW_IP.packed,
    )  # fmt: skip
    return bytes(6) + MAC + ethertype + ip + udp + payload


@pytest.fixture
def shim() -> tuple[_Shim, _Sink, _Sink]:
    s = _Shim(MAC, "/nonexistent/net.qemu")
    wg, qemu = _Sink(), _Sink()
    s.wg, s.qemu = wg, qemu  # type: ignore[assignment]
    return s, wg, qemu


def test_only_udp_to_the_endpoint_passes(shim: tuple[_Shim, _Sink, _Sink]) -> None:
    s, wg, _ = shim
    for bad in (
        b"",
        b"\x00" * 41,
        frame(b"x", ethertype=b"\x86\xdd"),  # IPv6
        frame(b"x", proto=6),  # TCP
        frame(b"x", dport=53),
        frame(b"x", flags=0x2000),  # a fragment
        frame(b"x", total=9000),  # longer than the frame
        frame(b"x", ulen=4000),  # UDP length past the packet
        frame(b"x", ulen=3),
    ):
        s.from_guest(bad)
    assert wg.sent == []
    s.from_guest(frame(b"handshake"))
    assert wg.sent == [(b"handshake", None)]


def test_replies_are_well_formed_frames(shim: tuple[_Shim, _Sink, _Sink]) -> None:
    s, _, qemu = shim
    s.to_guest(b"early")  # no guest port known yet: dropped
    assert qemu.sent == []
    s.from_guest(frame(b"hello"))
    s.to_guest(b"reply")
    s.to_guest(b"x" * 2000)  # larger than the link: dropped
    [(out, addr)] = qemu.sent
    assert addr == "/nonexistent/net.qemu"
    assert out[:6] == MAC and out[12:14] == b"\x08\x00"
    assert _ip_checksum(out[14:34]) == 0  # a valid header sums to zero
    assert ipaddress.IPv4Address(out[30:34]) == _GUEST_ETH_IP
    assert struct.unpack("!HH", out[34:38]) == (51820, 40000)
    assert out[42:] == b"reply"


def test_the_event_log_is_bounded(tmp_path: Path) -> None:
    from pytest_microsandbox.runtime.network import NetworkEvent

    stack = NetworkStack(NetworkPolicy.none(), {"a.test": "127.0.0.1"}, tmp_path)
    for i in range(10_050):
        stack._log(NetworkEvent(float(i), "tcp", "1.2.3.4", 80, None, "deny", "x"))
    events = stack.events()
    assert len(events) == 10_000 and events[0].time == 50.0
    assert stack.pinned("a.test") == "198.19.0.1"


def test_a_rehearsal_has_a_throwaway_identity_and_asks_to_be_undone(tmp_path: Path) -> None:
    from pytest_microsandbox.runtime.network import rehearsal_blob

    stack = NetworkStack(NetworkPolicy.public_only(), {}, tmp_path)
    stack._guest_key = stack._server_pub = "A" * 44  # base64 of 32 bytes
    real = stack.guest_blob()
    one, two = rehearsal_blob(), rehearsal_blob()
    assert len(one) == len(real) == 102  # the agent's NET_LEN
    assert one[85] == 2 and real[85] == 0  # NET_F_REHEARSAL; a real NET keeps its route
    # IPv6 too (its paths rehearsed like the rest), in the same /64 as a real NET's.
    v6 = [ipaddress.IPv6Address(b[86:]) for b in (one, two, real)]
    assert all(a in ipaddress.IPv6Network("2001:2::/64") for a in v6)
    assert one[:6] != two[:6] and one[21:85] != two[21:85]  # MAC, keys: fresh each time
    assert len(set(v6)) == 3  # and IPv6 address
    assert one[6:17] == real[6:17]  # same eth0 address and endpoint: the same kernel paths
    assert NetworkStack(NetworkPolicy.none(), {}, tmp_path).guest_blob()[85] == 1  # no route


class _Stream:
    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        if self.data is None:
            await asyncio.Event().wait()  # a silent guest
        return self.data or b""


def test_a_denied_flow_ends_at_the_guests_first_byte_or_after_the_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_microsandbox.runtime.network import _stack

    monkeypatch.setattr(_stack, "_DENY_CLOSE_DELAY_S", 0.05)
    for data in (b"GET", b"", None):  # client-first, an early FIN, server-first
        stream = _Stream(data)
        asyncio.run(_stack._refuse(stream))  # returns (then the caller closes): never hangs
        assert stream.reads == 1


def test_pooled_clones_rehearse_once_a_network_started_until_a_rehearsal_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_microsandbox.runtime.network import _stack, network_used, stop_rehearsals

    monkeypatch.setattr(_stack, "_used", False)
    monkeypatch.setattr(_stack, "_rehearsals_failed", False)
    assert not network_used()
    monkeypatch.setattr(_stack, "_used", True)  # as NetworkStack.start does
    assert network_used()
    stop_rehearsals()
    assert not network_used()
