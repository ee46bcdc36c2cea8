"""Host side of the guest-agent protocol: :class:`AgentClient`.

One client owns one connected byte stream to the agent. A background reader
task decodes frames and routes them by request id to per-request channels;
requests run concurrently, and their frames are written one frame at a time
(straight into a UNIX socket when no other frame is being written, else under
one lock), so a large file write never blocks other requests for long.

The first protocol violation or the end of the stream fails every pending
request and every later call with the same error (ProtocolError or
SandboxNotRunningError): the stream cannot be trusted or used any more.
"""

from __future__ import annotations

import errno as _errno
import inspect
import io
import math
import os
import secrets
import socket
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._confined import entry_name_problem
from .._exceptions import (
    CommandNotFoundError,
    ConfigError,
    CopyLimitError,
    ExecError,
    FilesystemError,
    GuestTimeoutError,
    OutputLimitError,
    PathNotFoundError,
    ProtocolError,
    SandboxError,
    SandboxNotRunningError,
)
from .._limits import MAX_ARG_STRLEN, OnOutputLimit, check_limit, check_timeout
from .process import ExecProcess

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]
from .protocol import (
    CHUNK,
    DRAIN_READS,
    MAX_FRAME,
    MIN_FRAME,
    PROTOCOL_VERSION,
    Field,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    bytes_field,
    encode_frame,
    int_field,
)
from .results import DirEntry, ExecResult, FileKind, FileStat, GuestMetrics, HelloInfo

__all__ = ["AgentClient", "BinarySink"]

_READ_SIZE = 256 * 1024
#: Prefixes of the agent's ENOENT messages that are not about the program itself.
_NOT_THE_PROGRAM = ("cannot change directory", "cannot switch to user")
_MAX_ID = 0xFFFF_FFFF
#: Linux PATH_MAX: a symlink target is shorter.
_PATH_MAX = 4096
#: How long telling the agent to stop an abandoned read may take.
_CANCEL_SEND_TIMEOUT = 5.0


class BinarySink(Protocol):
    """Anything with ``write(bytes)``, e.g. a file opened ``"wb"``."""

    def write(self, data: bytes, /) -> object:
        """Consume one chunk."""
        ...


