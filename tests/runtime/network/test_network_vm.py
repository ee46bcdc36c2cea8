"""Host-controlled networking against real QEMU VMs (TCG here).

Every server listens on the host's 127.0.0.1 and the guest reaches it through
names pinned with ``hosts=``; the suite's conftest sets the loopback-only
guard, so the host side never dials anything else. One sandbox with a mixed
policy serves most tests; one guest Python run checks several destinations.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import mmap
import os
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from pytest_microsandbox.runtime import (
    ConfigError,
    Sandbox,
    SandboxConfig,
    SandboxError,
    SyncSandbox,
)
from pytest_microsandbox.runtime.network import (
    NetworkEvent,
    NetworkPolicy,
    Rule,
    Secret,
    guest_resolv_conf,
    nft_rehearsal,
    rehearsal_blob,
)

pytestmark = pytest.mark.vm

GUEST = r"""
import json, socket, sys
out = []
for kind, host, port in json.loads(sys.argv[1]):
    try:
        if kind == "tcp":
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"ping")
            out.append(["ok", s.recv(100).decode()])
            s.close()
        elif kind == "tcp6":  # by name (AAAA) or literal, over IPv6 only
            addr = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
            s = socket.socket(socket.AF_INET6)
            s.settimeout(10)
            s.connect(addr)
            s.sendall(b"ping")
            out.append(["ok", s.recv(100).decode()])
            s.close()
        elif kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(10)
            s.sendto(b"ping", (host, port))
            out.append(["ok", s.recv(100).decode()])
        elif kind == "dnstcp":  # an A query over TCP to the resolver in resolv.conf
            ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")]
            qname = b"".join(bytes([len(p)]) + p.encode() for p in host.split(".")) + b"\0"
            query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\0\1\0\1"
            s = socket.create_connection((ns[0], 53), timeout=10)
            for _ in range(2):  # two queries on one connection
                s.sendall(len(query).to_bytes(2, "big") + query)
                reply = b""
                while len(reply) < 2 or len(reply) < 2 + int.from_bytes(reply[:2], "big"):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    reply += chunk
            reply = reply[2:]
            rcode, answers = reply[3] & 15, int.from_bytes(reply[6:8], "big")
            addr = socket.inet_ntoa(reply[-4:]) if answers else ""
            out.append(["ok", f"rcode={rcode} {addr}"])
            s.close()
        else:
            out.append(["ok", socket.gethostbyname(host)])
    except Exception as exc:
        out.append(["error", type(exc).__name__])
