"""The host side of one sandbox's network: a rootless user-mode TCP/IP stack.

Data path (docs/network.md)::

    guest socket -> wg0 (WireGuard, guest kernel) -> eth0 (virtio-net)
      -> QEMU -netdev dgram (one Ethernet frame per unix datagram, run_dir/net.*)
      -> the shim below (passes only UDP to the WireGuard endpoint, drops the rest)
      -> mitmproxy_rs's WireGuard server (smoltcp) on 127.0.0.1
      -> one asyncio stream per TCP connection / UDP flow -> policy -> host socket

No tap device, no CAP_NET_ADMIN, no iptables: every guest flow ends in this
process, which decides it against the :class:`NetworkPolicy` before it opens
any host socket. DNS to :data:`DNS_IP` is answered here (``_dns.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._exceptions import BackendUnavailableError
from ._dns import answer_query, resolve_host, resolve_host6
from ._policy import Destination, IPAddress, NetworkPolicy, Protocol
from ._secrets import SecretSubstituter, SubstitutionError
from ._streams import (
    NFT_TABLE,
    GuestStream,
    MuxTransport,
    StreamMux,
    StreamProtocolError,
    nft_ruleset,
)
from ._tls import TlsServer, ensure_ca, looks_like_tls

__all__ = [
    "DNS_IP",
    "GUARD_REFUSALS",
    "HOST_SOCKET",
    "LOOPBACK_ONLY_ENV",
    "QEMU_SOCKET",
    "STREAM_ENV",
    "NetworkEvent",
    "NetworkStack",
    "guest_resolv_conf",
    "network_used",
    "rehearsal_blob",
    "stop_rehearsals",
    "stream_path_enabled",
]

#: The shim's socket (QEMU's ``remote.path``) and QEMU's own (``local.path``),
#: inside the VM's run directory.
HOST_SOCKET = "net.sock"
QEMU_SOCKET = "net.qemu"
#: Set to 1 (the test suite does) to refuse every host dial outside 127.0.0.0/8
#: and never ask a real DNS resolver: a guard for machines that must stay local.
LOOPBACK_ONLY_ENV = "MICROSANDBOX_NETWORK_LOOPBACK_ONLY"
#: Set to 0 to keep every TCP flow on WireGuard (no stream path): for
#: measuring one path against the other, or an image whose nft misbehaves.
STREAM_ENV = "MICROSANDBOX_NETWORK_STREAM"

# The guest's link to the shim: a /30 of the benchmarking range 198.18.0.0/15,
# which no real destination uses; the shim is .1, the guest .2.
_GW_IP = ipaddress.IPv4Address("198.18.0.1")
_GUEST_ETH_IP = ipaddress.IPv4Address("198.18.0.2")
_ETH_PREFIX = 30
_WG_PORT = 51820
_GW_MAC = bytes.fromhex("020000000001")
#: The resolver the guest is told about (/etc/resolv.conf); routed through wg0.
DNS_IP = ipaddress.IPv4Address("198.18.0.53")
#: Names pinned with ``hosts=`` resolve, in the guest, to addresses of this
#: range; the host maps them back to the pinned address (the guest's own
#: 127.0.0.1 is its loopback, so it cannot be handed out as is).
_PIN_NET = ipaddress.IPv4Network("198.19.0.0/16")
#: IPv6 (RFC 5180's benchmarking range, which no real destination uses
#: either): wg0's own address is random in the first /64, a pinned name's
#: IPv6 guest address is in the second (AAAA answers), mapped back likewise.
_WG6_NET = ipaddress.IPv6Network("2001:2::/64")
_PIN_NET6 = ipaddress.IPv6Network("2001:2:0:1::/64")

_MAX_EVENTS = 10_000
#: Flows open at once per sandbox: each holds host sockets; past it, denied.
MAX_FLOWS = 1024
_MAX_NAMES = 4096
_READ = 65536
_UDP_IDLE_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
_DENY_CLOSE_DELAY_S = 0.5
#: How long the guest's stream listener may take to say READY.
_STREAM_START_S = 30.0
# NET flags (agent.c): no default route; a rehearsal (undone at the end).
_F_NO_ROUTE = 1
_F_REHEARSAL = 2


#: Starts ``agent --stream`` in the guest: the transport to it.
StartMux = Callable[[str], Awaitable[MuxTransport]]
#: Runs ``nft`` commands in the guest: True when they succeeded.
ApplyRule = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class NetworkEvent:
    """One connection attempt or DNS query and its verdict.

    ``verdict`` is ``allow``, ``deny`` or ``error`` (allowed, but the host
    could not reach the destination); ``bytes_out`` went guest -> destination,
    ``bytes_in`` back (final once the flow closed).
    """

    time: float
    protocol: str  # tcp, udp, dns
    destination: str  # the address the host dialled (or would have)
    port: int
    name: str | None
    verdict: str
    reason: str
    bytes_out: int = 0
    bytes_in: int = 0
    #: How the flow reached the host: ``wireguard`` or ``stream`` (TCP only).
    path: str = "wireguard"

    def describe(self) -> str:
        where = f"{self.name} ({self.destination})" if self.name else self.destination
        return (
            f"{self.protocol} {where}:{self.port} {self.verdict} [{self.reason}] "
            f"out={self.bytes_out} in={self.bytes_in}"
            + (" via stream" if self.path == "stream" else "")
        )


#: Destinations the loopback-only guard refused in this process (newest 100):
#: a test suite fails its run if any appear (tests/conftest.py).
GUARD_REFUSALS: deque[str] = deque(maxlen=100)


_used = False


_rehearsals_failed = False


def network_used() -> bool:
    """Whether this process has started a sandbox network (and no rehearsal
    failed): pooled clones then rehearse ``NET`` while they wait
    (:func:`rehearsal_blob`).
    """
    return _used and not _rehearsals_failed


def stream_path_enabled() -> bool:
    """Whether sandboxes start the stream path (``MICROSANDBOX_NETWORK_STREAM``
    is not ``0``); pooled clones rehearse its ``nft`` run only then.
    """
    return os.environ.get(STREAM_ENV, "") != "0"


def stop_rehearsals() -> None:
    """A rehearsal failed (an image the agent cannot rehearse in): stop them
    for this process, or every pooled clone would be discarded.
    """
    global _rehearsals_failed
    _rehearsals_failed = True


def _net_blob(
    mac: bytes,
    wg_ip: ipaddress.IPv4Address,
    key: bytes,
    peer: bytes,
    flags: int,
    wg_ip6: ipaddress.IPv6Address | None = None,
) -> bytes:
    """The ``NET`` payload; ``wg_ip6`` None is all zero: no IPv6 in the guest."""
    return struct.pack(
        "!6s4sB4sH4s32s32sB16s",
        mac,
        _GUEST_ETH_IP.packed,
        _ETH_PREFIX,
        _GW_IP.packed,
        _WG_PORT,
        wg_ip.packed,
        key,
        peer,
        flags,
        wg_ip6.packed if wg_ip6 is not None else bytes(16),
    )


def guest_resolv_conf() -> str:
    """The guest's /etc/resolv.conf with network on (sent with ``NET``)."""
    return f"# pytest-microsandbox: answered by the host through the policy\nnameserver {DNS_IP}\n"


