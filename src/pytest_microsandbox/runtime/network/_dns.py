"""DNS answered by the host, through the policy (dnslib parses and builds).

A query for a name the policy denies gets NXDOMAIN; a pinned name (``hosts=``)
gets its guest-side address; any other name is resolved by the host (never
when ``resolve_upstream`` is off: tests) and each answer the policy would
refuse is dropped (rebinding protection); nothing left is NXDOMAIN. Only A
queries get addresses: the guest has no IPv6 route.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

from ._policy import Destination, NetworkPolicy, normalize_name

__all__ = ["DnsEvent", "Resolver", "answer_query", "resolve_host"]

#: (name, verdict, reason, addresses answered)
DnsEvent = tuple[str, str, str, list[str]]
#: name -> IPv4 addresses (empty: unknown name)
Resolver = Callable[[str], Awaitable[list[str]]]
_TTL = 60
_RESOLVE_TIMEOUT_S = 5.0


async def resolve_host(name: str) -> list[str]:
    """The host's own resolver (getaddrinfo), IPv4 only, bounded in time."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
            _RESOLVE_TIMEOUT_S,
        )
    except (OSError, asyncio.TimeoutError):
        return []
    return sorted({str(info[4][0]) for info in infos})


def _allowed_answer(policy: NetworkPolicy, addr: str, name: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.version == 4 and policy.decide(Destination(ip, None, None, name)).allowed


async def answer_query(
    data: bytes,
    policy: NetworkPolicy,
    pins: Mapping[str, tuple[ipaddress.IPv4Address, ipaddress.IPv4Address | ipaddress.IPv6Address]],
    resolver: Resolver | None,
) -> tuple[bytes | None, list[DnsEvent]]:
    """The reply to one DNS query datagram (None: unparsable, dropped) and what
    was decided for it. ``resolver`` None: names that are not pinned are unknown.
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
    if name in pins:
        guest_addr, real = pins[name]
        if policy.decide(Destination(real, None, None, name)).allowed:
            addrs, reason = [str(guest_addr)], f"pinned to {real} (hosts=)"
        else:
            addrs, reason = [], f"pinned to {real} (hosts=), which the policy denies"
    elif resolver is None:
        addrs = []
        reason = "not pinned, and upstream DNS is off (loopback-only)"
    else:
        found = await resolver(name)
        addrs = [a for a in found if _allowed_answer(policy, a, name)]
        reason = "resolved" if addrs or not found else "every answer is in a denied range"
    if not addrs:
        reply.header.rcode = RCODE.NXDOMAIN
        events.append((name, "deny", reason, []))
        return reply.pack(), events
    if question.qtype in (QTYPE.A, QTYPE.ANY):
        for addr in addrs:
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(addr), ttl=_TTL))
    events.append((name, "allow", reason, addrs))
    return reply.pack(), events