print(json.dumps(out))
"""


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        if isinstance(self.request, tuple):  # UDP: (data, socket)
            data, sock = self.request
            sock.sendto(b"udp:" + data, self.client_address)
            return
        while data := self.request.recv(65536):
            self.request.sendall(b"tcp:" + data)


class _Tcp6Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6


def events_when(
    read: Callable[[], list[NetworkEvent]], done: Callable[[list[NetworkEvent]], bool]
) -> list[NetworkEvent]:
    """The events once ``done`` holds (a flow's byte counts and substitutions
    are written when the host side has closed it, a moment after the guest's
    last read), or after 10 s, for the assertions to say what is missing.
    """
    deadline = time.monotonic() + 10.0
    while not done(events := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return events


async def events_when_async(
    read: Callable[[], list[NetworkEvent]], done: Callable[[list[NetworkEvent]], bool]
) -> list[NetworkEvent]:
    """:func:`events_when` without blocking the loop that finishes the flows."""
    deadline = time.monotonic() + 10.0
    while not done(events := read()) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    return events


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, socket.socket | int]]:
    tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    tcp6 = _Tcp6Server(("::1", 0), _Echo)
    udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _Echo)
    # A listener nobody accepts on: a denied connection must never reach it.
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    for server in (tcp, udp, tcp6):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {
        "tcp": tcp.server_address[1],
        "tcp6": tcp6.server_address[1],
        "udp": udp.server_address[1],
        "trap": trap.getsockname()[1],
        "trap_socket": trap,
    }
    for server in (tcp, udp, tcp6):
        server.shutdown()
        server.server_close()
    trap.close()


HOSTS = {
    "echo.test": "127.0.0.1",
    "trap.test": "127.0.0.1",
    "x.ads.test": "127.0.0.1",
    "udp.test": "127.0.0.1",
    "v6.test": "::1",  # the host's IPv6 loopback, reached from the guest's IPv6
}


@pytest.fixture(scope="module")
def net_sandbox(servers: dict[str, int]) -> Iterator[SyncSandbox]:
    policy = (
        NetworkPolicy.public_only()
        .deny(Rule.domain_suffix(".ads.test"))
        .allow(Rule.host("echo.test", ports=[servers["tcp"]], protocol="tcp"))
        .allow(Rule.host("udp.test", protocol="udp"))
        .allow(Rule.host("v6.test", protocol="tcp"))
    )
    config = SandboxConfig(name="net", network=policy, hosts=HOSTS)
    with SyncSandbox.create(config) as sb:
        yield sb


def run(sb: SyncSandbox, actions: list[tuple[str, str, int]]) -> list[list[str]]:
    out = sb.exec(sys.executable, ["-c", GUEST, json.dumps(actions)], timeout=180)
    assert out.exit_code == 0, out.stderr_bytes[-2000:]
    return json.loads(out.stdout_bytes)  # type: ignore[no-any-return]


def test_policy_decides_every_flow_before_a_host_socket_opens(
    net_sandbox: SyncSandbox, servers: dict[str, int]
) -> None:
    trap = servers["trap_socket"]
    trap_pin = net_sandbox.network.pinned("trap.test")
    results = run(
        net_sandbox,
        [
            ("tcp", "echo.test", servers["tcp"]),  # allowed by name, port, protocol
            ("udp", "udp.test", servers["udp"]),  # allowed, UDP
            ("dns", "trap.test", 0),  # pinned to loopback, no rule: NXDOMAIN
            ("dns", "x.ads.test", 0),  # blocked suffix: NXDOMAIN
            ("tcp", str(trap_pin), servers["trap"]),  # by address: denied
            ("tcp", "echo.test", servers["trap"]),  # allowed name, wrong port
        ],
    )
    assert results[0] == ["ok", "tcp:ping"]
    assert results[1] == ["ok", "udp:ping"]
    assert results[2][0] == "error" and results[3][0] == "error"
    # smoltcp completes the handshake before the host decides: a denied flow is
    # accepted by the stack, then closed with no byte, and never dialled.
    assert results[4] in (["ok", ""], ["error", "ConnectionResetError"])
    assert results[5] in (["ok", ""], ["error", "ConnectionResetError"])
    readable, _, _ = select.select([trap], [], [], 0)
    assert not readable, "a denied connection reached the host listener"

    events = events_when(
        net_sandbox.network.events,
        lambda evs: any(e.verdict == "allow" and e.protocol == "tcp" and e.bytes_in for e in evs),
    )
    by = {(e.protocol, e.name, e.port, e.verdict) for e in events}
    assert ("tcp", "echo.test", servers["tcp"], "allow") in by
    assert ("udp", "udp.test", servers["udp"], "allow") in by
    assert ("dns", "trap.test", 53, "deny") in by
    assert ("dns", "x.ads.test", 53, "deny") in by
    assert ("tcp", "trap.test", servers["trap"], "deny") in by
    assert ("tcp", "echo.test", servers["trap"], "deny") in by
    echo = next(e for e in events if e.protocol == "tcp" and e.verdict == "allow")
    assert (echo.bytes_out, echo.bytes_in) == (4, 8)
    assert echo.destination == "127.0.0.1"


def test_dns_over_tcp_gets_the_same_answers_as_over_udp(net_sandbox: SyncSandbox) -> None:
    results = run(
        net_sandbox,
        [("dnstcp", "echo.test", 0), ("dnstcp", "x.ads.test", 0), ("dns", "echo.test", 0)],
    )
    pin = net_sandbox.network.pinned("echo.test")
    assert results[0] == ["ok", f"rcode=0 {pin}"]
    assert results[1] == ["ok", "rcode=3 "]  # NXDOMAIN: the blocked suffix
    assert results[2] == ["ok", pin]
    dns = [(e.name, e.verdict) for e in net_sandbox.network.events() if e.protocol == "dns"]
    assert dns.count(("x.ads.test", "deny")) >= 2  # both TCP queries were decided


def test_ipv6_in_the_guest_is_decided_by_the_host_like_ipv4(
    net_sandbox: SyncSandbox, servers: dict[str, int]
) -> None:
    addrs = net_sandbox.fs().read("/proc/net/if_inet6").decode()
    wg0 = [line.split()[0] for line in addrs.splitlines() if line.split()[-1] == "wg0"]
    assert len(wg0) == 1 and wg0[0].startswith("2001000200000000")  # 2001:2::/64
    routes = net_sandbox.fs().read("/proc/net/ipv6_route").decode().splitlines()
    assert any(r.startswith("0" * 32 + " 00 ") and r.split()[-1] == "wg0" for r in routes)
    trap_pin6 = net_sandbox.network.pinned("trap.test", ipv6=True)
    results = run(
        net_sandbox,
        [
            ("tcp6", "v6.test", servers["tcp6"]),  # AAAA pin -> host ::1, allowed by name
            ("tcp6", "fd00::1", servers["tcp6"]),  # ULA: private
            ("tcp6", "2001:db8::1", servers["tcp6"]),  # documentation: special
            ("tcp6", str(trap_pin6), servers["trap"]),  # pinned to 127.0.0.1, no rule
        ],
    )
    assert results[0] == ["ok", "tcp:ping"], results
    for denied in results[1:]:
        assert denied in (["ok", ""], ["error", "ConnectionResetError"]), results
    readable, _, _ = select.select([servers["trap_socket"]], [], [], 0)
    assert not readable, "a denied connection reached the host listener"
    events = net_sandbox.network.events()
    by = {(e.protocol, e.destination, e.port, e.verdict) for e in events}
    assert ("tcp", "::1", servers["tcp6"], "allow") in by
    assert ("tcp", "fd00::1", servers["tcp6"], "deny") in by
    assert ("tcp", "2001:db8::1", servers["tcp6"], "deny") in by
    assert ("tcp", "127.0.0.1", servers["trap"], "deny") in by
    reasons = {e.destination: e.reason for e in events if e.verdict == "deny"}
    assert "private" in reasons["fd00::1"] and "special" in reasons["2001:db8::1"]


def test_network_none_has_an_interface_and_denies_everything(servers: dict[str, int]) -> None:
    config = SandboxConfig(name="net-none", network="none", hosts=HOSTS)
    with SyncSandbox.create(config) as sb:
        pin = sb.network.pinned("echo.test")
        results = run(sb, [("dns", "echo.test", 0), ("tcp", str(pin), servers["tcp"])])
        # No route: the lookup and the connect fail at once in the guest.
        assert results == [["error", "gaierror"], ["error", "OSError"]]
        assert sb.fs().read("/sys/class/net/wg0/operstate")  # the interface exists
        # A guest root that adds the route gains nothing: the host denies.
        sb.exec("ip", ["route", "add", "default", "dev", "wg0"], user="0")
        results = run(sb, [("dns", "echo.test", 0), ("tcp", str(pin), servers["tcp"])])
        assert results[0][0] == "error"
        assert results[1] in (["ok", ""], ["error", "ConnectionResetError"])
        assert {e.verdict for e in sb.network.events()} == {"deny"}


def test_live_clones_share_no_identity_and_a_fork_has_network(
    net_sandbox: SyncSandbox, servers: dict[str, int]
) -> None:
    with net_sandbox.fork() as child:
        # Ready at the child's first command.
        assert run(child, [("tcp", "echo.test", servers["tcp"])]) == [["ok", "tcp:ping"]]
        macs = {sb.fs().read("/sys/class/net/eth0/address") for sb in (net_sandbox, child)}
        assert len(macs) == 2
        # wg0's IPv6 address is fresh too, the parent's gone from the child's wg0.
        v6 = [
            [
                line.split()[0]
                for line in sb.fs().read("/proc/net/if_inet6").decode().splitlines()
                if line.split()[-1] == "wg0"
            ]
            for sb in (net_sandbox, child)
        ]
        assert len(v6[0]) == len(v6[1]) == 1 and v6[0] != v6[1], v6
        assert child.network is not net_sandbox.network
    # The parent's network still works after its child went away.
    assert run(net_sandbox, [("tcp", "echo.test", servers["tcp"])]) == [["ok", "tcp:ping"]]


def test_a_sandbox_without_network_has_no_stack() -> None:
    config = SandboxConfig(name="net-off")
    with SyncSandbox.create(config) as sb:
        # The NIC and wg0 exist in every template, but nothing has a route.
        routes = sb.fs().read("/proc/net/route").decode().splitlines()[1:]
        assert routes == []
        addresses = sb.fs().read("/proc/net/fib_trie").decode()
        assert "198.18.0.2" not in addresses  # eth0 has no address
        # A pooled clone may have rehearsed NET (this process used a network):
        # it undid it, resolv.conf included.
        resolv = sb.exec("cat", ["/etc/resolv.conf"]).stdout_bytes
        assert b"answered by the host" not in resolv
        with pytest.raises(Exception, match="has no network"):
            sb.network  # noqa: B018


#: The guest's view of its network, as root: every IPv4 and IPv6 route (all
#: tables), wg0's and eth0's addresses, wg0's key and peers (generic netlink:
#: the image has no ``wg``), nftables, a connect each way.
GUEST_NETSTATE = r"""
import errno, json, socket, struct, subprocess
def routes6():
    out = []
    for line in open("/proc/net/ipv6_route"):
        f = line.split()
        if f[-1] != "lo":
            out.append(f[0] + "/" + str(int(f[1], 16)) + " " + f[-1])
    return out
