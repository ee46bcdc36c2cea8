"""Port publishing: a guest TCP port on the host's 127.0.0.1.

For each connection the host accepts on ``127.0.0.1:HOST_PORT`` it starts the
agent's relay in the guest (``/proc/self/exe --connect GUEST_PORT``, through
EXEC with stdin) and copies bytes both ways: no route into the guest, no
address of it on the host, and it works whatever the network policy (or with
no network). The agent channel carries the bytes, so expect a few MB/s under TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .._exceptions import ConfigError

__all__ = ["RELAY_ARGS", "RELAY_PROGRAM", "PortPublisher"]

#: The agent's own binary in any root (EXEC runs it in a vfork child).
RELAY_PROGRAM = "/proc/self/exe"
RELAY_ARGS = "--connect"
_READ = 65536

#: Starts the relay for a guest port: returns a handle with ``write_stdin``,
#: ``close_stdin``, ``kill`` and async iteration over Stdout/Exited events.
StartRelay = Callable[[int], Awaitable[Any]]


class PortPublisher:
    """Listens on 127.0.0.1 for each published port; :meth:`aclose` stops all."""

    def __init__(self, ports: Mapping[int, int], start_relay: StartRelay) -> None:
        self._ports = dict(ports)
        self._start_relay = start_relay
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Bind every host port.

        :raises ConfigError: a host port is taken (nothing stays bound then).
        """
        for guest_port, host_port in sorted(self._ports.items()):
            try:
                server = await asyncio.start_server(
                    functools.partial(self._serve, guest_port=guest_port), "127.0.0.1", host_port
                )
            except OSError as exc:
                await self.aclose()
                why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
                raise ConfigError(
                    f"ports[{guest_port}]: host port 127.0.0.1:{host_port} {why}; publish the "
                    "guest port on a free host port (or stop what holds it)"
                ) from None
            self._servers.append(server)

    @property
    def bound(self) -> dict[int, int]:
        """guest port -> host port actually bound (a host port 0 picks a free one)."""
        out: dict[int, int] = {}
        for (guest_port, _), server in zip(sorted(self._ports.items()), self._servers, strict=True):
            out[guest_port] = server.sockets[0].getsockname()[1]
        return out

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest_port: int
    ) -> None:
        from ..agent.results import Stdout

        self._writers.add(writer)
        handle: Any = None
        try:
            handle = await self._start_relay(guest_port)

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

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
