"""The marker's and the fixtures' network forms, end to end with real VMs.

A marked test gets the clone's own network, ready before the test runs; the
fixture form takes a full NetworkPolicy and ``hosts=``. Only 127.0.0.0/8 is
ever dialled (the loopback-only guard is set for the inner run too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.runtime.network import LOOPBACK_ONLY_ENV

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

SUITE = r"""
import json, os, socket, socketserver, sys, threading
import pytest


@pytest.mark.sandbox(network="public-only", timeout=120)
def test_marked_with_network():
    assert open("/sys/class/net/wg0/operstate").read()
    # The host's resolver answers (NXDOMAIN: nothing is pinned, no upstream in
    # tests); without a network the lookup would time out (EAI_AGAIN).
    with pytest.raises(socket.gaierror) as info:
        socket.gethostbyname("nothing.test")
    assert info.value.errno == socket.EAI_NONAME


@pytest.mark.sandbox(network="public-only", timeout=120)
def test_marked_failure_shows_the_network_log():
    with pytest.raises(socket.gaierror):
        socket.gethostbyname("shown-in-the-report.test")
    assert False, "deliberate"


@pytest.mark.sandbox(timeout=120)
def test_marked_without_network():
    # The template's NIC and wg0 exist, but no route leads anywhere.
    assert open("/proc/net/route").read().splitlines()[1:] == []


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hi:" + self.request.recv(100))


def test_factory_with_a_policy(sandbox_factory):
    from pytest_microsandbox.runtime.network import NetworkPolicy, Rule

    server = socketserver.TCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    sb = sandbox_factory(
        network=NetworkPolicy.public_only().allow(Rule.host("api.test", ports=[port])),
        hosts={"api.test": "127.0.0.1"},
    )
    code = (
        "import socket; s = socket.create_connection(('api.test', %d), timeout=30); "
        "s.sendall(b'x'); print(s.recv(100).decode())" % port
    )
    out = sb.exec(sys.executable, ["-c", code], timeout=120)
    server.shutdown()
    assert out.stdout_text.strip() == "hi:x", out.stderr_bytes
    events = sb.network.events()
    assert [(e.protocol, e.name, e.verdict) for e in events if e.protocol == "tcp"] == [
        ("tcp", "api.test", "allow")
    ]
"""


def test_network_forms(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_net.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env[LOOPBACK_ONLY_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 1, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "1 failed, 3 passed" in proc.stdout, proc.stdout[-6000:]
    # The failed test's report carries its sandbox's network log.
    assert "sandbox network events" in proc.stdout
    assert "dns shown-in-the-report.test" in proc.stdout