def connect(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(addr)
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()
def attrs(data):  # netlink attributes: type -> payload (nested flag dropped)
    out, off = {}, 0
    while off + 4 <= len(data):
        n, t = struct.unpack_from("=HH", data, off)
        if n < 4:
            break
        out[t & 0x3FFF] = data[off + 4 : off + n]
        off += (n + 3) & ~3
    return out
def genl(sock, family, cmd, flags, payload):
    hdr = struct.pack("=IHHII", 16 + 4 + len(payload), family, 1 | flags, 1, 0)
    sock.send(hdr + bytes([cmd, 1, 0, 0]) + payload)
    data = sock.recv(65536)
    if struct.unpack_from("=H", data, 4)[0] == 2:  # NLMSG_ERROR
        raise OSError(-struct.unpack_from("=i", data, 16)[0], "genetlink")
    return attrs(data[20 : struct.unpack_from("=I", data)[0]])
def wg0_identity():  # which of private key (3) and peers (8) wg0 has
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    name = b"wireguard\0"
    fam = genl(s, 0x10, 3, 0, struct.pack("=HH", 4 + len(name), 2) + name + b"\0\0")
    fam_id = struct.unpack("=H", fam[1][:2])[0]
    dev = genl(s, fam_id, 0, 0x300, struct.pack("=HH", 8, 2) + b"wg0\0")  # GET_DEVICE, dump
    return sorted(k for k, v in dev.items() if k in (3, 8) and v.strip(b"\0"))
fib = open("/proc/net/fib_trie").read()
print(json.dumps({
    "wg0": wg0_identity(),
    "routes": open("/proc/net/route").read().splitlines()[1:],
    "routes6": routes6(),
    "addrs6": [l.split()[-1] for l in open("/proc/net/if_inet6") if l.split()[-1] != "lo"],
    "addrs4": [a for a in ("198.18.0.2", "100.64.0.1") if a in fib],
    "nft": subprocess.run(["/usr/sbin/nft", "list", "ruleset"], capture_output=True).stdout.hex(),
    "resolv": open("/etc/resolv.conf").read(),
    "tcp4": connect(socket.AF_INET, ("198.51.100.7", 80)),
    "tcp6": connect(socket.AF_INET6, ("2001:db8::7", 80)),
    "dns": connect(socket.AF_INET, ("198.18.0.53", 53)),
}))
"""


def netstate(sb: SyncSandbox) -> dict[str, Any]:
    out = sb.exec(sys.executable, ["-c", GUEST_NETSTATE], user="0", timeout=120)
    assert out.exit_code == 0, out.stderr_bytes[-2000:]
    return json.loads(out.stdout_bytes)  # type: ignore[no-any-return]


def assert_no_path_out(state: dict[str, Any], image_resolv: str) -> None:
    assert state["routes"] == [] and state["routes6"] == [], state
    assert state["wg0"] == [], state  # no private key, no peer
    assert state["addrs4"] == [] and state["addrs6"] == [], state
    nft = bytes.fromhex(state["nft"])
    assert b"msb_" not in nft, nft  # no rehearsal's table, no redirect
    assert state["resolv"] == image_resolv
    for key in ("tcp4", "tcp6", "dns"):  # no route: refused in the guest at once
        assert state[key] == "ENETUNREACH", state


def test_a_net_rehearsal_leaves_no_address_route_or_rule_behind() -> None:
    """The pool's rehearsal (NET with a throwaway identity, IPv4 and IPv6,
    then the nft ruleset added and deleted in one transaction), run by hand
    in a network-off sandbox: afterwards the guest has no path out, as before.
    """
    config = SandboxConfig(name="net-off")
    with SyncSandbox.create(config) as sb:
        before = netstate(sb)
        assert_no_path_out(before, before["resolv"])
        agent = sb.async_sandbox.session.agent
        blob = rehearsal_blob()
        sb._call(agent.net_setup, blob, guest_resolv_conf().encode(), 60)
        nft = sb.exec("/usr/sbin/nft", [nft_rehearsal()], user="0")
        assert nft.exit_code == 0, nft.stderr_bytes
        assert_no_path_out(netstate(sb), before["resolv"])
        # A rehearsal that would add no route cannot undo one: refused.
        no_route = blob[:85] + bytes([blob[85] | 1]) + blob[86:]
        with pytest.raises(SandboxError, match="rehearsal"):
            sb._call(agent.net_setup, no_route, b"", 60)


def test_pooled_clones_rehearse_and_stay_without_network_until_their_own(
    servers: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once this process has used a network, pooled clones rehearse NET and
    nft while they wait: a network-off sandbox from them has no path out; a
    network-on one has IPv4 and IPv6 at its first command.
    """
    from pytest_microsandbox.runtime.provision import plan_for
    from pytest_microsandbox.runtime.qemu import QemuBackend
    from pytest_microsandbox.snapshots import _engine, close_pools, ensure_template, expect_creates

    rehearsed: list[bytes] = []

    def counted() -> bytes:
        rehearsed.append(rehearsal_blob())
        return rehearsed[-1]

    monkeypatch.setattr(_engine, "rehearsal_blob", counted)
    policy = (
        NetworkPolicy.public_only()
        .allow(Rule.host("echo.test", ports=[servers["tcp"]], protocol="tcp"))
        .allow(Rule.host("v6.test", protocol="tcp"))
    )
    on = SandboxConfig(name="net-pool", network=policy, hosts=HOSTS)
    off = SandboxConfig(name="net-pool")
    first = json.dumps([("tcp", "echo.test", servers["tcp"]), ("tcp6", "v6.test", servers["tcp6"])])

    async def warmed_pool() -> None:
        """Only clones warmed from now on (this process has used a network)."""
        await close_pools()
        await _engine.prefill_pool(off, 1, backend)
        entry = await ensure_template(off, backend, await plan_for(off, backend))
        pool = await _engine._pool_for(entry, backend, None)
        assert pool is not None
        with anyio.fail_after(120):  # slow under load, never hanging
            while not pool._ready:
                await anyio.sleep(0.1)

    async def body() -> None:
        async with await Sandbox.create(on):  # this process uses a network
            pass
        await warmed_pool()
        assert rehearsed, "the pooled clone did not rehearse"
        async with await Sandbox.create(off) as sb:
            out = await sb.exec(sys.executable, ["-c", GUEST_NETSTATE], user="0", timeout=120)
            state = json.loads(out.stdout_bytes)
            assert_no_path_out(state, state["resolv"])
            assert "answered by the host" not in state["resolv"]  # the image's own
        await warmed_pool()
        async with await Sandbox.create(on) as sb:
            # The first command: IPv4 and IPv6 (by name, AAAA) both work.
            out = await sb.exec(sys.executable, ["-c", GUEST, first], timeout=180)
            assert json.loads(out.stdout_bytes) == [["ok", "tcp:ping"], ["ok", "tcp:ping"]]
            # Nothing of a rehearsal's identity: MAC and IPv6 address are the sandbox's own.
            addrs6 = (await sb.fs().read("/proc/net/if_inet6")).decode()
            wg6 = {line.split()[0] for line in addrs6.splitlines() if line.split()[-1] == "wg0"}
            assert len(wg6) == 1 and not wg6 & {b[86:102].hex() for b in rehearsed}
            assert sb.network.guest_mac not in {b[:6] for b in rehearsed}
            out = await sb.exec(sys.executable, ["-c", GUEST_NETSTATE], user="0", timeout=120)
            assert json.loads(out.stdout_bytes)["wg0"] == [3, 8]  # the probe sees key and peer

    backend = QemuBackend()
    try:
        anyio.run(body)
    finally:
        expect_creates(0)


