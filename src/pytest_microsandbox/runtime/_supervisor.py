"""The supervisor of a detached sandbox.

Run as ``python -m pytest_microsandbox.runtime._supervisor DIR [SNAPSHOT]``.

``Sandbox.create(config, detached=True)`` starts it in a session of its own
with the configuration's JSON on stdin (``Sandbox.detach`` adds the snapshot
directory to restore instead of creating). It creates the sandbox (so its VM's
launcher arms the parent-death signal on *this* process: QEMU dies with the
supervisor, never with the creator), claims the name in the state store
``DIR`` as owner, writes a secret token (0600) and serves the control socket
(0600) until the sandbox stops: by a ``stop``/``kill``/``drain`` request, a
host timer (``max_duration``, ``idle_timeout``), SIGTERM/SIGINT, or its VM
ending. Then it removes its socket, token, log and row, and exits.

It tells its creator how the start went with one JSON line on stdout
(``{"ok": true}`` or an error), then closes stdout. Requests without the
token are answered with an error and otherwise ignored.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from ._exceptions import ConfigError, OutputLimitError, ProtocolError, SandboxError
from ._remote import _b64, _unb64, read_line, write_line
from ._remote_stream import STREAM_OPS, open_relay
from ._state import StateStore
from .config import SandboxConfig
from .lifetime import current_runtime
from .sandbox import Sandbox

__all__ = ["main", "serve"]

#: The snapshot layer's pool-size variable (snapshots/_engine.py; the runtime
#: cannot import it): a supervisor makes one sandbox, so a VM pre-started for
#: the next clone would only idle beside it.
_POOL_SIZE_ENV = "MICROSANDBOX_POOL_SIZE"

#: Longest configuration JSON read from stdin.
_MAX_CONFIG = 1 << 20
#: Longest unix socket path (sun_path holds 108 bytes with its NUL).
_SUN_PATH_MAX = 107


class _Server:
    def __init__(self, sandbox: Sandbox, token: str, tasks: anyio.abc.TaskGroup) -> None:
        self.sandbox = sandbox
        self.token = token
        self._tasks = tasks  # the supervisor's: ends with the sandbox
        # The VM's channel, opened on the first client's request (QEMU connects
        # it once per VM), and the client it is relayed to now, if any.
        self._channel: anyio.abc.ByteStream | None = None
        self._channel_client: anyio.abc.SocketStream | None = None

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            try:
                request = await read_line(reader)
            except (ProtocolError, anyio.EndOfStream, anyio.IncompleteRead, OSError):
                return
            token = request.pop("token", "")
            if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
                await write_line(
                    stream,
                    {"ok": False, "error": "SandboxError", "message": "wrong or missing token"},
                )
                return
            op = request.pop("op", None)
            if op == "channel":
                await self.channel(stream, reader)
                return
            if op in STREAM_OPS:
                await self.relay(str(op), request, stream, reader)
                return
            try:
                result = await self.dispatch(str(op), request)
            except SandboxError as exc:
                answer = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                if isinstance(exc, OutputLimitError):
                    answer["limit"] = exc.limit
            except (TypeError, ValueError, KeyError) as exc:
                answer = {"ok": False, "error": "ProtocolError", "message": f"bad {op}: {exc!r}"}
            else:
                answer = {"ok": True, "result": result}
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await write_line(stream, answer)

    async def relay(
        self,
        op: str,
        args: dict[str, Any],
        stream: anyio.abc.SocketStream,
        reader: BufferedByteReceiveStream,
    ) -> None:
        """Start a streamed command or a terminal and relay it on this connection."""
        try:
            relay = await open_relay(self.sandbox, op, args)
        except (SandboxError, ValueError) as exc:
            kind = type(exc).__name__ if isinstance(exc, SandboxError) else "ProtocolError"
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await write_line(stream, {"ok": False, "error": kind, "message": str(exc)})
            return
        try:
            await write_line(stream, {"ok": True, "result": {"pid": relay.pid}})
        except (OSError, anyio.BrokenResourceError):
            await relay.aclose()
            return
        with contextlib.suppress(SandboxError, OSError, anyio.BrokenResourceError):
            await relay.run(stream, reader)

    async def channel(
        self, stream: anyio.abc.SocketStream, reader: BufferedByteReceiveStream
    ) -> None:
        """Relay the VM's channel to this connection until either side closes it;
        one client at a time. The guest's bytes are read by :meth:`_pump` for the
        sandbox's whole life, so what it writes between clients is discarded,
        never held for the next client.
        """
        if self._channel_client is not None:
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                message = (
                    f"the channel of sandbox {self.sandbox.name!r} is held by another "
                    "client: one at a time; try again once it has closed it"
                )
                await write_line(stream, {"ok": False, "error": "SandboxError", "message": message})
            return
        self._channel_client = stream
        try:
            if self._channel is None:
                try:
                    self._channel = await self.sandbox.open_channel()
                except SandboxError as exc:
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await write_line(
                            stream, {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                        )
                    return
                self._tasks.start_soon(self._pump, self._channel)
            channel = self._channel
            async with self.sandbox._host_activity():
                with contextlib.suppress(
                    OSError, anyio.BrokenResourceError, anyio.ClosedResourceError
                ):
                    await write_line(stream, {"ok": True, "result": None})
                    leftover = bytes(reader.buffer)
                    if leftover:
                        await channel.send(leftover)
                    async for data in stream:
                        await channel.send(data)
        finally:
            self._channel_client = None

    async def _pump(self, channel: anyio.abc.ByteStream) -> None:
        """The guest's side of the channel, to the client holding it, else dropped."""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            async for data in channel:
                client = self._channel_client
                if client is not None:
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await client.send(data)

    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        sb = self.sandbox
        if op == "status":
            return sb.status.value
        if op == "exec":
            stdin = args.get("stdin")
            out = await sb.exec(
                str(args["cmd"]),
                [str(a) for a in args.get("args", [])],
                env={str(k): str(v) for k, v in dict(args.get("env") or {}).items()},
                cwd=args.get("cwd"),
                user=args.get("user"),
                timeout=args.get("timeout"),
                stdin=None if stdin is None else _unb64(stdin),
                max_output=args.get("max_output"),
                on_output_limit=args.get("on_output_limit"),
            )
            return {
                "exit_code": out.exit_code,
                "stdout": _b64(out.stdout_bytes),
                "stderr": _b64(out.stderr_bytes),
                "term_signal": out.term_signal,
                "stdout_truncated": out.stdout_truncated,
                "stderr_truncated": out.stderr_truncated,
            }
        if op == "read":
            return _b64(await sb.fs().read(str(args["path"])))
        if op == "write":
            return await sb.fs().write(
                str(args["path"]), _unb64(args["data"]), mode=int(args.get("mode", 0o644))
            )
        if op == "list":
            entries = await sb.fs().list(str(args["path"]))
            return [[e.name, int(e.kind), e.size, e.mode, e.mtime_ns] for e in entries]
        if op == "exists":
            return await sb.fs().exists(str(args["path"]))
        if op == "mkdir":
            await sb.fs().mkdir(
                str(args["path"]),
                parents=bool(args.get("parents", True)),
                mode=int(args.get("mode", 0o755)),
            )
            return None
        if op == "remove":
            await sb.fs().remove(str(args["path"]), recursive=bool(args.get("recursive")))
            return None
        if op == "metrics":
            m = await sb.metrics()
            return {
                "cpu_percent": m.cpu_percent,
                "memory_bytes": m.memory_bytes,
                "memory_total_bytes": m.memory_total_bytes,
                "memory_host_resident_bytes": m.memory_host_resident_bytes,
                "uptime_ms": m.uptime_ms,
                "processes": m.processes,
                "load1": m.load1,
            }
        if op == "pause":
            await sb.pause()
            return None
        if op == "resume":
            await sb.resume()
            return None
        if op == "drain":
            await sb.drain(args.get("timeout"))
            return None
        if op == "stop":
            await sb.stop(args.get("timeout"))
            return None
        if op == "kill":
            await sb.kill()
            return None
        if op == "snapshot":
            name = args["name"]
            if not isinstance(name, str):
                raise ProtocolError("a snapshot name is a string")
            return str(await sb.snapshot(name))
        if op == "wait":
            return (await sb.wait()).value
        raise ProtocolError(f"unknown operation {op!r}")


