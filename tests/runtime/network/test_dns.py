"""The host's DNS answers (dnslib messages, no VM, no real resolver)."""

from __future__ import annotations

import ipaddress

import anyio
from dnslib import QTYPE, RCODE, DNSRecord

from pytest_microsandbox.runtime.network import NetworkPolicy, Rule
from pytest_microsandbox.runtime.network._dns import answer_query

PINS = {"api.test": (ipaddress.IPv4Address("198.19.0.1"), ipaddress.IPv4Address("127.0.0.1"))}


def ask(name: str, policy: NetworkPolicy, answers: list[str] | None = None) -> DNSRecord:
    async def resolver(query: str) -> list[str]:
        assert query == name
        return answers or []

    async def run() -> DNSRecord:
        data = DNSRecord.question(name).pack()
        reply, _ = await answer_query(data, policy, PINS, resolver if answers else None)
        assert reply is not None
        return DNSRecord.parse(reply)

    return anyio.run(run)


def addrs(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def test_a_pinned_name_gets_its_guest_address_when_the_policy_allows_it() -> None:
    allowed = NetworkPolicy.public_only().allow(Rule.host("api.test"))
    assert addrs(ask("api.test", allowed)) == ["198.19.0.1"]
    # public-only denies loopback: the pinned name is not answered at all.
    assert ask("api.test", NetworkPolicy.public_only()).header.rcode == RCODE.NXDOMAIN


def test_a_blocked_name_gets_nxdomain() -> None:
    policy = NetworkPolicy.allow_all().deny(Rule.domain_suffix(".ads.test"))
    reply = ask("x.ads.test", policy, answers=["93.184.216.34"])
    assert reply.header.rcode == RCODE.NXDOMAIN


def test_answers_into_denied_ranges_are_dropped() -> None:
    # Rebinding: a public name whose answers point at loopback/private ranges.
    reply = ask("rebind.test", NetworkPolicy.public_only(), answers=["127.0.0.1", "93.184.216.34"])
    assert addrs(reply) == ["93.184.216.34"]
    only_bad = ask("rebind.test", NetworkPolicy.public_only(), answers=["10.0.0.1"])
    assert only_bad.header.rcode == RCODE.NXDOMAIN


def test_without_a_resolver_an_unpinned_name_is_unknown() -> None:
    assert ask("other.test", NetworkPolicy.allow_all()).header.rcode == RCODE.NXDOMAIN


def test_garbage_is_dropped() -> None:
    reply, events = anyio.run(
        answer_query, b"\x00\x01garbage", NetworkPolicy.allow_all(), PINS, None
    )
    assert reply is None and events == []


def test_aaaa_gets_the_pins_ipv6_guest_address_only_when_the_guest_has_ipv6() -> None:
    pins6 = {"api.test": ipaddress.IPv6Address("2001:2:0:1::1")}
    allowed = NetworkPolicy.public_only().allow(Rule.host("api.test"))

    async def run(v6: bool) -> DNSRecord:
        data = DNSRecord.question("api.test", "AAAA").pack()
        reply, _ = await answer_query(data, allowed, PINS, None, v6_pins=pins6 if v6 else None)
        assert reply is not None
        return DNSRecord.parse(reply)

    with_v6 = anyio.run(run, True)
    assert [str(rr.rdata) for rr in with_v6.rr if rr.rtype == QTYPE.AAAA] == ["2001:2:0:1::1"]
    without = anyio.run(run, False)
    assert without.header.rcode == RCODE.NOERROR and not without.rr  # the name exists


def test_upstream_aaaa_answers_into_denied_ranges_are_dropped() -> None:
    async def resolver(name: str) -> list[str]:
        return ["93.184.216.34"]

    async def resolver6(name: str) -> list[str]:
        return ["::1", "fd00::1", "::ffff:10.0.0.1", "2606:4700::1"]

    async def run() -> DNSRecord:
        data = DNSRecord.question("site.test", "AAAA").pack()
        reply, _ = await answer_query(
            data, NetworkPolicy.public_only(), {}, resolver, v6_pins={}, resolver6=resolver6
        )
        assert reply is not None
        return DNSRecord.parse(reply)

    reply = anyio.run(run)
    assert [str(rr.rdata) for rr in reply.rr] == ["2606:4700::1"]