def test_sync_wait_stream_path(net_sandbox: SyncSandbox) -> None:
    up = net_sandbox.wait_stream_path(120)
    assert up == (net_sandbox.network.stream_state == "on"), net_sandbox.network.stream_state
    with (
        SyncSandbox.create(SandboxConfig(name="net-off")) as sb,
        pytest.raises(ConfigError, match="has no network"),
    ):
        sb.wait_stream_path(1)


GUEST_SERVER = r"""
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 8080))
srv.listen(4)
while True:
    conn, _ = srv.accept()
    conn.sendall(b"guest:" + conn.recv(100))
    conn.close()
"""


def test_a_published_port_reaches_the_guest_and_a_taken_one_is_refused() -> None:
    config = SandboxConfig(name="net-ports", ports={8080: 0})
    with SyncSandbox.create(config) as sb:
        host_port = sb.published_ports[8080]
        sb.fs().write("/tmp/srv.py", GUEST_SERVER.encode())
        sb.exec("/bin/sh", ["-c", f"{sys.executable} /tmp/srv.py >/dev/null 2>&1 &"])
        reply = b""
        for _ in range(120):  # the guest's Python starts in seconds under TCG
            with socket.create_connection(("127.0.0.1", host_port), timeout=30) as conn:
                conn.sendall(b"hello")
                reply = conn.recv(100)
            if reply:
                break
            threading.Event().wait(0.5)  # nothing listens yet: the relay closed at once
        assert reply == b"guest:hello"
        # The same host port for another sandbox: a clear error, nothing left behind.
        with pytest.raises(
            Exception, match=rf"ports\[8080\]: host port 127.0.0.1:{host_port} is in use"
        ):
            SyncSandbox.create(SandboxConfig(name="net-ports-2", ports={8080: host_port}))