def _report(message: dict[str, Any]) -> None:
    """Tell the creator how the start went (one line on stdout), then let go of it."""
    with contextlib.suppress(OSError):
        os.write(1, (json.dumps(message) + "\n").encode())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


async def serve(directory: Path, config: SandboxConfig, restore: Path | None = None) -> int:
    """Create the sandbox, serve its control socket until it stops; the exit status."""
    store = StateStore(directory)
    sock_path, token_path, log_path = store.files_of(config.name)
    if len(os.fsencode(sock_path)) > _SUN_PATH_MAX:
        _report(
            {
                "ok": False,
                "error": "ConfigError",
                "message": f"the control socket path {sock_path} is longer than "
                f"{_SUN_PATH_MAX} bytes: use a shorter name or cache directory",
            }
        )
        return 1
    try:
        if restore is None:
            sandbox = await Sandbox.create(config, register=True)
        else:
            sandbox = await _restore_registered(store, config, restore)
    except SandboxError as exc:
        _report({"ok": False, "error": type(exc).__name__, "message": str(exc)})
        return 1
    try:
        token = secrets.token_hex(32)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # a dead supervisor's (the store's sweep missed it)
        # The directory is 0700 too: no one else can reach the socket while it is chmodded.
        listener_ = await anyio.create_unix_listener(sock_path, mode=0o600)
        record = sandbox._record
        assert record is not None and sandbox._store is not None
        sandbox._record = await anyio.to_thread.run_sync(
            lambda: store.update(record, detached=True, control=str(sock_path))
        )
        _report({"ok": True})
        async with anyio.create_task_group() as tg:
            server = _Server(sandbox, token, tg)

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tg.start_soon(sandbox.stop)

            async def until_stopped() -> None:
                await sandbox.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on_signals)
            tg.start_soon(until_stopped)
            tg.start_soon(listener_.serve, server.handle)
        with anyio.CancelScope(shield=True):
            await listener_.aclose()
        return 0
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.stop()
        # The log stays after a failed start: the creator reads it, then removes it.
        for path in (sock_path, token_path, log_path):
            with contextlib.suppress(OSError):
                path.unlink()