@dataclass(eq=False)
class _Request:
    """One live request id: the reader sends its frames into ``inbox``."""

    client: AgentClient
    id: int
    inbox: MemoryObjectSendStream[Frame]
    outbox: MemoryObjectReceiveStream[Frame]
    closed: bool = field(default=False)
    #: An exec's output window (EXEC WINDOW): the most output bytes the guest may
    #: have sent and the host not acknowledged (0: none), and the count.
    window: int = 0
    unacked: int = 0

    @property
    def unacked_limit(self) -> int:
        """What an agent keeping the window can have sent unacknowledged: the
        window, plus each of its reads after the exit (stdout and stderr) of at
        most a window.
        """
        return self.window + 2 * DRAIN_READS * min(self.window, CHUNK)

    async def ack(self, size: int) -> None:
        self.unacked = max(0, self.unacked - size)
        await self.send(MsgType.ACK, [int_field(Tag.SIZE, size)])

    async def send(self, type: MsgType, fields: Sequence[Field] = ()) -> None:
        await self.client._send(encode_frame(self.id, type, fields))

    async def receive(self) -> Frame:
        if self.closed:
            raise RuntimeError(f"request {self.id} is closed")
        try:
            # A frame already routed is taken without the checkpoint (an event
            # loop iteration) that receive() pays first: EXITED often comes in
            # one read with the output before it (issue #16).
            return self.outbox.receive_nowait()
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            raise self.client._dead_error() from None
        try:
            return await self.outbox.receive()
        except anyio.EndOfStream:
            # The reader closed our inbox because the connection failed.
            raise self.client._dead_error() from None

    def violation(self, message: str) -> ProtocolError:
        return self.client._violation(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client._pending.pop(self.id, None)
            self.inbox.close()
            self.outbox.close()


class AgentClient:
    """Client of the guest agent over a connected byte stream.

    Use as ``async with AgentClient(stream) as client:``; entering starts the
    reader task, leaving stops it, closes the stream and fails what is still
    pending with SandboxNotRunningError.

    ``on_log`` is called with each LOG message (the last ``log_lines`` are also
    kept in :attr:`logs`). ``exec_grace`` is added to an exec's timeout for
    the host-side backstop; ``write_timeout`` bounds the write of one frame
    (a guest that stops reading for that long is declared dead).

    Every request method takes ``timeout`` (seconds, None = wait forever) and
    raises GuestTimeoutError when it passes. All methods raise the
    connection's error — ProtocolError if the guest broke the protocol,
    SandboxNotRunningError if the connection closed — once it has failed.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        on_log: Callable[[str], None] | None = None,
        log_lines: int = 1000,
        exec_grace: float = 10.0,
        write_timeout: float = 60.0,
    ) -> None:
        self._stream = stream
        self._sock = _plain_socket(stream)
        self._burst = 0  # reads in a row that found data without waiting
        self._on_log = on_log
        self.logs: deque[str] = deque(maxlen=log_lines)
        self.exec_grace = exec_grace
        self._write_timeout = write_timeout
        self._decoder = FrameDecoder()
        self._pending: dict[int, _Request] = {}
        # Ids start at a random point and grow: a guest restored from a capture
        # may still report requests of the session it was captured with (an
        # agent from before docs/protocol.md's HELLO rule does), and those ids
        # then fall outside this session's, almost surely.
        self._first_id = _first_request_id()
        self._next_id = self._first_id
        self._issued_span = 0  # ids handed out so far from _first_id on (wrapping)
        #: Frames the guest sent for request ids this client never issued
        #: (dropped; a stale or hostile guest's).
        self.stray_frames = 0
        self._write_lock = anyio.Lock()
        self._error: SandboxError | None = None
        self._ready: HelloInfo | None = None
        self._hello: HelloInfo | None = None
        self._ready_event = anyio.Event()
        self._shutdown_sent = False
        self._exit_stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> AgentClient:
        if self._exit_stack is not None:
            raise RuntimeError("AgentClient is already running")
        stack = AsyncExitStack()
        self._task_group = await stack.enter_async_context(anyio.create_task_group())
        self._task_group.start_soon(self._read_loop)
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._exit_stack is not None and self._task_group is not None
        self._task_group.cancel_scope.cancel()
        try:
            return await self._exit_stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The task group wraps the body's own exception; let it through bare.
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return False
            raise
        finally:
            self._fail(SandboxNotRunningError("agent client closed"))
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

    @property
    def error(self) -> SandboxError | None:
        """The error that ended the connection, or None while it is usable."""
        return self._error

    @property
    def ready_info(self) -> HelloInfo | None:
        """The last READY the agent sent, if any."""
        return self._ready

    @property
    def hello_info(self) -> HelloInfo | None:
        """The agent's answer to the last :meth:`hello`, if any (a restored guest
        sends no READY: its HELLO answer says when it started serving this host).
        """
        return self._hello

    async def wait_ready(self, timeout: float | None = None) -> HelloInfo:
        """Wait for the agent's READY (returns at once if it already came).

        Raises GuestTimeoutError after ``timeout`` seconds, or the connection's
        error if it fails first.
        """
        with self._deadline(timeout, "READY"):
            await self._ready_event.wait()
        if self._ready is None:
            raise self._dead_error()
        return self._ready

    # -- connection level -------------------------------------------------------------------

    async def hello(self, timeout: float | None = None) -> HelloInfo:
        """Negotiate the protocol version.

        Raises ProtocolError if the agent speaks another version (it answers
        ERROR, or OK with another VERSION).
        """
        reply = await self._call(
            MsgType.HELLO, [int_field(Tag.VERSION, PROTOCOL_VERSION)], timeout, "HELLO"
        )
        if reply.type == MsgType.ERROR:
            raise ProtocolError(
                f"agent refused protocol version {PROTOCOL_VERSION}: {_error_text(reply)}"
            )
        info = _agent_info(reply)
        if info.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"agent speaks protocol version {info.version}, host speaks {PROTOCOL_VERSION}"
            )
        self._hello = info
        return info

    async def ping(self, timeout: float | None = None) -> None:
        """Round trip to the agent; raises SandboxError if it answers ERROR."""
        _check_ok(await self._call(MsgType.PING, [], timeout, "PING"), "PING")

    async def configure(
        self,
        time_ns: int | None = None,
        seed: bytes | None = None,
        hostname: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Set the guest clock, credit ``seed`` (32..256 bytes) to its RNG, set its hostname.

        Raises ValueError for a bad seed length, SandboxError if the agent
        answers ERROR.
        """
        fields: list[Field] = []
        if time_ns is not None:
            fields.append(int_field(Tag.TIME_NS, time_ns))
        if seed is not None:
            if not 32 <= len(seed) <= 256:
                raise ValueError(f"seed must be 32..256 bytes, got {len(seed)}")
            fields.append(bytes_field(Tag.SEED, seed))
        if hostname is not None:
            fields.append(bytes_field(Tag.HOSTNAME, _text(hostname, "hostname")))
        _check_ok(await self._call(MsgType.CONFIGURE, fields, timeout, "CONFIGURE"), "CONFIGURE")

    async def net_setup(
        self, blob: bytes, resolv_conf: bytes = b"", timeout: float | None = None
    ) -> None:
        """Give the guest its network interfaces (``NET``; the layout is
        :meth:`pytest_microsandbox.runtime.network.NetworkStack.guest_blob`'s)
        and, if given, its /etc/resolv.conf (at most 4 KiB).

        Raises SandboxError if the agent answers ERROR.
        """
        fields = [bytes_field(Tag.NET, blob)]
        if resolv_conf:
            fields.append(bytes_field(Tag.DATA, resolv_conf))
        _check_ok(await self._call(MsgType.NET, fields, timeout, "NET"), "NET")

    async def metrics(self, timeout: float | None = None) -> GuestMetrics:
        """Return a snapshot of the guest's load; raises SandboxError on ERROR."""
        reply = _check_ok(await self._call(MsgType.METRICS, [], timeout, "METRICS"), "METRICS")
        return GuestMetrics(
            uptime_ms=reply.require_int(Tag.UPTIME_MS),
            mem_total=reply.require_int(Tag.MEM_TOTAL),
            mem_available=reply.require_int(Tag.MEM_AVAILABLE),
            cpu_busy_ms=reply.require_int(Tag.CPU_BUSY_MS),
            cpu_idle_ms=reply.require_int(Tag.CPU_IDLE_MS),
            nprocs=reply.require_int(Tag.NPROCS),
            load1_milli=reply.require_int(Tag.LOAD1_MILLI),
        )

    async def mount(
        self,
        source: str,
        target: str,
        fstype: str,
        options: str = "",
        readonly: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Mount ``source`` at ``target`` (created) in the guest.

        Raises FilesystemError (PathNotFoundError for ENOENT) if the mount fails.
        """
        fields = [
            bytes_field(Tag.SOURCE, _text(source, "source")),
            bytes_field(Tag.PATH, _guest_path(target)),
            bytes_field(Tag.FSTYPE, _text(fstype, "fstype")),
        ]
        if options:
            fields.append(bytes_field(Tag.OPTIONS, _text(options, "options")))
        if readonly:
            fields.append(int_field(Tag.FLAGS, 1))
        reply = await self._call(MsgType.MOUNT, fields, timeout, f"MOUNT {target}")
        _check_fs(reply, "mount", target)

    async def umount(self, path: str, lazy: bool = False, timeout: float | None = None) -> None:
        """Unmount ``path``; raises FilesystemError if that fails."""
        fields = [bytes_field(Tag.PATH, _guest_path(path))]
        if lazy:
            fields.append(int_field(Tag.FLAGS, 1))
        _check_fs(
            await self._call(MsgType.UMOUNT, fields, timeout, f"UMOUNT {path}"), "umount", path
        )

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the guest to sync and power off; returns once the agent acknowledged.

        Raises SandboxError if the agent answers ERROR. The connection then
        closes, and later calls raise SandboxNotRunningError.
        """
        self._shutdown_sent = True
        _check_ok(await self._call(MsgType.SHUTDOWN, [], timeout, "SHUTDOWN"), "SHUTDOWN")

    # -- exec -------------------------------------------------------------------------------

    async def exec_stream(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        tty: tuple[int, int] | None = None,
        window: int | None = None,
        auto_ack: bool = False,
    ) -> ExecProcess:
        """Start ``argv`` in the guest and return once it runs.

        ``env`` is the whole environment (none if None); ``user`` a name, uid
        or ``"uid:gid"``; ``timeout`` (seconds) makes the agent kill the
        process group; ``stdin=True`` gives the command a pipe for
        :meth:`ExecProcess.write_stdin`. ``tty=(rows, cols)`` runs it on a new
        pseudo-terminal of that size instead (its controlling terminal: stdin,
        stdout and stderr; output arrives as stdout, input goes through
        ``write_stdin``, :meth:`ExecProcess.resize` resizes it; a ``\x03`` written
        reaches the foreground process group as SIGINT, as on any terminal).
        ``window`` (bytes) bounds the output the host holds unread: the agent
        stops reading the command's output once it has sent that much not yet
        acknowledged with :meth:`ExecProcess.ack`, and a guest that sends more
        breaks the protocol; with ``auto_ack`` the process acknowledges output
        itself as its events are taken (iterated or collected by ``wait``).
        Raises ValueError for an empty argv, a size outside 1..65535, a window
        < 4096, or NUL bytes, ConfigError for a timeout that is not a finite number
        of seconds > 0, ExecError naming the argument or variable if one is
        over Linux's MAX_ARG_STRLEN or all together over one frame,
        CommandNotFoundError if the program does not exist, ExecError if the
        agent cannot start it otherwise, GuestTimeoutError if the agent does
        not answer within ``timeout`` + :attr:`exec_grace`.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        timeout = check_timeout(timeout, "timeout")
        program = os.fsdecode(argv[0])
        fields: list[Field] = [bytes_field(Tag.ARG, _text(a, "argv")) for a in argv]
        for key, value in (env or {}).items():
            if not key or "=" in key:
                raise ValueError(f"invalid environment variable name {key!r}")
            fields.append(bytes_field(Tag.ENV, _text(f"{key}={value}", "env")))
        if cwd is not None:
            fields.append(bytes_field(Tag.CWD, _guest_path(cwd)))
        if user is not None:
            fields.append(bytes_field(Tag.USER, _text(str(user), "user")))
        if timeout is not None:
            fields.append(int_field(Tag.TIMEOUT_MS, max(1, math.ceil(timeout * 1000))))
        if tty is not None:
            rows, cols = tty
            if not (1 <= rows <= 0xFFFF and 1 <= cols <= 0xFFFF):
                raise ValueError(f"a terminal of {rows}x{cols}: rows and cols must be 1..65535")
            fields += [int_field(Tag.ROWS, rows), int_field(Tag.COLS, cols)]
        elif stdin:
            fields.append(int_field(Tag.STDIN_MODE, 1))
        if window is not None:
            if window < 4096:
                raise ValueError(f"an output window of {window} bytes: it must be >= 4096")
            fields.append(int_field(Tag.WINDOW, window))
        _check_exec_size(program, fields)
        deadline = None if timeout is None else anyio.current_time() + timeout + self.exec_grace
        req = self._open()
        req.window = window or 0
        try:
            await req.send(MsgType.EXEC, fields)
            if deadline is None:
                reply = await req.receive()
            else:
                with self._deadline(deadline - anyio.current_time(), f"EXEC {program!r}"):
                    reply = await req.receive()
            if reply.type == MsgType.STARTED:
                return ExecProcess(
                    req,
                    program=program,
                    pid=reply.require_int(Tag.PID),
                    stdin_pipe=stdin or tty is not None,
                    deadline=deadline,
                    tty=tty is not None,
                    ack_every=window // 4 if window and auto_ack else 0,
                )
            if reply.type == MsgType.ERROR:
                err = reply.require_int(Tag.ERRNO)
                message = _error_text(reply)
                # The agent also reports a missing CWD (or a user's missing home) with
                # ENOENT; only its message tells them apart from a missing program.
                if err == _errno.ENOENT and not message.startswith(_NOT_THE_PROGRAM):
                    raise CommandNotFoundError(
                        f"command not found in the guest: {program!r} ({message})"
                    )
                raise ExecError(f"cannot run {program!r} in the guest: {message} (errno {err})")
            raise self._violation(f"unexpected {reply.type_name} (id {reply.id}) before STARTED")
        except BaseException:
            req.close()
            raise

    async def exec(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        max_output: int | None = None,
        on_output_limit: OnOutputLimit = "raise",
    ) -> ExecResult:
        """Run ``argv`` to completion and return its exit status and output.

        ``stdin`` bytes are fed to the command, then its stdin is closed
        (without it stdin is ``/dev/null``). A command killed for its timeout
        is reported with ``timed_out=True`` rather than raised. ``max_output``
        and ``on_output_limit`` cap the output collected, as in
        :meth:`ExecProcess.wait` (OutputLimitError). Raises like
        :meth:`exec_stream`, plus GuestTimeoutError if the exit is not
        reported within ``timeout`` + :attr:`exec_grace`.
        """
        if max_output is not None:
            check_limit(max_output, "max_output")
        if on_output_limit not in ("raise", "truncate"):
            raise ConfigError(
                f'on_output_limit: must be "raise" or "truncate", got {on_output_limit!r}'
            )
        proc = await self.exec_stream(
            argv, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin is not None
        )
        async with proc:
            if stdin is not None:
                await proc.write_stdin(stdin)
                await proc.close_stdin()
            return await proc.wait(max_output=max_output, on_output_limit=on_output_limit)

    # -- files ------------------------------------------------------------------------------

    async def read_file_to(
        self,
        path: str,
        sink: Callable[[bytes], object] | BinarySink,
        timeout: float | None = None,
        max_size: int | None = None,
        *,
        offset: int = 0,
        length: int | None = None,
    ) -> int:
        """Stream the guest file ``path`` into ``sink`` chunk by chunk; return its size.

        With ``offset`` / ``length`` only that window of the file is read (at
        most ``length`` bytes from ``offset``; fewer at its end) and its size
        returned; an agent that sends more breaks the protocol.

        ``sink`` is a callable (whose result is awaited if awaitable) or has
        ``write``. Raises PathNotFoundError / FilesystemError if the guest
        cannot read the file, ProtocolError if the chunks do not add up to the
        size the agent reports, OutputLimitError once more than ``max_size``
        bytes (None: no limit) came. A read that ends early (that limit, a
        timeout, a failing sink, cancellation) tells the agent to stop reading,
        so an endless file (``/proc/kcore``) does not stream on unseen.
        """
        if max_size is not None:
            check_limit(max_size, "max_size")
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
        write = sink.write if not callable(sink) else sink
        total = 0
        fields = [bytes_field(Tag.PATH, _guest_path(path))]
        if offset:
            fields.append(int_field(Tag.OFFSET, offset))
        if length is not None:
            fields.append(int_field(Tag.SIZE, length))
        with self._deadline(timeout, f"FS_READ {path}"), self._request() as req:
            await req.send(MsgType.FS_READ, fields)
            ended = False
            try:
                while True:
                    frame = await req.receive()
                    if frame.type == MsgType.FS_CHUNK:
                        data = frame.require_bytes(Tag.DATA)
                        if max_size is not None and total + len(data) > max_size:
                            raise OutputLimitError(
                                f"guest file {path!r} is larger than {max_size} bytes, the "
                                "limit on a file read into memory, so the guest was told to "
                                "stop reading it: copy big files to disk with "
                                "fs().copy_to_host, or raise max_size (per call, or "
                                "max_read_bytes in SandboxConfig)",
                                limit=max_size,
                            )
                        if length is not None and total + len(data) > length:
                            raise self._violation(
                                f"FS_READ of {path}: agent sent more than the {length} "
                                "bytes asked for"
                            )
                        total += len(data)
                        result = write(data)
                        if inspect.isawaitable(result):
                            await result
                        continue
                    ended = True
                    _check_fs(self._expect_end(frame, "FS_READ"), "read", path)
                    size = frame.require_int(Tag.SIZE)
                    if size != total:
                        raise self._violation(
                            f"FS_READ of {path}: agent sent {total} bytes, said {size}"
                        )
                    return total
            finally:
                if not ended:
                    await self._cancel_read(req)

    async def read_file(
        self, path: str, timeout: float | None = None, max_size: int | None = None
    ) -> bytes:
        """Return the content of the guest file ``path``; raises like :meth:`read_file_to`."""
        # BytesIO.getvalue() hands over its buffer: the content is held once, not twice.
        buffer = io.BytesIO()
        await self.read_file_to(path, buffer.write, timeout=timeout, max_size=max_size)
        return buffer.getvalue()

    async def _cancel_read(self, req: _Request) -> None:
        """Tell the agent to stop an FS_READ the host gave up on (FS_END on its id).

        Best effort, bounded and shielded (it runs while a timeout or a
        cancellation unwinds): on a dead connection there is nothing to stop.
        The agent's ERROR {ECANCELED} reply, and chunks already under way, are
        dropped with the request.
        """
        if self._error is not None:
            return
        with anyio.move_on_after(_CANCEL_SEND_TIMEOUT, shield=True):
            with suppress(SandboxError):
                await req.send(MsgType.FS_END)

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes] | os.PathLike[str],
        mode: int | None = None,
        parents: bool = True,
        append: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Write ``data`` to the guest file ``path``; return the bytes written.

        ``data`` is bytes, an async iterable of bytes, or the path of a host
        file (an ``os.PathLike`` such as ``pathlib.Path``; a plain ``str`` is
        refused as ambiguous). ``mode`` is applied exactly (no umask), to an
        existing file too; None keeps an existing file's mode and creates new
        files 0644. Data goes out in CHUNK-sized frames, each taking
        the write lock on its own. Raises TypeError for a ``str``,
        PathNotFoundError / FilesystemError if the guest write fails, OSError
        if the host file cannot be read.
        """
        if isinstance(data, str):
            raise TypeError("write_file data must be bytes, an async iterable or a host Path")
        flags = (1 if parents else 0) | (2 if append else 0)
        fields = [bytes_field(Tag.PATH, _guest_path(path)), int_field(Tag.FLAGS, flags)]
        if mode is not None:
            fields.append(int_field(Tag.MODE, mode))
        total = 0
        with self._deadline(timeout, f"FS_WRITE {path}"), self._request() as req:
            await req.send(MsgType.FS_WRITE, fields)
            _check_fs(self._expect_end(await req.receive(), "FS_WRITE"), "write", path)
            async for chunk in _chunks(data):
                # The agent answers ERROR at once when a write fails; stop sending then.
                early = _poll(req)
                if early is not None:
                    _check_fs(self._expect_end(early, "FS_WRITE"), "write", path)
                    raise self._violation(f"FS_WRITE of {path}: OK before FS_END")
                await req.send(MsgType.FS_CHUNK, [bytes_field(Tag.DATA, chunk)])
                total += len(chunk)
            await req.send(MsgType.FS_END)
            reply = _check_fs(self._expect_end(await req.receive(), "FS_WRITE"), "write", path)
            size = reply.get_int(Tag.SIZE)
            if size is not None and size != total:
                raise self._violation(f"FS_WRITE of {path}: sent {total} bytes, agent wrote {size}")
            return total

    async def list_dir(
        self, path: str, timeout: float | None = None, *, max_entries: int | None = None
    ) -> list[DirEntry]:
        """List the guest directory ``path`` (without ``.`` and ``..``).

        Every name is checked: one that is empty, ``.``, ``..`` or contains
        ``/`` or NUL cannot come from a real directory, so it is a ProtocolError
        (the guest is hostile; callers join these names to host paths). With
        ``max_entries``, a listing longer than that raises CopyLimitError
        instead of growing without bound. Raises PathNotFoundError /
        FilesystemError if it cannot be listed.
        """
        entries: list[DirEntry] = []
        with self._deadline(timeout, f"FS_LIST {path}"), self._request() as req:
            await req.send(MsgType.FS_LIST, [bytes_field(Tag.PATH, _guest_path(path))])
            while True:
                frame = await req.receive()
                if frame.type != MsgType.DIRENT:
                    _check_fs(self._expect_end(frame, "FS_LIST"), "list", path)
                    return entries
                raw_name = frame.require_bytes(Tag.NAME)
                problem = entry_name_problem(raw_name)
                if problem is not None:
                    raise self._violation(
                        f"FS_LIST of {path}: the agent sent the entry name {raw_name!r}, "
                        f"which no directory can hold ({problem})"
                    )
                if max_entries is not None and len(entries) >= max_entries:
                    raise CopyLimitError(
                        f"FS_LIST of {path}: more than {max_entries} entries "
                        "(the caller's entry budget)",
                        path=path,
                    )
                entries.append(
                    DirEntry(
                        name=os.fsdecode(raw_name),
                        kind=self._kind(frame),
                        size=frame.require_int(Tag.SIZE),
                        mode=frame.require_int(Tag.MODE),
                        mtime_ns=frame.require_int(Tag.MTIME_NS),
                    )
                )

    async def readlink(self, path: str, timeout: float | None = None) -> str:
        """Return the target of the guest symlink ``path`` (decoded like names).

        A target that is empty, holds NUL or is PATH_MAX (4096) bytes or
        longer cannot come from a real link: ProtocolError. Raises
        PathNotFoundError / FilesystemError (EINVAL: not a symlink) on failure.
        """
        fields = [bytes_field(Tag.PATH, _guest_path(path))]
        reply = _check_fs(
            await self._call(MsgType.FS_READLINK, fields, timeout, "FS_READLINK"), "readlink", path
        )
        target = reply.require_bytes(Tag.DATA)
        if not target or b"\0" in target or len(target) >= _PATH_MAX:
            raise self._violation(
                f"FS_READLINK of {path}: the agent sent the link target {target[:80]!r} "
                f"({len(target)} bytes), which no symlink can hold"
            )
        return os.fsdecode(target)

    async def stat(
        self, path: str, follow_symlinks: bool = True, timeout: float | None = None
    ) -> FileStat:
        """Stat the guest ``path`` (lstat if not ``follow_symlinks``).

        Raises PathNotFoundError / FilesystemError if that fails.
        """
        fields = [bytes_field(Tag.PATH, _guest_path(path))]
        if not follow_symlinks:
            fields.append(int_field(Tag.FLAGS, 1))
        reply = _check_fs(
            await self._call(MsgType.FS_STAT, fields, timeout, "FS_STAT"), "stat", path
        )
        return FileStat(
            kind=self._kind(reply),
            size=reply.require_int(Tag.SIZE),
            mode=reply.require_int(Tag.MODE),
            mtime_ns=reply.require_int(Tag.MTIME_NS),
            uid=reply.require_int(Tag.UID),
            gid=reply.require_int(Tag.GID),
        )

    async def mkdir(
        self, path: str, mode: int = 0o755, parents: bool = False, timeout: float | None = None
    ) -> None:
        """Create a guest directory (``parents``: like ``mkdir -p``).

        Raises FilesystemError (e.g. EEXIST without ``parents``).
        """
        fields = [
            bytes_field(Tag.PATH, _guest_path(path)),
            int_field(Tag.MODE, mode),
            int_field(Tag.FLAGS, 1 if parents else 0),
        ]
        _check_fs(await self._call(MsgType.FS_MKDIR, fields, timeout, "FS_MKDIR"), "mkdir", path)

    async def remove(
        self, path: str, recursive: bool = False, timeout: float | None = None
    ) -> None:
        """Remove a guest file, or directory (recursively if asked).

        Raises PathNotFoundError / FilesystemError if that fails.
        """
        fields = [
            bytes_field(Tag.PATH, _guest_path(path)),
            int_field(Tag.FLAGS, 1 if recursive else 0),
        ]
        _check_fs(await self._call(MsgType.FS_REMOVE, fields, timeout, "FS_REMOVE"), "remove", path)

    async def rename(self, src: str, dst: str, timeout: float | None = None) -> None:
        """Rename a guest path; raises PathNotFoundError / FilesystemError on failure."""
        fields = [bytes_field(Tag.PATH, _guest_path(src)), bytes_field(Tag.PATH2, _guest_path(dst))]
        _check_fs(await self._call(MsgType.FS_RENAME, fields, timeout, "FS_RENAME"), "rename", src)

    async def chmod(self, path: str, mode: int, timeout: float | None = None) -> None:
        """Change a guest path's permission bits; raises FilesystemError on failure."""
        fields = [bytes_field(Tag.PATH, _guest_path(path)), int_field(Tag.MODE, mode)]
        _check_fs(await self._call(MsgType.FS_CHMOD, fields, timeout, "FS_CHMOD"), "chmod", path)

    async def copy_file(
        self,
        src: str,
        dst: str,
        mode: int | None = None,
        parents: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Copy the guest file ``src`` to ``dst`` inside the guest; return its size.

        Raises PathNotFoundError / FilesystemError if either side fails.
        """
        source = [bytes_field(Tag.PATH, _guest_path(src))]
        return await self._fs_copy(source, dst, mode, parents, timeout)

    async def copy_from_disk(
        self,
        serial: str,
        offset: int,
        size: int,
        dst: str,
        mode: int | None = None,
        parents: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Copy ``size`` bytes at ``offset`` (a multiple of 4096) of the guest's
        virtio-blk disk with serial ``serial`` to the guest file ``dst``; return the size.

        Raises FilesystemError if the disk or ``dst`` fails.
        """
        source = [
            bytes_field(Tag.SOURCE, f"serial:{serial}"),
            int_field(Tag.OFFSET, offset),
            int_field(Tag.SIZE, size),
        ]
        return await self._fs_copy(source, dst, mode, parents, timeout)

    async def _fs_copy(
        self,
        source: list[Field],
        dst: str,
        mode: int | None,
        parents: bool,
        timeout: float | None,
    ) -> int:
        fields = [*source, bytes_field(Tag.PATH2, _guest_path(dst))]
        if mode is not None:
            fields.append(int_field(Tag.MODE, mode))
        fields.append(int_field(Tag.FLAGS, 1 if parents else 0))
        reply = _check_fs(
            await self._call(MsgType.FS_COPY, fields, timeout, "FS_COPY"), "copy", dst
        )
        return reply.require_int(Tag.SIZE)

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(
        self, type: MsgType, fields: Sequence[Field], timeout: float | None, what: str
    ) -> Frame:
        """Send a one-reply request; return its OK or ERROR frame."""
        with self._deadline(timeout, what), self._request() as req:
            await req.send(type, fields)
            return self._expect_end(await req.receive(), what)

    def _expect_end(self, frame: Frame, what: str) -> Frame:
        if frame.type in (MsgType.OK, MsgType.ERROR):
            return frame
        raise self._violation(f"unexpected {frame.type_name} (id {frame.id}) in reply to {what}")

    def _kind(self, frame: Frame) -> FileKind:
        raw = frame.require_int(Tag.KIND)
        try:
            return FileKind(raw)
        except ValueError:
            raise self._violation(f"{frame.type_name} (id {frame.id}) has KIND {raw}") from None

    def _open(self) -> _Request:
        self._check_alive()
        # Ids grow monotonically and wrap, skipping live ones, so a late frame for an
        # abandoned (timed out) request is not mistaken for a reply to a new one.
        while self._next_id in self._pending:
            self._advance_id()
        req_id = self._next_id
        self._advance_id()
        inbox, outbox = anyio.create_memory_object_stream[Frame](math.inf)
        req = _Request(self, req_id, inbox, outbox)
        self._pending[req_id] = req
        return req

    def _advance_id(self) -> None:
        self._next_id = self._next_id % _MAX_ID + 1
        self._issued_span = min(self._issued_span + 1, _MAX_ID)

    def _issued(self, req_id: int) -> bool:
        """Whether this client ever handed out ``req_id`` (ids 1.._MAX_ID, wrapping)."""
        return req_id > 0 and (req_id - self._first_id) % _MAX_ID < self._issued_span

    @contextmanager
    def _request(self) -> Iterator[_Request]:
        req = self._open()
        try:
            yield req
        finally:
            req.close()

    @contextmanager
    def _deadline(self, timeout: float | None, what: str) -> Iterator[None]:
        if timeout is None:
            yield
            return
        try:
            with anyio.fail_after(timeout):
                yield
        except TimeoutError:
            raise GuestTimeoutError(f"agent did not answer {what} within {timeout:g} s") from None

    async def _send(self, data: bytes) -> None:
        self._check_alive()
        if self._sock is not None and not self._write_lock.locked():
            # Nothing else is being written: the frame goes straight into the
            # socket, without the lock's and the stream's checkpoints and the two
            # cancel scopes below (each an event loop iteration or more of host CPU
            # per request; issue #16). What the socket does not take now is sent
            # below, under the lock, before any other frame.
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                self._fail(SandboxNotRunningError(f"guest connection closed: {err!r}"))
                raise self._dead_error() from err
            if sent == len(data):
                return
            data = data[sent:]
            if sent:
                # Part of a frame is out: a cancellation now would cut it short.
                with anyio.CancelScope(shield=True):
                    await self._send_locked(data)
                return
        await self._send_locked(data)

    async def _send_locked(self, data: bytes) -> None:
        async with self._write_lock:
            self._check_alive()
            try:
                # Shielded: a frame cut short by cancellation would desynchronize the
                # stream for every request; write_timeout still bounds a stuck guest.
                with anyio.CancelScope(shield=True), anyio.fail_after(self._write_timeout):
                    await self._stream.send(data)
            except TimeoutError:
                exc: SandboxError = GuestTimeoutError(
                    f"guest did not read a frame within {self._write_timeout:g} s"
                )
                self._fail(exc)
                raise self._dead_error() from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as err:
                self._fail(SandboxNotRunningError(f"guest connection closed: {err!r}"))
                raise self._dead_error() from err

    async def _receive_bytes(self) -> bytes:
        """The next bytes from the agent (raises anyio.EndOfStream at its end).

        On a plain socket, read it directly: anyio's ``receive`` passes a
        checkpoint (an event loop iteration) before every read, even when a
        reply is already waiting (issue #16). A read that finds data right
        after one that did (no wait in between) passes a checkpoint first, so a
        guest that never stops sending cannot starve the host's other tasks.
        """
        sock = self._sock
        if sock is None:
            return await self._stream.receive(_READ_SIZE)
        while True:
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                self._burst = 0
                await anyio.wait_readable(sock)
                continue
            if not data:
                raise anyio.EndOfStream
            if self._burst:
                await anyio.lowlevel.checkpoint()
            self._burst += 1
            return data

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._receive_bytes()
                except anyio.EndOfStream:
                    break
                for frame in self._decoder.feed(data):
                    self._route(frame)
        except ProtocolError as exc:
            self._fail(exc)
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._fail(SandboxNotRunningError(f"guest connection closed: {exc!r}"))
            return
        except Exception as exc:
            # A bug here must not leave callers hanging; report it to all of them.
            self._fail(SandboxError(f"agent reader failed: {exc!r}"))
            raise
        how = " mid-frame" if self._decoder.buffered else ""
        after = " after SHUTDOWN" if self._shutdown_sent else ""
        self._fail(SandboxNotRunningError(f"guest connection closed{how}{after}"))

    def _route(self, frame: Frame) -> None:
        if frame.type == MsgType.READY:
            self._ready = _agent_info(frame)
            self._ready_event.set()
        elif frame.type == MsgType.LOG:
            text = frame.require_str(Tag.MESSAGE)
            self.logs.append(text)
            if self._on_log is not None:
                try:
                    self._on_log(text)
                except Exception as exc:  # a faulty callback must not kill the connection
                    self.logs.append(f"(log callback failed: {exc!r})")
        else:
            req = self._pending.get(frame.id)
            if req is None or req.closed:
                # Frames for ids we gave up on (timeouts, abandoned execs) are
                # dropped; so are those for ids never issued, counted: a guest
                # sending them is stale or hostile, and no request may take them.
                if not self._issued(frame.id):
                    self._stray(frame)
                return
            if req.window and frame.type in (MsgType.STDOUT, MsgType.STDERR):
                req.unacked += len(frame.get_bytes(Tag.DATA) or b"")
                if req.unacked > req.unacked_limit:
                    raise self._violation(
                        f"{frame.type_name} (id {frame.id}): {req.unacked} bytes of output "
                        f"not acknowledged, over the window of {req.window}"
                    )
            req.inbox.send_nowait(frame)

    def _stray(self, frame: Frame) -> None:
        self.stray_frames += 1
        if self.stray_frames == 1:  # once: a guest could send them forever
            self.logs.append(
                f"(dropped {frame.type_name} for request id {frame.id}, never issued by "
                "this host session; later ones are only counted in stray_frames)"
            )

    def _violation(self, message: str) -> ProtocolError:
        exc = ProtocolError(message)
        self._fail(exc)
        return exc

    def _fail(self, exc: SandboxError) -> None:
        if self._error is not None:
            return
        self._error = exc
        for req in list(self._pending.values()):
            # Closing the inbox wakes the request's receiver, which raises _dead_error().
            req.inbox.close()
        self._ready_event.set()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._dead_error()

    def _dead_error(self) -> SandboxError:
        assert self._error is not None
        # A fresh instance per raise: sharing one would pile up tracebacks.
        exc = type(self._error)(self._error.message)
        exc.__cause__ = self._error
        return exc


def _first_request_id() -> int:
    """Where a client's request ids start: anywhere in 1.._MAX_ID."""
    return secrets.randbelow(_MAX_ID) + 1


def _plain_socket(stream: anyio.abc.ByteStream) -> socket.socket | None:
    """The socket under ``stream`` if the client may read and write it directly:
    a UNIX socket stream, which keeps no buffer of its own between the socket
    and its callers (a TCP stream on asyncio writes through a transport).
    """
    if not isinstance(stream, anyio.abc.UNIXSocketStream):
        return None
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    return sock if isinstance(sock, socket.socket) else None


def _agent_info(frame: Frame) -> HelloInfo:
    return HelloInfo(
        version=frame.require_int(Tag.VERSION),
        agent_version=frame.require_str(Tag.AGENT_VERSION),
        uptime_ms=frame.require_int(Tag.UPTIME_MS),
    )


def _error_text(frame: Frame) -> str:
    return frame.get_str(Tag.MESSAGE) or "(no message)"


def _check_ok(frame: Frame, what: str) -> Frame:
    if frame.type == MsgType.ERROR:
        raise SandboxError(
            f"agent failed {what}: {_error_text(frame)} (errno {frame.require_int(Tag.ERRNO)})"
        )
    return frame


def _check_fs(frame: Frame, op: str, path: str) -> Frame:
    if frame.type != MsgType.ERROR:
        return frame
    err = frame.require_int(Tag.ERRNO)
    message = f"guest {op} {path!r} failed: {_error_text(frame)} (errno {err})"
    cls = PathNotFoundError if err == _errno.ENOENT else FilesystemError
    raise cls(message, errno=err, path=path)


def _poll(req: _Request) -> Frame | None:
    try:
        return req.outbox.receive_nowait()
    except anyio.WouldBlock:
        return None
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        raise req.client._dead_error() from None


async def _chunks(data: bytes | AsyncIterable[bytes] | os.PathLike[str]) -> AsyncIterator[bytes]:
    """Yield non-empty pieces of at most CHUNK bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK):
            yield bytes(view[offset : offset + CHUNK])
    elif isinstance(data, os.PathLike):
        async with await anyio.open_file(data, "rb") as f:
            while chunk := await f.read(CHUNK):
                yield chunk
    else:
        async for piece in data:
            view = memoryview(piece)
            for offset in range(0, len(view), CHUNK):
                yield bytes(view[offset : offset + CHUNK])


def _check_exec_size(program: str, fields: Sequence[Field]) -> None:
    """Refuse, naming the culprit, an EXEC the guest could never run: one string
    over Linux's MAX_ARG_STRLEN, or a request over one frame.
    """
    named: list[tuple[str, int]] = []
    arg_index = 0
    for tag, value in fields:
        if tag == Tag.ARG:
            named.append((f"argv[{arg_index}]", len(value)))
            arg_index += 1
        elif tag == Tag.ENV:
            name = os.fsdecode(value.split(b"=", 1)[0])
            named.append((f"environment variable {name}", len(value)))
    fix = "pass large data through stdin or a file (sandbox.fs().write)"
    for what, size in named:
        if size + 1 > MAX_ARG_STRLEN:  # the kernel counts the terminating NUL
            raise ExecError(
                f"cannot run {program!r}: {what} is {size} bytes, over Linux's limit of "
                f"{MAX_ARG_STRLEN - 1} bytes for one argument or environment string "
                f"(MAX_ARG_STRLEN): {fix}"
            )
    total = MIN_FRAME + sum(5 + len(value) for _, value in fields)
    if total > MAX_FRAME:
        what, size = max(named, key=lambda item: item[1])
        raise ExecError(
            f"cannot run {program!r}: its arguments and environment take {total} bytes, "
            f"over the {MAX_FRAME}-byte limit of one EXEC request (the largest is {what}, "
            f"{size} bytes): {fix}"
        )


def _text(value: str | bytes, what: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if b"\0" in raw:
        raise ValueError(f"{what} must not contain NUL bytes: {value!r}")
    return raw


def _guest_path(path: str | os.PathLike[str]) -> bytes:
    raw = _text(os.fspath(path), "guest path")
    if not raw.startswith(b"/"):
        raise ValueError(f"guest paths must be absolute: {os.fspath(path)!r}")
    return raw