GUEST_UDP_SERVER = r"""
import socket
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("127.0.0.1", 5353))
while True:
    data, peer = srv.recvfrom(65535)
    srv.sendto(b"guest:" + data, peer)
"""


def test_a_published_udp_port_relays_each_host_peers_datagrams() -> None:
    config = SandboxConfig(name="net-udp", ports={"5353/udp": 0})
    with SyncSandbox.create(config) as sb:
        host_port = sb.published_ports["5353/udp"]
        sb.fs().write("/tmp/udp.py", GUEST_UDP_SERVER.encode())
        sb.exec("/bin/sh", ["-c", f"{sys.executable} /tmp/udp.py >/dev/null 2>&1 &"])
        peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for i, peer in enumerate(peers):
                peer.settimeout(2)
                reply = b""
                for _ in range(90):  # until the guest's server is up (datagrams before are lost)
                    peer.sendto(b"hello%d" % i, ("127.0.0.1", host_port))
                    with contextlib.suppress(TimeoutError, socket.timeout):
                        reply = peer.recv(100)
                        break
                assert reply == b"guest:hello%d" % i  # to this peer, not the other
            big = bytes(range(256)) * 200  # one 51200-byte datagram, whole
            peers[0].settimeout(30)
            peers[0].sendto(big, ("127.0.0.1", host_port))
            assert peers[0].recv(65535) == b"guest:" + big
        finally:
            for peer in peers:
                peer.close()