async def _restore_registered(store: StateStore, config: SandboxConfig, path: Path) -> Sandbox:
    """Restore the snapshot directory ``path`` as the named sandbox ``config.name``."""
    from .sandbox import _claim_name

    record = await _claim_name(store, config, replace=False)
    try:
        sandbox = await Sandbox.restore(path, name=config.name)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(store.release, record)
        raise
    await sandbox._register(store, record)
    # The capture's own timers, else the caller's (a plugin's kept-warm VM,
    # restored from a snapshot taken without any).
    timers = {"idle_timeout": config.idle_timeout, "max_duration": config.max_duration}
    own = sandbox.config.idle_timeout is not None or sandbox.config.max_duration is not None
    if not own and any(v is not None for v in timers.values()):
        sandbox.config = sandbox.config.model_copy(update=timers)
        (await current_runtime()).spawn(sandbox._enforce_limits)
    return sandbox


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print(
            "usage: python -m pytest_microsandbox.runtime._supervisor STATE_DIR [SNAPSHOT_DIR]",
            file=sys.stderr,
        )
        return 2
    raw = sys.stdin.buffer.read(_MAX_CONFIG + 1)
    try:
        if len(raw) > _MAX_CONFIG:
            raise ConfigError("the configuration is too long")
        config = SandboxConfig.from_json(raw)
    except ConfigError as exc:
        _report({"ok": False, "error": "ConfigError", "message": str(exc)})
        return 1
    restore = Path(args[1]) if len(args) == 2 else None
    os.environ[_POOL_SIZE_ENV] = "0"
    return anyio.run(serve, Path(args[0]), config, restore)


if __name__ == "__main__":
    sys.exit(main())
