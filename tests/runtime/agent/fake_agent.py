"""A scripted in-process stand-in for the guest agent, speaking the wire protocol."""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from pytest_microsandbox.runtime.agent.client import AgentClient
from pytest_microsandbox.runtime.agent.protocol import (
    CHUNK,
    HOST_TO_GUEST,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    bytes_field,
    encode_frame,
    int_field,
)


def err(no: int, message: str) -> list[tuple[int, bytes]]:
    return [int_field(Tag.ERRNO, no), bytes_field(Tag.MESSAGE, message)]


@dataclass
class FakeAgent:
    """Serves requests from an in-memory file system and scripted programs.

    Its decoder uses the host->guest schema, so every frame the client sends is
    checked as strictly as the host checks the guest.
    """

    stream: anyio.abc.ByteStream
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(HOST_TO_GUEST))
    received: list[Frame] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    read_chunk: int = CHUNK
    answer: bool = True  # False: swallow requests without replying
    fail_write_after: int | None = None  # ERROR an FS_WRITE after this many chunks
    _queue: list[Frame] = field(default_factory=list)
    _execs: dict[int, MemoryObjectSendStream[Frame]] = field(default_factory=dict)
    _writes: dict[int, tuple[str, bytearray, bool]] = field(default_factory=dict)
    _send_lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def recv(self) -> Frame:
        while not self._queue:
            self._queue.extend(self.decoder.feed(await self.stream.receive()))
        frame = self._queue.pop(0)
        self.received.append(frame)
        return frame

    async def send(self, id_: int, type_: int, fields: list[tuple[int, bytes]] = ()) -> None:
        await self.send_raw(encode_frame(id_, type_, fields))

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            # The host hung up with replies still to send (a client that gave up
            # on a request, as tests make it do): dropped, as the real agent
            # drops them; the next recv() sees the end of the stream.
            with contextlib.suppress(anyio.BrokenResourceError):
                await self.stream.send(data)

    def of_type(self, type_: MsgType) -> list[Frame]:
        return [f for f in self.received if f.type == type_]

    async def wait_for(self, type_: MsgType, count: int = 1) -> list[Frame]:
        """Wait until ``count`` frames of ``type_`` arrived (the wire is asynchronous)."""
        with anyio.fail_after(5):
            while len(self.of_type(type_)) < count:
                await anyio.sleep(0.001)
        return self.of_type(type_)

    async def serve(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    frame = await self.recv()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    tg.cancel_scope.cancel()
                    return
                await self.dispatch(frame, tg)

    async def dispatch(self, f: Frame, tg: anyio.abc.TaskGroup) -> None:
        t, i = f.type, f.id
        if t in (MsgType.STDIN, MsgType.SIGNAL):
            chan = self._execs.get(i)
            if chan is not None:
                chan.send_nowait(f)
            return
        if t == MsgType.FS_CHUNK:
            state = self._writes.get(i)
            if state is not None:
                state[1].extend(f.require_bytes(Tag.DATA))
                n = sum(1 for x in self.received if x.id == i and x.type == MsgType.FS_CHUNK)
                if self.fail_write_after is not None and n >= self.fail_write_after:
                    del self._writes[i]
                    await self.send(i, MsgType.ERROR, err(errno.ENOSPC, "No space left"))
            return
        if t == MsgType.FS_END:
            state = self._writes.pop(i, None)
            if state is not None:
                path, buf, append = state
                self.files[path] = (self.files.get(path, b"") if append else b"") + bytes(buf)
                await self.send(i, MsgType.OK, [int_field(Tag.SIZE, len(buf))])
            return
        if not self.answer:
            return
        if t == MsgType.HELLO:
            await self.send(i, MsgType.OK, self.info(f.require_int(Tag.VERSION)))
        elif t in (MsgType.PING, MsgType.CONFIGURE, MsgType.MOUNT, MsgType.UMOUNT):
            await self.send(i, MsgType.OK)
        elif t == MsgType.SHUTDOWN:
            await self.send(i, MsgType.OK)
            await self.stream.aclose()
        elif t == MsgType.METRICS:
            vals = [Tag.UPTIME_MS, Tag.MEM_TOTAL, Tag.MEM_AVAILABLE, Tag.CPU_BUSY_MS]
            vals += [Tag.CPU_IDLE_MS, Tag.NPROCS, Tag.LOAD1_MILLI]
            await self.send(i, MsgType.OK, [int_field(tag, n) for n, tag in enumerate(vals)])
        elif t == MsgType.EXEC:
            inbox, outbox = anyio.create_memory_object_stream[Frame](math.inf)
            self._execs[i] = inbox
            tg.start_soon(self.run_exec, f, outbox)
        else:
            await self.fs(f)

    @staticmethod
    def info(version: int = 1) -> list[tuple[int, bytes]]:
        return [
            int_field(Tag.VERSION, version),
            bytes_field(Tag.AGENT_VERSION, "fake-1.0"),
            int_field(Tag.UPTIME_MS, 1234),
        ]

    async def fs(self, f: Frame) -> None:
        i, path = f.id, f.require_bytes(Tag.PATH).decode()
        if f.type == MsgType.FS_WRITE:
            if path.startswith("/ro/"):
                await self.send(i, MsgType.ERROR, err(errno.EROFS, "Read-only file system"))
                return
            self._writes[i] = (path, bytearray(), bool((f.get_int(Tag.FLAGS) or 0) & 2))
            await self.send(i, MsgType.OK)
            return
        if f.type == MsgType.FS_LIST:
            prefix = path.rstrip("/") + "/"
            for name, data in sorted(self.files.items()):
                if name.startswith(prefix):
                    await self.send(
                        i,
                        MsgType.DIRENT,
                        [
                            bytes_field(Tag.NAME, name[len(prefix) :]),
                            int_field(Tag.KIND, 1),
                            int_field(Tag.SIZE, len(data)),
                            int_field(Tag.MODE, 0o100644),
                            int_field(Tag.MTIME_NS, 5),
                        ],
                    )
            await self.send(i, MsgType.OK)
            return
        if f.type in (MsgType.FS_MKDIR, MsgType.FS_CHMOD):
            await self.send(i, MsgType.OK)
            return
        if path not in self.files:
            await self.send(i, MsgType.ERROR, err(errno.ENOENT, "No such file or directory"))
            return
        data = self.files[path]
        if f.type == MsgType.FS_READ:
            for off in range(0, len(data), self.read_chunk):
                chunk = data[off : off + self.read_chunk]
                await self.send(i, MsgType.FS_CHUNK, [bytes_field(Tag.DATA, chunk)])
            await self.send(i, MsgType.OK, [int_field(Tag.SIZE, len(data))])
        elif f.type == MsgType.FS_STAT:
            fields = [int_field(Tag.KIND, 1), int_field(Tag.SIZE, len(data))]
            fields += [int_field(Tag.MODE, 0o100640), int_field(Tag.MTIME_NS, 7)]
            fields += [int_field(Tag.UID, 1000), int_field(Tag.GID, 100)]
            await self.send(i, MsgType.OK, fields)
        elif f.type == MsgType.FS_REMOVE:
            del self.files[path]
            await self.send(i, MsgType.OK)
        elif f.type == MsgType.FS_RENAME:
            self.files[f.require_bytes(Tag.PATH2).decode()] = self.files.pop(path)
            await self.send(i, MsgType.OK)
        else:  # pragma: no cover - the tests send nothing else
            raise AssertionError(f"unexpected {f}")

    async def run_exec(self, f: Frame, inbox: anyio.abc.ObjectReceiveStream[Frame]) -> None:
        i = f.id
        argv = [a.decode() for a in f.get_all(Tag.ARG)]

        async def out(data: str, type_: MsgType = MsgType.STDOUT) -> None:
            await self.send(i, type_, [bytes_field(Tag.DATA, data.encode())])

        async def exited(code: int | None = 0, sig: int | None = None, timed_out: int = 0) -> None:
            fields = [int_field(Tag.TIMED_OUT, timed_out)]
            if code is not None:
                fields.append(int_field(Tag.EXIT_CODE, code))
            if sig is not None:
                fields.append(int_field(Tag.TERM_SIGNAL, sig))
            await self.send(i, MsgType.EXITED, fields)

        program = argv[0]
        if program == "missing":
            await self.send(i, MsgType.ERROR, err(errno.ENOENT, "No such file or directory"))
            return
        if program == "nocwd":
            message = "cannot change directory to /nope: No such file or directory"
            await self.send(i, MsgType.ERROR, err(errno.ENOENT, message))
            return
        if program == "denied":
            await self.send(i, MsgType.ERROR, err(errno.EACCES, "Permission denied"))
            return
        await self.send(i, MsgType.STARTED, [int_field(Tag.PID, 100 + i)])
        if program == "echo":
            await out(" ".join(argv[1:]) + "\n")
            await exited(0)
        elif program == "env":
            env = b"\n".join(f.get_all(Tag.ENV)).decode()
            await out(env)
            await out(f"cwd={f.get_str(Tag.CWD)} user={f.get_str(Tag.USER)}", MsgType.STDERR)
            await exited(3)
        elif program == "cat":
            async for frame in inbox:
                data = frame.require_bytes(Tag.DATA)
                if not data:
                    break
                await self.send(i, MsgType.STDOUT, [bytes_field(Tag.DATA, data)])
            await exited(0)
        elif program == "sleep":
            async for frame in inbox:
                if frame.type == MsgType.SIGNAL:
                    await exited(None, frame.require_int(Tag.SIGNAL))
                    return
        elif program == "timeout":
            await out("partial")
            await exited(None, signal.SIGKILL, timed_out=1)
        elif program == "chatty":
            # Many small chunks on both streams, yielding between them so that
            # concurrent execs interleave on the wire.
            n = int(argv[1])
            for k in range(n):
                await out(f"{i}:out{k};")
                await anyio.sleep(0)
                await out(f"{i}:err{k};", MsgType.STDERR)
                await anyio.sleep(0)
            await exited(i % 256)
        elif program == "hang":
            await anyio.sleep_forever()
        else:
            raise AssertionError(f"unknown program {program}")


Handler = Callable[[FakeAgent], Awaitable[None]]


@asynccontextmanager
async def connect(
    handler: Handler | None = None, **client_kwargs: object
) -> AsyncIterator[tuple[AgentClient, FakeAgent]]:
    """A client and a fake agent on the two ends of a socketpair.

    ``handler`` (default: ``FakeAgent.serve``) runs as the agent.
    """
    a, b = socket.socketpair()
    host = await anyio.abc.UNIXSocketStream.from_socket(a)
    guest = await anyio.abc.UNIXSocketStream.from_socket(b)
    agent = FakeAgent(guest)
    # Every test must finish quickly: a hang is a failure, not a stuck CI job.
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def run_agent() -> None:
                try:
                    await (handler or FakeAgent.serve)(agent)
                finally:
                    done.set()

            tg.start_soon(run_agent)
            async with AgentClient(host, **client_kwargs) as client:  # type: ignore[arg-type]
                yield client, agent
            # Let the agent see EOF before cancelling it: cancelling a raw-socket receive
            # just as the socket turns readable trips an anyio/asyncio race
            # (InvalidStateError from Future.set_result, cf. agronholm/anyio#1267).
            with anyio.move_on_after(0.5):
                await done.wait()
            tg.cancel_scope.cancel()
    await guest.aclose()