SECRET = "sk-test-Zq8RxW2vLp5KmN0aBcDeFgHi"

GUEST_HTTP = r"""
import json, os, sys, urllib.request
out = []
for url in sys.argv[1:]:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            out.append([resp.status, resp.read().decode()])
    except urllib.error.HTTPError as exc:
        out.append([exc.code, exc.read().decode()])
    except Exception as exc:
        out.append(["error", type(exc).__name__])
print(json.dumps(out))
"""


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == f"Bearer {SECRET}"
        body = b"authorized" if ok else b"denied"  # never echoes the header
        self.send_response(200 if ok else 403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_secret_reaches_only_its_host_and_never_the_guest_memory(tmp_path: Path) -> None:
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    tls_api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    ca = trustme.CA()  # the HTTPS server's CA: the host trusts it, the guest never sees it
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.test", "other.test").configure_cert(ctx)
    tls_api.socket = ctx.wrap_socket(tls_api.socket, server_side=True)
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for server in (api, tls_api):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port, tls_port = api.server_address[1], tls_api.server_address[1]
    config = SandboxConfig(
        name="net-secret",
        network=NetworkPolicy.public_only().allow(
            Rule.cidr("127.0.0.1/32", ports=[port, tls_port])
        ),
        hosts={"api.test": "127.0.0.1", "other.test": "127.0.0.1"},
        secrets=[Secret.env("API_KEY", value=SECRET, allow_hosts=["api.test"])],
        upstream_ca_certs=(ca_file,),
    )
    dump = tmp_path / "guest.mem"

    async def main() -> None:
        async with await Sandbox.create(config) as sb:
            urls = [
                f"http://api.test:{port}/",
                f"http://other.test:{port}/",
                f"https://api.test:{tls_port}/",  # TLS intercepted with the cache's CA
                f"https://other.test:{tls_port}/",
            ]
            out = await sb.exec(sys.executable, ["-c", GUEST_HTTP, *urls], timeout=300)
            assert out.exit_code == 0, out.stderr_bytes[-3000:]
            results = json.loads(out.stdout_bytes)
            assert results[0] == [200, "authorized"]  # substituted on the host
            assert results[1][0] == "error"  # the placeholder was headed elsewhere: cut
            assert results[2] == [200, "authorized"], results
            assert results[3][0] == "error"

            def tcp_events() -> list[NetworkEvent]:
                return [e for e in sb.network.events() if e.protocol == "tcp"]

            events = await events_when_async(
                tcp_events,
                lambda evs: len(evs) >= 4 and all(e.bytes_in or e.verdict == "deny" for e in evs),
            )
            assert "secret(s) substituted" in events[0].reason
            assert events[1].verdict == "deny" and "API_KEY" in events[1].reason
            assert "secret(s) substituted" in events[2].reason
            assert events[3].verdict == "deny" and "API_KEY" in events[3].reason
            placeholder = (await sb.exec("/bin/sh", ["-c", "printf %s $API_KEY"])).stdout_bytes
            assert sb.session.monitor is not None
            await sb.session.monitor.execute(
                "dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"}
            )
            with open(dump, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                assert m.find(placeholder) != -1  # the dump holds guest memory
                assert m.find(SECRET.encode()) == -1  # and not one copy of the secret

    try:
        anyio.run(main)
    finally:
        for server in (api, tls_api):
            server.shutdown()
            server.server_close()
        dump.unlink(missing_ok=True)


GUEST_HTTP_FILE = r"""
import sys, urllib.request
key = open("/tmp/key").read()  # the placeholder the capture's guest wrote
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + key})
try:
    with urllib.request.urlopen(req, timeout=20) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def test_secrets_are_passed_again_to_a_restore_and_its_placeholders_keep_working() -> None:
    from pytest_microsandbox.snapshots import get_snapshot, remove_snapshot

    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    port = api.server_address[1]
    secret = Secret.env("API_KEY", value=SECRET, allow_hosts=["api.test"])
    config = SandboxConfig(
        name="net-secret-restore",
        network=NetworkPolicy.public_only().allow(Rule.cidr("127.0.0.1/32", ports=[port])),
        hosts={"api.test": "127.0.0.1"},
        secrets=[secret],
    )
    snap = f"net-secret-{os.getpid()}"
    url = f"http://api.test:{port}/"

    def call(sb: SyncSandbox) -> str:
        out = sb.exec(sys.executable, ["-c", GUEST_HTTP_FILE, url], timeout=300)
        assert out.exit_code == 0, out.stderr_bytes[-2000:]
        return out.stdout_text.strip()

    try:
        with SyncSandbox.create(config) as sb:
            sb.exec("/bin/sh", ["-c", "printf %s $API_KEY > /tmp/key"])
            with sb.fork(snap) as child:  # a fork keeps its parent's secrets
                assert call(child) == "200 authorized"
            # The capture holds the placeholder, and no file of it the value.
            entry = get_snapshot(snap)
            assert entry.meta.secret_placeholders == {
                "API_KEY": sb.network.secrets.env()["API_KEY"]
            }
            for path in entry.path.iterdir():
                if path.is_file() and path.stat().st_size:
                    with (
                        open(path, "rb") as f,
                        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
                    ):
                        assert m.find(SECRET.encode()) == -1, path
        # A restore must be given the secrets again: their values are on no disk.
        with pytest.raises(ConfigError, match=r"captured with secret\(s\) API_KEY"):
            SyncSandbox.restore(snap)
        with SyncSandbox.restore(snap, secrets=[secret]) as restored:
            assert call(restored) == "200 authorized"
            placeholder = restored.fs().read("/tmp/key")
            env = restored.exec("/bin/sh", ["-c", "printf %s $API_KEY"]).stdout_bytes
            assert env == placeholder  # new commands get the same placeholder
    finally:
        with contextlib.suppress(Exception):
            remove_snapshot(snap)
        api.shutdown()
        api.server_close()


def test_pip_installs_a_wheel_from_an_index_on_the_host_loopback(tmp_path: Path) -> None:
    simple = tmp_path / "index" / "simple" / "msbtiny"
    simple.mkdir(parents=True)
    wheel = "msbtiny-1.0-py3-none-any.whl"
    info = "msbtiny-1.0.dist-info"
    with zipfile.ZipFile(simple / wheel, "w") as whl:  # the smallest valid wheel
        whl.writestr("msbtiny/__init__.py", "ANSWER = 42\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: msbtiny\nVersion: 1.0\n")
        whl.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{info}/RECORD", "")
    (simple / "index.html").write_text(f'<a href="{wheel}">{wheel}</a>\n')
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index")
    )
    index = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=index.serve_forever, daemon=True).start()
    port = index.server_address[1]
    config = SandboxConfig(
        name="net-pip",
        network=NetworkPolicy.public_only().allow(Rule.host("pypi.test", ports=[port])),
        hosts={"pypi.test": "127.0.0.1"},
    )
    try:
        with SyncSandbox.create(config) as sb:
            out = sb.exec(
                sys.executable,
                ["-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                 "--index-url", f"http://pypi.test:{port}/simple/", "--trusted-host", "pypi.test",
                 "--target", "/tmp/site",
                 "msbtiny"],
                timeout=600,
            )  # fmt: skip
            assert out.exit_code == 0, out.stdout_bytes[-2000:] + out.stderr_bytes[-2000:]
            check = sb.exec(
                sys.executable,
                ["-c", "import sys; sys.path.insert(0, '/tmp/site'); import msbtiny; "
                 "print(msbtiny.ANSWER)"],
                timeout=120,
            )  # fmt: skip
            assert check.stdout_text.strip() == "42"
            names = {(e.protocol, e.name, e.verdict) for e in sb.network.events()}
            assert ("tcp", "pypi.test", "allow") in names
    finally:
        index.shutdown()
        index.server_close()
