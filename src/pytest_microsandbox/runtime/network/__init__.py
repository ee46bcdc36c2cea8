"""Host-controlled networking: policies, the user-mode stack, DNS, the event log.

See docs/network.md. Public names: :class:`NetworkPolicy`, :class:`Rule`,
:class:`NetworkEvent`; :class:`NetworkStack` is what a sandbox runs.
"""

from __future__ import annotations

from ._policy import Decision, Destination, NetworkPolicy, Rule, classify
from ._ports import PortPublisher
from ._secrets import Secret, SecretSubstituter
from ._stack import (
    DNS_IP,
    HOST_SOCKET,
    LOOPBACK_ONLY_ENV,
    QEMU_SOCKET,
    STREAM_ENV,
    NetworkEvent,
    NetworkStack,
    guest_resolv_conf,
    network_used,
    rehearsal_blob,
    stop_rehearsals,
    stream_path_enabled,
)
from ._streams import NFT_PATHS, nft_rehearsal

__all__ = [
    "DNS_IP",
    "HOST_SOCKET",
    "LOOPBACK_ONLY_ENV",
    "NFT_PATHS",
    "QEMU_SOCKET",
    "STREAM_ENV",
    "Decision",
    "Destination",
    "NetworkEvent",
    "NetworkPolicy",
    "NetworkStack",
    "PortPublisher",
    "Rule",
    "Secret",
    "SecretSubstituter",
    "classify",
    "guest_resolv_conf",
    "network_used",
    "nft_rehearsal",
    "rehearsal_blob",
    "stop_rehearsals",
    "stream_path_enabled",
]
