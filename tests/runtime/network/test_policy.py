"""The policy engine: presets, groups, rule order, matching, errors (no VM)."""

from __future__ import annotations

import ipaddress

import pytest

from pytest_microsandbox.runtime import ConfigError, SandboxConfig
from pytest_microsandbox.runtime.network import Destination, NetworkPolicy, Rule, classify


def tcp(ip: str, port: int = 80, name: str | None = None) -> Destination:
    return Destination(ipaddress.ip_address(ip), port, "tcp", name)


@pytest.mark.parametrize(
    ("ip", "group"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # CGNAT
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("198.18.0.1", "special"),  # our own links
        ("0.0.0.0", "special"),
        ("93.184.216.34", "public"),
        ("2606:4700::1", "public"),
        # IPv6 forms of other ranges and IANA's special-purpose addresses.
        ("fd00:ec2::254", "metadata"),
        ("fd12:3456::1", "private"),  # ULA
        ("fec0::1", "private"),  # site-local
        ("::", "special"),
        ("::ffff:127.0.0.1", "special"),  # v4-mapped
        ("::7f00:1", "special"),  # v4-compatible (::127.0.0.1)
        ("64:ff9b::a00:1", "special"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::1", "special"),  # 6to4 of 127.0.0.1
        ("2001:0:4136:e378::1", "special"),  # Teredo
        ("2001:db8::1", "special"),  # documentation
        ("2001:2::1", "special"),  # benchmarking (the guest's own wg0)
        ("100::1", "special"),  # discard
        ("192.0.2.1", "special"),  # TEST-NET-1
    ],
)
def test_classify(ip: str, group: str) -> None:
    assert classify(ipaddress.ip_address(ip)) == group


def test_public_only_denies_every_non_public_group() -> None:
    policy = NetworkPolicy.public_only()
    for ip in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.1.1", "::1", "fe80::1"):
        assert not policy.decide(tcp(ip)).allowed, ip
    assert policy.decide(tcp("93.184.216.34")).allowed


def test_none_denies_everything_and_allow_all_allows_everything() -> None:
    for ip in ("127.0.0.1", "93.184.216.34"):
        assert not NetworkPolicy.none().decide(tcp(ip)).allowed
        assert NetworkPolicy.allow_all().decide(tcp(ip)).allowed


def test_rules_come_first_and_the_first_match_wins() -> None:
    policy = (
        NetworkPolicy.public_only()
        .deny(Rule.cidr("127.0.0.2/32"))
        .allow(Rule.cidr("127.0.0.0/8", ports=[8080]))
    )
    assert policy.decide(tcp("127.0.0.1", 8080)).allowed
    assert not policy.decide(tcp("127.0.0.1", 8081)).allowed  # falls to public-only
    assert not policy.decide(tcp("127.0.0.2", 8080)).allowed  # the earlier deny wins
    assert policy.decide(tcp("127.0.0.1", 8080)).reason == "rule 1 (allow)"
    reordered = (
        NetworkPolicy.public_only().allow(Rule.cidr("127.0.0.0/8")).deny(Rule.cidr("127.0.0.2/32"))
    )
    assert reordered.decide(tcp("127.0.0.2", 8080)).allowed


def test_host_suffix_protocol_and_group_rules() -> None:
    policy = (
        NetworkPolicy.allow_all()
        .deny(Rule.domain_suffix(".ads.test"))
        .deny(Rule.host("API.test.", protocol="udp"))
        .deny(Rule.group("metadata"))
    )
    assert not policy.decide(tcp("1.2.3.4", name="x.ads.test")).allowed
    assert not policy.decide(tcp("1.2.3.4", name="ads.test")).allowed
    assert policy.decide(tcp("1.2.3.4", name="badads.test")).allowed
    assert policy.decide(tcp("1.2.3.4", name="api.test")).allowed  # tcp: not the udp rule
    udp = Destination(ipaddress.ip_address("1.2.3.4"), 53, "udp", "api.test")
    assert not policy.decide(udp).allowed
    assert not policy.decide(tcp("169.254.169.254")).allowed


def test_a_dns_query_matches_name_rules_only() -> None:
    policy = NetworkPolicy.public_only().deny(Rule.domain_suffix("blocked.test"))
    query = Destination(None, None, "udp", "a.blocked.test")
    assert not policy.decide(query).allowed
    assert policy.decide(Destination(None, None, "udp", "fine.test")).allowed
    assert not NetworkPolicy.none().decide(Destination(None, None, "udp", "fine.test")).allowed


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Rule.cidr("300.0.0.0/8"), "network"),
        (lambda: Rule.host("bad name!"), "hostname"),
        (lambda: Rule.domain_suffix(""), "suffix"),
        (lambda: Rule.cidr("127.0.0.0/8", ports=[0]), "ports"),
        (lambda: Rule.host("a.test", protocol="icmp"), "protocol"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_rule_names_its_field(make: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()  # type: ignore[operator]


def test_policy_names_and_config() -> None:
    assert SandboxConfig(network="public-only").network == NetworkPolicy.public_only()
    assert SandboxConfig(network="allow_all").network == NetworkPolicy.allow_all()
    assert SandboxConfig().network is None  # no network unless asked for
    with pytest.raises(ConfigError, match=r"network.*not a policy.*public-only"):
        SandboxConfig(network="everything")
    with pytest.raises(ConfigError, match=r"hosts.*not an IP address"):
        SandboxConfig(hosts={"api.test": "localhost"})


def test_a_policy_round_trips_through_json() -> None:
    config = SandboxConfig(
        network=NetworkPolicy.public_only().allow(Rule.host("api.test", ports=[443])),
        hosts={"API.test": "127.0.0.1"},
    )
    again = SandboxConfig.from_json(config.to_json())
    assert again.network == config.network
    assert again.hosts == {"api.test": "127.0.0.1"}


def test_a_dns_answer_is_kept_if_some_port_or_protocol_is_allowed() -> None:
    policy = (
        NetworkPolicy.none()
        .deny(Rule.host("api.test", ports=[22]))
        .allow(Rule.host("api.test", ports=[443], protocol="tcp"))
    )
    answer = Destination(ipaddress.ip_address("127.0.0.1"), None, None, "api.test")
    assert policy.decide(answer).allowed
    assert not policy.decide(tcp("127.0.0.1", 22, name="api.test")).allowed
    assert not policy.decide(tcp("127.0.0.1", 80, name="api.test")).allowed
    assert policy.decide(tcp("127.0.0.1", 443, name="api.test")).allowed
