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
from collections.abc import Mapping

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

from ._policy import Destination, NetworkPolicy, normalize_name

__all__ = ["DnsEvent", "answer_query"]

#: (name, verdict, reason, addresses answered)
DnsEvent = tuple[str, str, str, list[str]]
_TTL = 60
_RESOLVE_TIMEOUT_S = 5.0


async def _resolve(name: str) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
            _RESOLVE_TIMEOUT_S,
        )
    except (OSError, asyncio.TimeoutError):
        return []
    return sorted({str(info[4][0]) for info in infos})


async def answer_query(
    data: bytes,
    policy: NetworkPolicy,
    pins: Mapping[str, ipaddress.IPv4Address],
    *,
    resolve_upstream: bool,
) -> tuple[bytes | None, list[DnsEvent]]:
    """The reply to one DNS query datagram (None: unparsable, dropped) and what
    was decided for each question.
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
    decision = policy.decide(Destination(None, None, "udp", name))
    if not decision.allowed:
        reply.header.rcode = RCODE.NXDOMAIN
        events.append((name, "deny", decision.reason, []))
        return reply.pack(), events
    if name in pins:
        addrs = [str(pins[name])]
        reason = "pinned (hosts=)"
    elif not resolve_upstream:
        addrs = []
        reason = "not pinned, and upstream DNS is off (loopback-only)"
    else:
        found = await _resolve(name)
        addrs = [
            a
            for a in found
            if policy.decide(Destination(ipaddress.ip_address(a), None, "tcp", name)).allowed
        ]
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
