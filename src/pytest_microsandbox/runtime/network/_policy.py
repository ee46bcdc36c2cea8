"""Network policies: which destinations a guest may reach (pure logic, no I/O).

A :class:`NetworkPolicy` is a base (``none``, ``public-only``, ``allow-all``)
and ordered :class:`Rule` s that are checked first: the first rule that matches
a destination decides, else the base does. Rules match by CIDR, exact host
name, domain suffix or destination group, narrowed by ports and protocol.
The host evaluates it for every TCP and UDP flow and DNS query, before any
host socket opens, so nothing a guest root does inside the VM changes it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._exceptions import ConfigError

__all__ = [
    "Decision",
    "Destination",
    "Group",
    "NetworkPolicy",
    "PolicyBase",
    "Protocol",
    "Rule",
    "classify",
    "normalize_name",
]

Protocol = Literal["tcp", "udp"]
Group = Literal["public", "private", "loopback", "link-local", "multicast", "metadata", "special"]
PolicyBase = Literal["none", "public-only", "allow-all"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
_GROUP_NETS: tuple[tuple[Group, tuple[str, ...]], ...] = (
    ("loopback", ("127.0.0.0/8", "::1/128")),
    # CGNAT counts as private: it is someone's internal network, not the internet.
    (
        "private",
        (
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
            "fec0::/10",  # IPv6 site-local (deprecated, still routed by some)
        ),
    ),
    ("link-local", ("169.254.0.0/16", "fe80::/10")),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
    # Unspecified, "this network", benchmarking (our own links), reserved and
    # broadcast addresses are reachable by nothing but an explicit rule; so are
    # IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4,
    # Teredo): ::ffff:127.0.0.1 must not pass for a public address.
    (
        "special",
        (
            "0.0.0.0/8",
            "198.18.0.0/15",
            "240.0.0.0/4",
            "::/96",
            "::ffff:0:0/96",
            "64:ff9b::/96",
            "64:ff9b:1::/48",
            "2002::/16",
            "2001::/32",
        ),
    ),
)
_NETS = tuple((group, tuple(ipaddress.ip_network(n) for n in nets)) for group, nets in _GROUP_NETS)


def classify(ip: IPAddress) -> Group:
    """The destination group of ``ip`` (``public`` unless it is in a known range)."""
    if ip in _METADATA:
        return "metadata"
    for group, nets in _NETS:
        if any(ip.version == net.version and ip in net for net in nets):
            return group
    # The rest of IANA's special-purpose registries (documentation, benchmarking,
    # discard, ORCHID, ...), as the standard library knows them.
    return "public" if ip.is_global else "special"


def normalize_name(name: str) -> str:
    """A DNS name as rules compare it: lower case, no trailing dot."""
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class Destination:
    """What one flow or query goes to. ``ip`` is None for a DNS query (only
    name rules match one); ``port`` and ``protocol`` None for a DNS answer: is
    the address reachable on some port by some protocol?
    """

    ip: IPAddress | None
    port: int | None
    protocol: Protocol | None
    name: str | None = None


@dataclass(frozen=True)
class Decision:
    """A verdict and the reason for it (the rule's index, or the base)."""

    allowed: bool
    reason: str


class Rule(BaseModel):
    """One ordered rule. Build with :meth:`cidr`, :meth:`host`,
    :meth:`domain_suffix`, :meth:`group` or :meth:`any`, then add it with
    :meth:`NetworkPolicy.allow` / :meth:`NetworkPolicy.deny`.

    At most one of ``network``, ``hostname``, ``suffix``, ``dest_group`` is set (none:
    any destination); empty ``ports`` means any port; ``protocol`` None means both.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["allow", "deny"] = "allow"
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    hostname: str | None = None
    suffix: str | None = None
    dest_group: Group | None = None
    ports: tuple[int, ...] = ()
    protocol: Protocol | None = None

    @field_validator("network", mode="before")
    @classmethod
    def _check_cidr(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a CIDR such as 127.0.0.0/8 or ::1/128 ({exc})") from None
        return value

    @field_validator("hostname", "suffix")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = normalize_name(value).lstrip(".")
        labels = name.split(".")
        if (
            not name
            or len(name) > 253
            or any(
                not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label)
                for label in labels
            )
        ):
            raise ValueError(f"{value!r} is not a DNS name such as api.test")
        return name

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1..65535")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> Rule:
        targets = [self.network, self.hostname, self.suffix, self.dest_group]
        if sum(t is not None for t in targets) > 1:
            raise ValueError(
                "give at most one of network, hostname, suffix, dest_group per rule: "
                "write one rule for each"
            )
        return self

    @classmethod
    def _make(cls, **data: object) -> Rule:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = [
                f"{'.'.join(str(p) for p in e['loc']) or 'rule'}: {e['msg']}" for e in exc.errors()
            ]
            raise ConfigError("invalid network Rule: " + "; ".join(lines)) from None

    @classmethod
    def cidr(
        cls, cidr: str, *, ports: list[int] | tuple[int, ...] = (), protocol: Protocol | None = None
    ) -> Rule:
        """Destinations in ``cidr`` (``127.0.0.1/32``, ``10.0.0.0/8``, ``::1/128``)."""
        return cls._make(network=cidr, ports=tuple(ports), protocol=protocol)

    @classmethod
    def host(
        cls, name: str, *, ports: list[int] | tuple[int, ...] = (), protocol: Protocol | None = None
    ) -> Rule:
        """The host name ``name`` exactly (as the guest resolved it through our DNS)."""
        return cls._make(hostname=name, ports=tuple(ports), protocol=protocol)

    @classmethod
    def domain_suffix(
        cls,
        suffix: str,
        *,
        ports: list[int] | tuple[int, ...] = (),
        protocol: Protocol | None = None,
    ) -> Rule:
        """``suffix`` and every name below it (``.ads.test`` matches ``x.ads.test``)."""
        return cls._make(suffix=suffix, ports=tuple(ports), protocol=protocol)

    @classmethod
    def group(
        cls,
        group: Group,
        *,
        ports: list[int] | tuple[int, ...] = (),
        protocol: Protocol | None = None,
    ) -> Rule:
        """A destination group: public, private, loopback, link-local, multicast, metadata."""
        return cls._make(dest_group=group, ports=tuple(ports), protocol=protocol)

    @classmethod
    def any(
        cls, *, ports: list[int] | tuple[int, ...] = (), protocol: Protocol | None = None
    ) -> Rule:
        """Any destination (narrowed by ``ports`` and ``protocol``)."""
        return cls._make(ports=tuple(ports), protocol=protocol)

    def matches(self, dest: Destination) -> bool:
        """Does this rule apply to ``dest``?"""
        narrowed = self.protocol is not None or bool(self.ports)
        if narrowed and (dest.protocol is None or dest.port is None) and self.action == "deny":
            return False  # a wildcard: other ports or protocols may still be allowed
        if self.protocol is not None and dest.protocol not in (None, self.protocol):
            return False
        if self.ports and dest.port is not None and dest.port not in self.ports:
            return False
        name = normalize_name(dest.name) if dest.name else None
        if self.hostname is not None:
            return name == self.hostname
        if self.suffix is not None:
            return name is not None and (name == self.suffix or name.endswith("." + self.suffix))
        if self.network is not None:
            net = self.network
            return dest.ip is not None and dest.ip.version == net.version and dest.ip in net
        if self.dest_group is not None:
            return dest.ip is not None and classify(dest.ip) == self.dest_group
        return True


class NetworkPolicy(BaseModel):
    """Where a sandbox's guest may connect. Presets: :meth:`none` (an interface,
    everything denied), :meth:`public_only` (the default with network on: no
    loopback, private, link-local, CGNAT, multicast or metadata address),
    :meth:`allow_all`. Rules added with :meth:`allow` / :meth:`deny` are
    checked first, in order; the first match wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: PolicyBase = Field(default="public-only", description="what no rule decides")
    rules: tuple[Rule, ...] = Field(default=(), description="checked in order before the base")

    @classmethod
    def none(cls) -> NetworkPolicy:
        return cls(base="none")

    @classmethod
    def public_only(cls) -> NetworkPolicy:
        return cls(base="public-only")

    @classmethod
    def allow_all(cls) -> NetworkPolicy:
        return cls(base="allow-all")

    @classmethod
    def from_name(cls, name: str) -> NetworkPolicy:
        """``none``, ``public-only`` or ``allow-all``.

        :raises ConfigError: any other name.
        """
        key = name.strip().lower().replace("_", "-")
        if key not in ("none", "public-only", "allow-all"):
            raise ConfigError(
                f"network={name!r} is not a policy: use 'none', 'public-only' or 'allow-all', "
                "or a NetworkPolicy (disable_network=True for no interface at all)"
            )
        return cls(base=key)  # type: ignore[arg-type]  # checked just above

    def allow(self, rule: Rule) -> NetworkPolicy:
        """This policy with ``rule`` appended as an allow rule."""
        return self.model_copy(
            update={"rules": (*self.rules, rule.model_copy(update={"action": "allow"}))}
        )

    def deny(self, rule: Rule) -> NetworkPolicy:
        """This policy with ``rule`` appended as a deny rule."""
        return self.model_copy(
            update={"rules": (*self.rules, rule.model_copy(update={"action": "deny"}))}
        )

    def decide(self, dest: Destination) -> Decision:
        """The verdict for ``dest``: the first matching rule's, else the base's."""
        for i, rule in enumerate(self.rules):
            if rule.matches(dest):
                return Decision(rule.action == "allow", f"rule {i} ({rule.action})")
        if self.base == "allow-all":
            return Decision(True, "allow-all")
        if self.base == "none":
            return Decision(False, "policy none")
        if dest.ip is None:  # a DNS query: the answers are checked one by one
            return Decision(True, "public-only (query)")
        group = classify(dest.ip)
        return Decision(group == "public", f"public-only ({group})")
