"""A detached sandbox's raw channel, relayed by its supervisor
(``RemoteSandbox.open_channel``, ``runtime/_supervisor.py``): one client at a
time, reopened by the next, guest bytes between clients dropped, and an open
channel holding off ``idle_timeout``.
"""

from __future__ import annotations

import secrets

import anyio
import pytest

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.runtime import Sandbox, SandboxConfig, SandboxError, SandboxStatus
from pytest_microsandbox.runtime._remote import RemoteSandbox

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

# The guest finds the port by name; each script closes it when it ends.
_PORT = (
    "for d in /sys/class/virtio-ports/*; do "
    '[ "$(cat $d/name)" = msb.chan ] && p=/dev/${d##*/}; done; exec 3<>"$p"; '
)
_ANSWER = _PORT + 'read -r line <&3; echo "got $line" >&3'


async def _line(channel: anyio.abc.ByteStream) -> bytes:
    received = b""
    with anyio.fail_after(60):
        while not received.endswith(b"\n"):
            received += await channel.receive()
    return received


def test_the_channel_is_relayed_to_one_client_at_a_time() -> None:
    async def main() -> None:
        config = SandboxConfig(name=f"rc-{secrets.token_hex(4)}", idle_timeout=3)
        sb = await Sandbox.create(config, detached=True)
        assert isinstance(sb, RemoteSandbox)
        try:
            first = await sb.open_channel()
            with pytest.raises(SandboxError, match="held by another client"):
                await sb.open_channel()
            async with await sb.exec_stream("/bin/sh", ["-c", _ANSWER]) as proc:
                await first.send(b"hello\n")
                assert await _line(first) == b"got hello\n"
                await proc.wait()
            # Held open well past idle_timeout: a client on the channel is activity.
            await anyio.sleep(5)
            assert await sb.status() == SandboxStatus.RUNNING
            await first.aclose()

            # Written while no client holds the channel: dropped, not kept for the next.
            await sb.shell(_PORT + "echo stale >&3")
            await anyio.sleep(1)
            second = await sb.open_channel()
            async with await sb.exec_stream("/bin/sh", ["-c", _ANSWER]) as proc:
                await second.send(b"again\n")
                assert await _line(second) == b"got again\n"
                await proc.wait()
            await second.aclose()
            # Closed: idle_timeout applies again.
            with anyio.fail_after(60):
                assert await sb.wait() == SandboxStatus.STOPPED
        finally:
            await sb.remove()

    anyio.run(main)