def rehearsal_blob() -> bytes:
    """A ``NET`` payload with a throwaway identity that the agent applies and
    then undoes (the default route, the peer and the addresses removed, the
    image's resolv.conf put back: no path out). A restored TCG clone
    runs every kernel path cold (empty translation cache): a pooled clone that
    rehearses while it waits gives its sandbox's own ``NET`` translated code
    (measured: docs/network.md). Random keys (any 32 bytes are a valid X25519
    private key; the peer is never reached: nothing listens for a pooled clone).
    An IPv6 address too, removed with its routes like the IPv4 ones: wg0's
    first IPv6 address was the costliest step left cold (9-44 ms under TCG).
    """
    return _net_blob(
        bytes([0x02, *secrets.token_bytes(5)]),
        ipaddress.IPv4Address("100.64.0.1"),
        secrets.token_bytes(32),
        secrets.token_bytes(32),
        _F_REHEARSAL,
        _WG6_NET[secrets.randbelow(1 << 63) + 1],
    )


def _loopback_only() -> bool:
    return os.environ.get(LOOPBACK_ONLY_ENV, "") not in ("", "0")


@functools.cache
def _host_has_ipv6() -> bool:
    """Does the host route IPv6 to the internet? (A UDP connect picks a route
    and sends nothing.) Without, the guest is given no upstream AAAA answer.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.connect(("2001:4860:4860::8888", 53))
            return bool(ipaddress.ip_address(probe.getsockname()[0]).is_global)
    except OSError:
        return False


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total += total >> 16
    return ~total & 0xFFFF


class _Shim:
    """Passes WireGuard datagrams between QEMU's Ethernet frames and the
    WireGuard server's UDP socket; every other frame is dropped. Frames are
    guest data: parsed with bounds checks, never trusted.
    """

    def __init__(self, guest_mac: bytes, qemu_path: str) -> None:
        self.guest_mac = guest_mac
        self.qemu_path = qemu_path
        self.guest_port: bytes | None = None
        self.qemu: asyncio.DatagramTransport | None = None
        self.wg: asyncio.DatagramTransport | None = None
        self._eth = guest_mac + _GW_MAC + b"\x08\x00"
        self._gw = _GW_IP.packed
        self._guest = _GUEST_ETH_IP.packed

    def from_guest(self, frame: bytes) -> None:
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or self.wg is None:
            return
        vihl = frame[14]
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20:
            return
        total = int.from_bytes(frame[16:18], "big")
        if total > len(frame) - 14 or total < ihl + 8:
            return
        # UDP to the endpoint, not a fragment.
        if (
            frame[23] != 17
            or frame[30:34] != self._gw
            or frame[20:22] not in (b"\x00\x00", b"\x40\x00")
        ):
            return
        udp = 14 + ihl
        if int.from_bytes(frame[udp + 2 : udp + 4], "big") != _WG_PORT:
            return
        ulen = int.from_bytes(frame[udp + 4 : udp + 6], "big")
        if ulen < 8 or ulen > total - ihl:
            return
        self.guest_port = frame[udp : udp + 2]
        self.wg.sendto(frame[udp + 8 : udp + ulen])

    def to_guest(self, payload: bytes) -> None:
        if self.qemu is None or self.guest_port is None or len(payload) > 1472:
            return
        total = 28 + len(payload)
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0, self._gw, self._guest
        )
        ip = ip[:10] + _ip_checksum(ip).to_bytes(2, "big") + ip[12:]
        udp = struct.pack("!2sHH", self.guest_port, len(payload) + 8, 0)
        udp = _WG_PORT.to_bytes(2, "big") + udp
        # QEMU gone or its socket full: drop, the guest retransmits.
        with contextlib.suppress(OSError):
            self.qemu.sendto(self._eth + ip + udp + payload, self.qemu_path)


async def _refuse(stream: Any) -> None:
    """End a denied TCP flow as soon as the guest can see it end.

    smoltcp has answered the SYN before the flow reaches us (mitmproxy_rs hands
    a flow over at its SYN and offers no reset), and a close while the
    handshake is still in flight never sends the FIN. The guest's first bytes
    (or its FIN) prove the handshake done: close then, one round trip after a
    client-first connect (HTTP, TLS); a silent guest gets the FIN after
    ``_DENY_CLOSE_DELAY_S``. Nothing is dialled either way.
    """
    with contextlib.suppress(asyncio.TimeoutError, OSError, ConnectionError):
        await asyncio.wait_for(stream.read(1), _DENY_CLOSE_DELAY_S)


class _Prefixed:
    """The guest's stream whose first read is already in flight (``pending``)."""

    def __init__(self, stream: Any, pending: asyncio.Future[bytes]) -> None:
        self._stream = stream
        self._pending: asyncio.Future[bytes] | None = pending

    async def read(self, n: int) -> bytes:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return await pending
        return bytes(await self._stream.read(n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self._on = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on(data)

    def error_received(self, exc: Exception) -> None:
        pass  # the peer socket is not there (yet, or any more)


class NetworkStack:
    """The network of one sandbox: start it, send :meth:`guest_blob` to the
    agent (``NET``), read :meth:`events`, close it with the VM.
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        hosts: Mapping[str, str],
        run_dir: Path,
        substituter: SecretSubstituter | None = None,
        *,
        cache_dir: Path | None = None,
        upstream_ca_certs: tuple[Path, ...] = (),
    ) -> None:
        self.cache_dir = cache_dir
        #: Extra CAs the host trusts for intercepted upstream TLS (tests: trustme).
        self.upstream_ca_certs = upstream_ca_certs
        self._tls: TlsServer | None = None
        self.policy = policy
        #: The sandbox's secret placeholders and their substitution, if it has secrets.
        self.secrets = substituter
        self.run_dir = run_dir
        self._pins: dict[str, tuple[ipaddress.IPv4Address, IPAddress]] = {}
        self._pins6: dict[str, ipaddress.IPv6Address] = {}
        for i, (name, addr) in enumerate(sorted(hosts.items())):
            self._pins[name] = (_PIN_NET[i + 1], ipaddress.ip_address(addr))
            self._pins6[name] = _PIN_NET6[i + 1]
        self._by_pin: dict[IPAddress, tuple[str, IPAddress]] = {
            pin: (name, real) for name, (pin, real) in self._pins.items()
        }
        for name, pin6 in self._pins6.items():
            self._by_pin[pin6] = (name, self._pins[name][1])
        #: Names this sandbox's DNS answered, by address (domain rules for flows).
        self._names: dict[IPAddress, str] = {}
        self._events: deque[NetworkEvent] = deque(maxlen=_MAX_EVENTS)
        # events() is read from other threads (SyncSandbox's callers).
        self._events_lock = threading.Lock()
        self._flows = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Any = None
        self._transports: list[asyncio.BaseTransport] = []
        self.guest_mac = bytes([0x02, *secrets.token_bytes(5)])
        self._guest_key = ""
        self._server_pub = ""
        self._closed = False
        self._stream_task: asyncio.Task[None] | None = None
        self._stream_up = asyncio.Event()
        #: The stream path's state: "off" (not started), "starting", "on", or
        #: "off: why" (it ended or could not start: TCP goes over WireGuard).
        self.stream_state = "off"
        #: Which transport carries it once on (``PortTransport``: the VM's own
        #: virtio-serial port; ``ExecTransport``: the agent channel).
        self.stream_transport = ""

    @property
    def dns_ip(self) -> str:
        return str(DNS_IP)

    def pinned(self, name: str, *, ipv6: bool = False) -> str | None:
        """The guest-side address of a pinned name (its IPv6 one with ``ipv6``)."""
        pin = self._pins.get(name)
        if pin is None:
            return None
        return str(self._pins6[name]) if ipv6 else str(pin[0])

    async def start(self) -> None:
        """Start the WireGuard server and the shim.

        :raises BackendUnavailableError: mitmproxy_rs is missing or fails to start.
        """
        try:
            from mitmproxy_rs import wireguard
        except ImportError as exc:
            raise BackendUnavailableError(
                f"network needs mitmproxy_rs<0.11 ({exc}): pip install 'mitmproxy_rs<0.11'"
            ) from exc
        global _used
        _used = True
        server_key = wireguard.genkey()
        self._guest_key = wireguard.genkey()
        self._server_pub = wireguard.pubkey(server_key)
        loop = asyncio.get_running_loop()
        shim = _Shim(self.guest_mac, str(self.run_dir / QEMU_SOCKET))
        try:
            self._server = await wireguard.start_wireguard_server(
                "127.0.0.1",
                0,
                server_key,
                [wireguard.pubkey(self._guest_key)],
                self._on_tcp,
                self._on_udp,
            )
            host, port = self._server.getsockname()
            # A window of replies arrives at once (measured: the default buffer
            # dropped some under load, each drop a guest-side retransmission).
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
                udp.setblocking(False)
                udp.connect((host, port))
                wg, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(shim.to_guest), sock=udp
                )
            except BaseException:
                udp.close()
                raise
            self._transports.append(wg)
            shim.wg = wg
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(self.run_dir / HOST_SOCKET))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            qemu, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(shim.from_guest), sock=sock
            )
            self._transports.append(qemu)
            shim.qemu = qemu
        except BaseException:
            await self.aclose()
            raise

    def guest_blob(self) -> bytes:
        """The agent's ``NET`` payload: MAC, eth0 address and prefix, the
        WireGuard endpoint, wg0's address, the guest's key and the server's,
        flags (1: no default route, for a policy that allows nothing: the
        guest's connects then fail at once instead of being accepted by the
        stack and closed; the host still denies whatever a guest root routes),
        then wg0's IPv6 address (its default route follows the same flag).
        """
        allows_nothing = self.policy.base == "none" and not any(
            r.action == "allow" for r in self.policy.rules
        )
        wg_ip = ipaddress.IPv4Address("100.64.0.0") + secrets.randbelow(1 << 22) + 1
        return _net_blob(
            self.guest_mac,
            wg_ip,
            base64.b64decode(self._guest_key),
            base64.b64decode(self._server_pub),
            _F_NO_ROUTE if allows_nothing else 0,
            _WG6_NET[secrets.randbelow(1 << 63) + 1],
        )

    def resolv_conf(self) -> str:
        return guest_resolv_conf()

    def events(self) -> list[NetworkEvent]:
        """Every connection attempt and DNS query so far, oldest first (the
        newest 10,000).
        """
        with self._events_lock:
            return list(self._events)

    def _log(self, event: NetworkEvent) -> None:
        with self._events_lock:
            self._events.append(event)

    def _update(self, event: NetworkEvent, **changes: Any) -> None:
        # Replace in place (the deque may have rotated: search from the right).
        with self._events_lock:
            for i in range(len(self._events) - 1, -1, -1):
                if self._events[i] is event:
                    self._events[i] = replace(event, **changes)
                    return

    def _resolve_dest(self, ip_text: str, port: int, protocol: Protocol) -> Destination:
        ip = ipaddress.ip_address(ip_text.partition("%")[0])
        if ip in self._by_pin:
            name, real = self._by_pin[ip]
            return Destination(real, port, protocol, name)
        return Destination(ip, port, protocol, self._names.get(ip))

    def _guard(self, dest: Destination) -> str | None:
        if self._flows > MAX_FLOWS:
            return f"more than {MAX_FLOWS} flows open at once"
        if _loopback_only() and (dest.ip is None or not dest.ip.is_loopback):
            GUARD_REFUSALS.append(f"{dest.protocol} {dest.name or dest.ip}:{dest.port}")
            return f"{LOOPBACK_ONLY_ENV} is set: only 127.0.0.0/8 is dialled"
        return None

    def _track(self) -> asyncio.Task[Any] | None:
        # Flow handlers are tasks mitmproxy_rs starts on our loop: aclose cancels them.
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._flows += 1
        return task

    def _untrack(self, task: asyncio.Task[Any] | None) -> None:
        self._flows -= 1
        if task is not None:
            self._tasks.discard(task)

    async def _on_tcp(self, stream: Any) -> None:
        task = self._track()
        try:
            await self._tcp(stream)
        finally:
            self._untrack(task)
            with contextlib.suppress(OSError):  # "Server has been shut down"
                stream.close()

    def _admit(
        self, dst_ip: str, dst_port: int, proto: Protocol, path: str = "wireguard"
    ) -> tuple[Destination, NetworkEvent]:
        """Decide a flow by the policy and the loopback guard, before any host
        socket opens; the destination and the logged event (verdict allow/deny).
        """
        dest = self._resolve_dest(dst_ip, dst_port, proto)
        decision = self.policy.decide(dest)
        guard = self._guard(dest) if decision.allowed else None
        event = NetworkEvent(
            time.time(),
            proto,
            str(dest.ip),
            dst_port,
            dest.name,
            "allow" if decision.allowed and not guard else "deny",
            guard or decision.reason,
            path=path,
        )
        self._log(event)
        return dest, event

    async def _tcp(self, stream: Any) -> None:
        # The guest's destination: "sockname" of a WireGuard flow ("original_dst"
        # is the server's own UDP socket).
        dst_ip, dst_port = stream.get_extra_info("sockname")
        if ipaddress.ip_address(dst_ip) == DNS_IP and int(dst_port) == 53:
            await self._dns_tcp(stream)
            return
        path = "stream" if isinstance(stream, GuestStream) else "wireguard"
        dest, event = self._admit(dst_ip, int(dst_port), "tcp", path)
        if event.verdict != "allow":
            if isinstance(stream, GuestStream):
                stream.abort()  # the stream path can reset: the guest sees it at once
            else:
                await _refuse(stream)
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(str(dest.ip), dest.port), _CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self._update(event, verdict="error", reason=f"{event.reason}; connect: {exc}")
            return
        guest: Any = stream
        name = dest.name
        first_in: asyncio.Future[bytes] | None = None
        first_out = b""
        if self.secrets is not None:
            # Intercept TLS (the guest speaks first) so secrets can be substituted;
            # a server-first protocol is relayed as it comes. The guest's pending
            # read is never cancelled: mitmproxy_rs allows one read at a time.
            guest_first = asyncio.ensure_future(stream.read(_READ))
            server_first = asyncio.ensure_future(reader.read(_READ))
            await asyncio.wait({guest_first, server_first}, return_when=asyncio.FIRST_COMPLETED)
            if guest_first.done():
                first_out = guest_first.result()
                first_in = server_first
                if looks_like_tls(first_out):
                    server_first.cancel()
                    first_in = None
                    writer.close()
                    try:
                        guest, name = await self._tls_server().accept(
                            stream, first_out, dest.name or str(dest.ip)
                        )
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(
                                str(dest.ip),
                                dest.port,
                                ssl=self._upstream_tls(),
                                server_hostname=name,
                            ),
                            _CONNECT_TIMEOUT_S,
                        )
                    except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
                        self._update(event, verdict="error", reason=f"{event.reason}; TLS: {exc}")
                        return
                    first_out = b""
            else:  # the server spoke first: the guest's read stays pending
                first_in = server_first
                guest = _Prefixed(stream, guest_first)
        counts = [0, 0]
        rewriter = self.secrets.stream(name) if self.secrets is not None else None
        violation: list[str] = []

        async def pump(src: Any, dst: Any, i: int, first: bytes, pending: Any) -> None:
            try:
                data = first if pending is None else await pending
                while data or (pending is None and (data := await src.read(_READ))):
                    pending = None
                    counts[i] += len(data)
                    if i == 0 and rewriter is not None:
                        data = rewriter.feed(data)
                    dst.write(data)
                    await dst.drain()
                    data = b""
                if i == 0 and rewriter is not None:
                    dst.write(rewriter.flush())
                # A TLS upstream cannot half-close: it ends with the other direction.
                with contextlib.suppress(NotImplementedError):
                    dst.write_eof()
            except SubstitutionError as exc:
                violation.append(str(exc))
                writer.close()
                guest.close()
            except (OSError, ConnectionError, ssl.SSLError):
                pass

        try:
            await asyncio.gather(
                pump(guest, writer, 0, first_out, None), pump(reader, guest, 1, b"", first_in)
            )
        finally:
            writer.close()
            changes: dict[str, Any] = {"bytes_out": counts[0], "bytes_in": counts[1]}
            if name != dest.name:
                changes["name"] = name
            if violation:
                changes.update(verdict="deny", reason=violation[0])
            elif rewriter is not None and rewriter.substituted:
                changes["reason"] = f"{event.reason}; {rewriter.substituted} secret(s) substituted"
            self._update(event, **changes)

    def _tls_server(self) -> TlsServer:
        if self._tls is None:
            self._tls = TlsServer(ensure_ca(self.cache_dir), self.run_dir)
        return self._tls

    def _upstream_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        for path in self.upstream_ca_certs:
            ctx.load_verify_locations(cafile=str(path))
        return ctx

    async def _on_udp(self, stream: Any) -> None:
        task = self._track()
        try:
            await self._udp(stream)
        finally:
            self._untrack(task)
            with contextlib.suppress(OSError):  # "Server has been shut down"
                stream.close()

    async def _udp(self, stream: Any) -> None:
        # The guest's destination: "sockname" of a WireGuard flow ("original_dst"
        # is the server's own UDP socket).
        dst_ip, dst_port = stream.get_extra_info("sockname")
        if ipaddress.ip_address(dst_ip) == DNS_IP and int(dst_port) == 53:
            await self._dns(stream)
            return
        dest, event = self._admit(dst_ip, int(dst_port), "udp")
        if event.verdict != "allow":
            return
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)

        def on_reply(data: bytes) -> None:
            if not replies.full():
                replies.put_nowait(data)

        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(on_reply), remote_addr=(str(dest.ip), int(dst_port))
            )
        except OSError as exc:
            self._update(event, verdict="error", reason=f"{event.reason}; {exc}")
            return
        counts = [0, 0]

        async def outbound() -> None:
            while True:
                data = await asyncio.wait_for(stream.read(_READ), _UDP_IDLE_S)
                if not data:
                    return
                counts[0] += len(data)
                transport.sendto(data)

        async def inbound() -> None:
            while True:
                data = await asyncio.wait_for(replies.get(), _UDP_IDLE_S)
                counts[1] += len(data)
                stream.write(data)

        try:
            await asyncio.gather(outbound(), inbound())
        except (asyncio.TimeoutError, OSError, ConnectionError):
            pass
        finally:
            transport.close()
            self._update(event, bytes_out=counts[0], bytes_in=counts[1])

    async def _dns(self, stream: Any) -> None:
        while True:
            try:
                query = await asyncio.wait_for(stream.read(_READ), _UDP_IDLE_S)
            except (asyncio.TimeoutError, OSError, ConnectionError):
                return
            if not query:
                return
            reply = await self._answer_dns(query)
            if reply is not None:
                stream.write(reply)

    async def _dns_tcp(self, stream: Any) -> None:
        """DNS over TCP (RFC 7766: each message after its 2-byte length), the
        resolver a guest falls back to for a truncated answer or asks outright
        (``dig +tcp``, ``options use-vc``). The same answers as over UDP.
        """
        buf = b""
        try:
            while True:
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    data = await asyncio.wait_for(stream.read(_READ), _UDP_IDLE_S)
                    if not data:
                        return
                    buf += data
                size = int.from_bytes(buf[:2], "big")
                query, buf = buf[2 : 2 + size], buf[2 + size :]
                reply = await self._answer_dns(query)
                if reply is None:
                    return  # not DNS: the stream is out of step, close it
                stream.write(len(reply).to_bytes(2, "big") + reply)
                await stream.drain()
        except (asyncio.TimeoutError, OSError, ConnectionError):
            return

    async def _answer_dns(self, query: bytes) -> bytes | None:
        """The reply to one DNS message (None: unparsable), its events logged and
        the names it answered remembered for domain rules.
        """
        upstream = not _loopback_only()
        reply, events = await answer_query(
            query,
            self.policy,
            self._pins,
            resolve_host if upstream else None,
            v6_pins=self._pins6,
            resolver6=resolve_host6 if upstream and _host_has_ipv6() else None,
        )
        for name, verdict, reason, addrs in events:
            self._log(NetworkEvent(time.time(), "dns", ",".join(addrs), 53, name, verdict, reason))
            for addr in addrs:
                ip = ipaddress.ip_address(addr)
                if ip not in self._by_pin and len(self._names) < _MAX_NAMES:
                    self._names[ip] = name
        return reply

    def start_stream_path(
        self, start_mux: StartMux, apply_rule: ApplyRule, *, stale: bool = False
    ) -> None:
        """Start the stream path in the background (docs/network.md): until it
        is on, and whenever it is off, guest TCP goes over WireGuard. Both
        paths end in :meth:`_on_tcp`: one policy decision per flow, before any
        host socket opens.

        ``start_mux(token)`` starts ``agent --stream PORT VPORT TOKEN`` in the
        guest and returns the transport to it (:mod:`._streams`);
        ``apply_rule`` runs ``nft`` commands in the guest, True when they
        succeeded (False: no nft, no nftables modules: the path stays off).
        ``stale``: the guest may hold a captured sandbox's redirect, removed if
        the new path does not come up.
        """
        if not stream_path_enabled():
            self.stream_state = f"off: {STREAM_ENV}=0"
            if stale:  # a captured redirect would lead nowhere: remove it
                self._stream_task = asyncio.ensure_future(self._drop_redirect(apply_rule))
            return
        self.stream_state = "starting"
        self._stream_task = asyncio.ensure_future(self._stream_path(start_mux, apply_rule, stale))

    async def _drop_redirect(self, apply_rule: ApplyRule) -> None:
        with contextlib.suppress(Exception):
            await apply_rule(f"delete table inet {NFT_TABLE}")

    async def wait_stream_path(self, timeout: float) -> bool:
        """Wait until the stream path is on (True) or has failed or timed out (False)."""
        if self._stream_task is None:
            return False
        up = asyncio.ensure_future(self._stream_up.wait())
        try:
            await asyncio.wait(
                {up, self._stream_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            up.cancel()
        return self.stream_state == "on"

    async def _stream_path(self, start_mux: StartMux, apply_rule: ApplyRule, stale: bool) -> None:
        transport: MuxTransport | None = None
        mux: StreamMux | None = None
        ruled = False
        try:
            token = secrets.token_hex(16)
            transport = await start_mux(token)
            mux = StreamMux(transport.send, self._on_tcp, token=token, max_flows=MAX_FLOWS)
            mux.start()

            async def read(transport: MuxTransport, mux: StreamMux) -> None:
                async for data in transport.chunks():
                    mux.feed(data)

            reader = asyncio.ensure_future(read(transport, mux))
            ready = asyncio.ensure_future(mux.ready.wait())
            await asyncio.wait(
                {reader, ready}, timeout=_STREAM_START_S, return_when=asyncio.FIRST_COMPLETED
            )
            if not ready.done():
                ready.cancel()
                reader.cancel()
                self.stream_state = "off: the guest's stream listener did not start"
                return
            ruled = await apply_rule(nft_ruleset())
            if not ruled:
                reader.cancel()
                self.stream_state = (
                    "off: the guest could not redirect TCP (nft or its modules missing)"
                )
                return
            self.stream_state = "on"
            self.stream_transport = type(transport).__name__
            self._stream_up.set()
            try:
                await reader
                self.stream_state = "off: the guest's stream listener ended"
            except StreamProtocolError as exc:
                self.stream_state = f"off: {exc}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the guest failed to start it: WireGuard carries TCP
            self.stream_state = f"off: {exc}"
        finally:
            self._stream_up.set()
            if mux is not None:
                mux.end(self.stream_state)
            if transport is not None:
                await transport.aclose()
            if (ruled or stale) and not self._closed and self.stream_state != "on":
                # Connections would be redirected to nothing: back to WireGuard.
                with contextlib.suppress(Exception):
                    await apply_rule(f"delete table inet {NFT_TABLE}")
            if mux is not None:
                await mux.aclose()

    async def aclose(self) -> None:
        """Stop accepting flows, close every host socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._stream_task, 5)
        for transport in self._transports:
            transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()  # their host sockets close in their finally blocks
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        with contextlib.suppress(OSError):
            (self.run_dir / HOST_SOCKET).unlink()
