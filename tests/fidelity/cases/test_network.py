"""Servers on localhost inside the test, and the host's own names."""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = self.request.recv(1024)
        self.request.sendall(data.upper())


@pytest.fixture
def tcp_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()


def test_tcp_server_on_localhost(tcp_server: tuple[str, int]) -> None:
    with socket.create_connection(("localhost", tcp_server[1]), timeout=10) as conn:
        conn.sendall(b"hello")
        assert conn.recv(1024) == b"HELLO"


@pytest.mark.parametrize(
    ("family", "address"),
    [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
    ids=["ipv4", "ipv6"],
)
def test_udp_round_trip(family: int, address: str) -> None:
    with (
        socket.socket(family, socket.SOCK_DGRAM) as server,
        socket.socket(family, socket.SOCK_DGRAM) as client,
    ):
        server.bind((address, 0))
        server.settimeout(10)
        client.sendto(b"ping", server.getsockname()[:2])
        data, peer = server.recvfrom(16)
        server.sendto(data + b"-pong", peer)
        client.settimeout(10)
        assert client.recvfrom(16)[0] == b"ping-pong"


def test_tcp_on_ipv6_loopback() -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("::1", port), timeout=10) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"six")
                assert conn.recv(3) == b"six"


def test_http_server_and_client_on_localhost() -> None:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"you asked for {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("localhost", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://localhost:{server.server_address[1]}/x"
        with opener.open(url, timeout=10) as response:
            assert response.read() == b"you asked for /x"
    finally:
        server.shutdown()
        server.server_close()


def test_localhost_resolves_to_loopback() -> None:
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 80)}
    assert "127.0.0.1" in addresses
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)


def test_own_hostname_resolves() -> None:
    # The name differs (a guest is named after its sandbox); that it resolves does not.
    name = socket.gethostname()
    assert name and name == socket.gethostname()
    ipaddress.ip_address(socket.gethostbyname(name))
    fqdn = socket.getfqdn()
    assert fqdn and isinstance(fqdn, str)


def test_connecting_to_a_closed_port_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)
