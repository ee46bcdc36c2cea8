"""Port publishing: a guest TCP or UDP port on the host's 127.0.0.1.

For each connection the host accepts on ``127.0.0.1:HOST_PORT`` it starts the
agent's relay in the guest (``/proc/self/exe --connect GUEST_PORT``, through
EXEC with stdin) and copies bytes both ways: no route into the guest, no
address of it on the host, and it works whatever the network policy (or with
no network). The agent channel carries the bytes, so expect a few MB/s under TCG.

UDP (``ports={"5353/udp": 15353}``): one relay (``--connect-udp``) per host
peer address, datagrams framed by a 2-byte length on its stdin/stdout, ended
after :data:`UDP_IDLE_S` without a datagram from that peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from .._exceptions import ConfigError

__all__ = [
    "RELAY_ARGS",
    "RELAY_PROGRAM",
    "RELAY_UDP_ARGS",
    "UDP_IDLE_S",
    "PortPublisher",
    "parse_port_key",
]

#: The agent's own binary in any root (EXEC runs it in a vfork child).
RELAY_PROGRAM = "/proc/self/exe"
RELAY_ARGS = "--connect"
RELAY_UDP_ARGS = "--connect-udp"
_READ = 65536
#: A UDP peer's relay ends after this long without a datagram from it.
UDP_IDLE_S = 30.0
#: Host peers of one published UDP port with a relay at once; more are dropped.
_MAX_UDP_PEERS = 64
#: Datagrams from one peer queued while its relay starts or is busy.
_UDP_QUEUE = 256

#: Starts the relay for a guest port and protocol ("tcp", "udp"): returns a
#: handle with ``write_stdin``, ``close_stdin``, ``kill`` and async iteration
#: over Stdout/Exited events.
StartRelay = Callable[[int, str], Awaitable[Any]]


def parse_port_key(key: int | str) -> tuple[int, Literal["tcp", "udp"]]:
    """A ``ports`` key: the guest port and its protocol (8080, "8080/tcp", "5353/udp").

    :raises ValueError: not such a key (pydantic names the field).
    """
    text = str(key).strip().lower()
    number, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    if not number.isdigit() or protocol not in ("tcp", "udp") or not 1 <= int(number) <= 65535:
        raise ValueError(
            f"ports[{key!r}] is not a guest port: use 8080 or '8080/tcp' (TCP) or "
            "'5353/udp' (UDP), a port in 1..65535"
        )
    return int(number), "udp" if protocol == "udp" else "tcp"


class PortPublisher:
    """Listens on 127.0.0.1 for each published port; :meth:`aclose` stops all."""

    def __init__(self, ports: Mapping[int | str, int], start_relay: StartRelay) -> None:
        self._ports = dict(ports)
        self._start_relay = start_relay
        self._servers: dict[int | str, asyncio.Server | asyncio.DatagramTransport] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind every host port.

        :raises ConfigError: a host port is taken (nothing stays bound then).
        """
        loop = asyncio.get_running_loop()
        for key, host_port in self._ports.items():
            guest_port, protocol = parse_port_key(key)
            try:
                if protocol == "udp":
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda gp=guest_port: _UdpPort(self, gp),  # type: ignore[misc]
                        local_addr=("127.0.0.1", host_port),
                    )
                    self._servers[key] = transport
                else:
                    self._servers[key] = await asyncio.start_server(
                        functools.partial(self._serve, guest_port=guest_port),
                        "127.0.0.1",
                        host_port,
                    )
            except OSError as exc:
                await self.aclose()
                why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
                raise ConfigError(
                    f"ports[{key!r}]: host port 127.0.0.1:{host_port} {why} ({protocol.upper()}); "
                    "publish the guest port on a free host port (or stop what holds it)"
                ) from None

    @property
    def bound(self) -> dict[int | str, int]:
        """guest port (as in ``ports``) -> host port actually bound (a host port
        0 picks a free one).
        """
        out: dict[int | str, int] = {}
        for key, server in self._servers.items():
            if isinstance(server, asyncio.Server):
                out[key] = server.sockets[0].getsockname()[1]
            else:
                out[key] = server.get_extra_info("sockname")[1]
        return out

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest_port: int
    ) -> None:
        from ..agent.results import Stdout

        self._writers.add(writer)
        handle: Any = None
        try:
            handle = await self._start_relay(guest_port, "tcp")

            async def up() -> None:
                while data := await reader.read(_READ):
                    await handle.write_stdin(data)
                await handle.close_stdin()

            async def down() -> None:
                async for event in handle:
                    if isinstance(event, Stdout):
                        writer.write(event.data)
                        await writer.drain()

            up_task = asyncio.ensure_future(up())
            try:
                await down()  # ends when the relay exits
            finally:
                up_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await up_task
        except Exception:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.kill()

    async def _udp_peer(
        self,
        port: _UdpPort,
        peer: tuple[str, int],
        queue: asyncio.Queue[bytes],
    ) -> None:
        """Relay one host peer's datagrams to the guest port and its replies back."""
        from ..agent.results import Stdout

        handle: Any = None
        try:
            handle = await self._start_relay(port.guest_port, "udp")

            async def up() -> None:
                while True:
                    try:
                        data = await asyncio.wait_for(queue.get(), UDP_IDLE_S)
                    except asyncio.TimeoutError:
                        await handle.close_stdin()  # the relay exits, down() ends
                        return
                    await handle.write_stdin(len(data).to_bytes(2, "big") + data)

            async def down() -> None:
                # The relay's stdout is guest data: frames are re-cut here, each
                # bounded by its 2-byte length.
                buf = b""
                async for event in handle:
                    if not isinstance(event, Stdout):
                        continue
                    buf += event.data
                    while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                        size = int.from_bytes(buf[:2], "big")
                        if port.transport is not None:
                            port.transport.sendto(buf[2 : 2 + size], peer)
                        buf = buf[2 + size :]

            up_task = asyncio.ensure_future(up())
            try:
                await down()
            finally:
                up_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await up_task
        except Exception:
            pass
        finally:
            port.peers.pop(peer, None)
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.kill()

    async def aclose(self) -> None:
        for server in self._servers.values():
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for server in self._servers.values():
            if isinstance(server, asyncio.Server):
                with contextlib.suppress(Exception):
                    await server.wait_closed()
        self._servers.clear()


class _UdpPort(asyncio.DatagramProtocol):
    """One published UDP port: a queue and a relay per host peer address."""

    def __init__(self, publisher: PortPublisher, guest_port: int) -> None:
        self.publisher = publisher
        self.guest_port = guest_port
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: dict[tuple[str, int], asyncio.Queue[bytes]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        peer = (str(addr[0]), int(addr[1]))
        queue = self.peers.get(peer)
        if queue is None:
            if len(self.peers) >= _MAX_UDP_PEERS:
                return  # dropped, as an overloaded UDP service would
            queue = self.peers[peer] = asyncio.Queue(maxsize=_UDP_QUEUE)
            self.publisher._spawn(self.publisher._udp_peer(self, peer, queue))
        if not queue.full():
            queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass  # a peer went away (ICMP unreachable): its relay idles out
