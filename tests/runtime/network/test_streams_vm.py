"""The stream path against a real QEMU VM (TCG here): guest TCP redirected to
``agent --stream`` and carried over the VM's own virtio-serial port, decided by
the same host handler as a WireGuard flow (docs/network.md, "Stream path").

One sandbox serves every check (a VM is expensive under TCG); every server is
on the host's 127.0.0.1, names pinned with ``hosts=``; the conftest's
loopback-only guard stays on.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import trustme

from pytest_microsandbox.runtime import Sandbox, SandboxConfig
from pytest_microsandbox.runtime.network import NetworkPolicy, Rule, Secret

pytestmark = pytest.mark.vm

SECRET = "sk-stream-Zq8RxW2vLp5KmN0aBcDeFgHi"
BLOB = os.urandom(3 << 20)

GUEST = r"""
import hashlib, json, os, socket, sys, time, urllib.request
host_ports = json.loads(sys.argv[1])
out = {}
# A download: every byte, in order.
s = socket.create_connection(("blob.test", host_ports["blob"]), timeout=60)
h, n = hashlib.sha256(), 0
while d := s.recv(1 << 20):
    h.update(d); n += len(d)
out["download"] = [n, h.hexdigest()]
s.close()
# An upload, then the server's digest of what it got.
s = socket.create_connection(("sink.test", host_ports["sink"]), timeout=60)
up = os.urandom(1 << 20)
s.sendall(up)
s.shutdown(socket.SHUT_WR)
got = b""
while d := s.recv(4096):
    got += d
out["upload"] = [hashlib.sha256(up).hexdigest(), got.decode()]
# A denied destination: the guest sees the end at once, without a byte.
t = time.monotonic()
try:
    s = socket.create_connection((host_ports["trap_pin"], host_ports["trap"]), timeout=10)
    s.sendall(b"hello")
    out["denied"] = [repr(s.recv(10)), time.monotonic() - t]
except OSError as exc:
    out["denied"] = [type(exc).__name__, time.monotonic() - t]
# Secrets: substituted for the allowed host, the flow cut for another.
res = []
for url in (
    f"http://api.test:{host_ports['api']}/",
    f"http://other.test:{host_ports['api']}/",
    f"https://api.test:{host_ports['tls_api']}/",  # TLS intercepted with the cache's CA
):
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            res.append([resp.status, resp.read().decode()])
    except urllib.error.HTTPError as exc:
        res.append([exc.code, exc.read().decode()])
    except Exception as exc:
        res.append(["error", type(exc).__name__])
out["secrets"] = res
print(json.dumps(out))
"""


class _Blob(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(BLOB)


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        digest = hashlib.sha256()
        while data := self.request.recv(65536):
            digest.update(data)
        self.request.sendall(digest.hexdigest().encode())


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == f"Bearer {SECRET}"
        body = b"authorized" if ok else b"denied"
        self.send_response(200 if ok else 403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    blob = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Blob)
    sink = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    tls_api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    ca = trustme.CA()  # the HTTPS server's CA: the host trusts it, the guest never sees it
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.test").configure_cert(ctx)
    tls_api.socket = ctx.wrap_socket(tls_api.socket, server_side=True)
    ca_file = tmp_path_factory.mktemp("ca") / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trap = socket.socket()  # a listener nobody accepts on: never dialled
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    for server in (blob, sink, api, tls_api):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {
        "blob": blob.server_address[1],
        "sink": sink.server_address[1],
        "api": api.server_address[1],
        "tls_api": tls_api.server_address[1],
        "trap": trap.getsockname()[1],
        "trap_socket": trap,
        "ca_file": ca_file,
    }
    for server in (blob, sink, api, tls_api):
        server.shutdown()
        server.server_close()
    trap.close()


def test_the_stream_path_carries_tcp_and_the_host_still_decides_every_flow(
    servers: dict[str, object],
) -> None:
    ports = {k: v for k, v in servers.items() if isinstance(v, int)}
    allowed = [ports["blob"], ports["sink"], ports["api"], ports["tls_api"]]
    policy = NetworkPolicy.public_only().allow(Rule.cidr("127.0.0.1/32", ports=allowed))
    hosts = {name: "127.0.0.1" for name in ("blob.test", "sink.test", "api.test", "other.test")}
    hosts["trap.test"] = "127.0.0.1"
    config = SandboxConfig(
        name="net-stream",
        network=policy,
        hosts=hosts,
        secrets=[Secret.env("API_KEY", value=SECRET, allow_hosts=["api.test"])],
        upstream_ca_certs=(Path(str(servers["ca_file"])),),
    )

    async def main() -> None:
        async with await Sandbox.create(config) as sb:
            stack = sb.network
            assert await stack.wait_stream_path(120), stack.stream_state
            assert stack.stream_transport == "PortTransport"
            trap_pin = stack.pinned("trap.test")
            args = json.dumps({**ports, "trap_pin": trap_pin})
            out = await sb.exec(sys.executable, ["-c", GUEST, args], timeout=300)
            assert out.exit_code == 0, out.stderr_bytes[-3000:]
            result = json.loads(out.stdout_bytes)
            assert result["download"] == [len(BLOB), hashlib.sha256(BLOB).hexdigest()]
            assert result["upload"][0] == result["upload"][1]
            # Reset by the host at once (the WireGuard path can only close later).
            assert result["denied"][0] in ("ConnectionResetError", "BrokenPipeError", "''"), result[
                "denied"
            ]
            assert result["secrets"][0] == [200, "authorized"], result["secrets"]
            assert result["secrets"][1][0] == "error", result["secrets"]
            assert result["secrets"][2] == [200, "authorized"], result["secrets"]
            readable, _, _ = select.select([servers["trap_socket"]], [], [], 0)
            assert not readable, "a denied flow reached the host's listener"
            for _ in range(100):  # a flow's event is final once its host side closed
                tcp = [e for e in stack.events() if e.protocol == "tcp"]
                if all(e.bytes_in or e.verdict != "allow" for e in tcp):
                    break
                await anyio.sleep(0.1)
            assert all(e.path == "stream" for e in tcp), [e.describe() for e in tcp]
            by_port = {e.port: e for e in tcp}
            assert by_port[ports["blob"]].bytes_in == len(BLOB)
            assert by_port[ports["sink"]].bytes_out == 1 << 20
            denied = by_port[ports["trap"]]
            assert denied.verdict == "deny" and denied.name == "trap.test"
            api = [e for e in tcp if e.port == ports["api"]]
            assert "secret(s) substituted" in api[0].reason
            assert api[1].verdict == "deny" and "API_KEY" in api[1].reason
            assert "secret(s) substituted" in by_port[ports["tls_api"]].reason

            # Guest root removes the redirect: TCP goes over WireGuard again,
            # decided by the same host handler (it gains nothing).
            drop = await sb.exec(
                "/usr/sbin/nft", ["delete table inet msb_stream"], user="root", timeout=60
            )
            assert drop.exit_code == 0, drop.stderr_bytes
            before = len(stack.events())
            t = time.monotonic()
            out = await sb.exec(
                sys.executable,
                [
                    "-c",
                    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])),"
                    " timeout=30); print(len(s.recv(1 << 20)) > 0)",
                    "blob.test",
                    str(ports["blob"]),
                ],
                timeout=120,
            )
            assert out.stdout_bytes.strip() == b"True", (out.stderr_bytes, time.monotonic() - t)
            late = [e for e in stack.events()[before:] if e.protocol == "tcp"]
            assert [e.path for e in late] == ["wireguard"]
            assert late[0].verdict == "allow"

    anyio.run(main)
