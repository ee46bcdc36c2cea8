"""DNS answered by the host, through the policy (dnslib parses and builds).

A query for a name the policy denies gets NXDOMAIN; a pinned name (``hosts=``)
gets its guest-side address; any other name is resolved by the host (never
when ``resolve_upstream`` is off: tests) and each answer the policy would
refuse is dropped (rebinding protection); nothing left is NXDOMAIN. Only A
and AAAA queries get addresses: AAAA only when the guest has IPv6
(``v6_pins`` given), from a pin's IPv6 guest address or, upstream, only when
the host itself has an IPv6 route (else a guest would try an IPv6 address
first that the host cannot dial).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from ._policy import Destination, NetworkPolicy, normalize_name

__all__ = ["DnsEvent", "Resolver", "answer_query", "resolve_host", "resolve_host6"]

#: (name, verdict, reason, addresses answered)
DnsEvent = tuple[str, str, str, list[str]]
#: name -> addresses of one family (empty: unknown name)
Resolver = Callable[[str], Awaitable[list[str]]]
_TTL = 60
_RESOLVE_TIMEOUT_S = 5.0


async def resolve_host(name: str, family: int = socket.AF_INET) -> list[str]:
    """The host's own resolver (getaddrinfo) for one family, bounded in time."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM),
            _RESOLVE_TIMEOUT_S,
        )
    except (OSError, asyncio.TimeoutError):
        return []
    return sorted({str(info[4][0]).partition("%")[0] for info in infos})


async def resolve_host6(name: str) -> list[str]:
    """:func:`resolve_host` for IPv6."""
    return await resolve_host(name, socket.AF_INET6)


def _allowed_answer(policy: NetworkPolicy, addr: str, name: str, version: int) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.version == version and policy.decide(Destination(ip, None, None, name)).allowed


async def answer_query(
    data: bytes,
    policy: NetworkPolicy,
    pins: Mapping[str, tuple[ipaddress.IPv4Address, ipaddress.IPv4Address | ipaddress.IPv6Address]],
    resolver: Resolver | None,
    *,
    v6_pins: Mapping[str, ipaddress.IPv6Address] | None = None,
    resolver6: Resolver | None = None,
) -> tuple[bytes | None, list[DnsEvent]]:
    """The reply to one DNS query datagram (None: unparsable, dropped) and what
    was decided for it. ``resolver`` None: names that are not pinned are unknown.
    ``v6_pins`` (name -> the pin's IPv6 guest address) None: the guest has no
    IPv6, AAAA queries get no address; ``resolver6`` None: only pins get one.
    """
    try:
        request = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, UnicodeError):
        return None, []
    reply = request.reply()
    events: list[DnsEvent] = []
    if len(request.questions) != 1:
        reply.header.rcode = RCODE.FORMERR
        return reply.pack(), events
    question = request.questions[0]
    name = normalize_name(str(question.qname))
    decision = policy.decide(Destination(None, None, None, name))
    if not decision.allowed:
        reply.header.rcode = RCODE.NXDOMAIN
        events.append((name, "deny", decision.reason, []))
        return reply.pack(), events
    want4 = question.qtype in (QTYPE.A, QTYPE.ANY)
    want6 = v6_pins is not None and question.qtype in (QTYPE.AAAA, QTYPE.ANY)
    addrs6: list[str] = []
    if name in pins:
        guest_addr, real = pins[name]
        if policy.decide(Destination(real, None, None, name)).allowed:
            addrs, reason = [str(guest_addr)], f"pinned to {real} (hosts=)"
            if want6 and v6_pins is not None and name in v6_pins:
                addrs6 = [str(v6_pins[name])]
        else:
            addrs, reason = [], f"pinned to {real} (hosts=), which the policy denies"
    elif resolver is None:
        addrs = []
        reason = "not pinned, and upstream DNS is off (loopback-only)"
    else:
        found = await resolver(name)
        addrs = [a for a in found if _allowed_answer(policy, a, name, 4)]
        if want6 and resolver6 is not None:
            found6 = await resolver6(name)
            addrs6 = [a for a in found6 if _allowed_answer(policy, a, name, 6)]
            found = found + found6
        reason = "resolved" if addrs or addrs6 or not found else "every answer is in a denied range"
    if not addrs and not addrs6:
        reply.header.rcode = RCODE.NXDOMAIN
        events.append((name, "deny", reason, []))
        return reply.pack(), events
    answered: list[str] = []
    if want4:
        for addr in addrs:
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(addr), ttl=_TTL))
        answered += addrs
    for addr in addrs6:
        reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(addr), ttl=_TTL))
    answered += addrs6
    events.append((name, "allow", reason, answered or addrs))
    return reply.pack(), events
