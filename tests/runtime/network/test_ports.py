"""Port publishing's keys and binding, with real sockets on 127.0.0.1 (the
relays themselves run in a guest: tests/runtime/network/test_network_vm.py).
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest

from pytest_microsandbox.runtime import ConfigError, SandboxConfig
from pytest_microsandbox.runtime.network import PortPublisher
from pytest_microsandbox.runtime.network._ports import parse_port_key


def test_a_key_names_a_guest_port_and_its_protocol() -> None:
    assert parse_port_key(8080) == (8080, "tcp")
    assert parse_port_key("8080/TCP") == (8080, "tcp")
    assert parse_port_key("5353/udp") == (5353, "udp")
    for bad in ("53/sctp", "x/udp", "0/udp", "70000", "/udp"):
        with pytest.raises(ValueError, match="is not a guest port"):
            parse_port_key(bad)


def test_config_normalizes_keys_and_names_a_bad_one() -> None:
    config = SandboxConfig(ports={"8080/tcp": 18080, "5353/udp": 18080, "9000": 0})
    # TCP and UDP may share a host port number: they are different sockets.
    assert config.ports == {8080: 18080, "5353/udp": 18080, 9000: 0}
    assert SandboxConfig.from_json(config.to_json()).ports == config.ports
    with pytest.raises(ConfigError, match=r"ports\['53/sctp'\] is not a guest port"):
        SandboxConfig(ports={"53/sctp": 1053})
    with pytest.raises(ConfigError, match="host port 1053/udp is given for two guest ports"):
        SandboxConfig(ports={"53/udp": 1053, "54/udp": 1053})
    with pytest.raises(ConfigError, match="guest port 8080 is given twice"):
        SandboxConfig(ports={8080: 1, "8080/tcp": 2})


def test_a_taken_udp_port_is_a_clear_error_and_nothing_stays_bound() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    tcp_port = free.getsockname()[1]
    free.close()

    async def start_relay(guest_port: int, protocol: str) -> Any:
        raise AssertionError("no relay starts before a datagram arrives")

    async def main() -> None:
        publisher = PortPublisher({8080: tcp_port, "5353/udp": port}, start_relay)
        with pytest.raises(ConfigError, match=rf"ports\['5353/udp'\]: .*:{port} is in use \(UDP\)"):
            await publisher.start()
        # The TCP port bound before the failure was released.
        with socket.socket() as again:
            again.bind(("127.0.0.1", tcp_port))

    try:
        anyio.run(main)
    finally:
        taken.close()
