"""The state store of named sandboxes: one sqlite database in the cache directory.

Every named sandbox (``Sandbox.create`` with a ``name``) has a row: its status,
when it was created, its configuration, the process that owns its VM (the
creator, or a detached sandbox's supervisor) and, for a detached one, where
its supervisor listens. Processes that never met share it: ``Sandbox.list()``
in one shell sees a sandbox another started.

Concurrency: WAL journal and a busy timeout, so readers never block and
writers (N xdist workers creating sandboxes at once) queue for a few
milliseconds; a name is claimed in one ``BEGIN IMMEDIATE`` transaction, so two
processes cannot both get it. Each process keeps one connection per database
(module state, keyed by pid: a connection never crosses a fork), used by one
thread at a time.

A row whose owner died without removing it (SIGKILL, a crash) is stale: its
owner is recognised by pid *and* start time (``/proc/PID/stat``), so a
recycled pid does not keep it alive. Stale rows are deleted, with their files
in the state directory and the dead owner's VM run directories, whenever the
store is read or a name is claimed; the owner's VM died with it (its
launcher's parent-death signal).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from . import paths

__all__ = [
    "STATE_DIR",
    "SandboxRecord",
    "SandboxStatus",
    "StateStore",
    "new_record",
    "process_alive",
    "process_start",
]

#: The store's directory under the cache dir: the database, and each detached
#: sandbox's control socket and token (mode 0600, the directory 0700).
STATE_DIR = "sandboxes"
_DB = "state.db"
#: Milliseconds a writer waits for another's transaction (claims are short).
_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    config TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL,
    vm_pid INTEGER,
    detached INTEGER NOT NULL,
    control TEXT
)
"""


class SandboxStatus(str, Enum):
    """Where a sandbox is in its life (names follow microsandbox's SDK)."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    DRAINING = "draining"
    STOPPED = "stopped"
    CRASHED = "crashed"


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone.

    With the pid it identifies a process for good: a recycled pid has another.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return len(fields) > 19 and fields[0] != "Z" and fields[19] == str(start)


@dataclass(frozen=True)
class SandboxRecord:
    """One named sandbox's row."""

    name: str
    status: SandboxStatus
    created: float  # seconds since the epoch
    config: str  # SandboxConfig JSON
    owner_pid: int
    owner_start: int
    vm_pid: int | None = None
    detached: bool = False
    #: A detached sandbox's control socket (its supervisor listens there).
    control: str | None = None

    @property
    def alive(self) -> bool:
        """Whether its owner still runs (else the row is stale)."""
        return process_alive(self.owner_pid, self.owner_start)

    @property
    def owned_here(self) -> bool:
        return self.owner_pid == os.getpid() and self.owner_start == process_start(os.getpid())


class StateStore:
    """The named sandboxes of one cache directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def default(cls, cache_dir: str | os.PathLike[str] | None = None) -> StateStore:
        """The store of ``cache_dir`` (default: the cache directory of ``paths``)."""
        return cls(paths.cache_dir(cache_dir) / STATE_DIR)

    @property
    def path(self) -> Path:
        return self.directory / _DB

    @contextlib.contextmanager
    def _connect(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        conn, lock = _connection(self.directory, self.path)
        with lock:
            if not write:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def claim(self, record: SandboxRecord) -> SandboxRecord | None:
        """Insert ``record`` unless a live sandbox has its name; return that one then.

        A stale row of the name is dropped first.
        """
        with self._connect(write=True) as conn:
            found = _fetch(conn, record.name)
            if found is not None:
                if found.alive:
                    return found
                self._drop(conn, found)
            conn.execute(
                "INSERT INTO sandboxes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.status.value,
                    record.created,
                    record.config,
                    record.owner_pid,
                    record.owner_start,
                    record.vm_pid,
                    int(record.detached),
                    record.control,
                ),
            )
        return None

    def update(self, record: SandboxRecord, **changes: object) -> SandboxRecord:
        """Change the row of ``record`` (if its owner still holds it); return it changed."""
        new = replace(record, **changes)  # type: ignore[arg-type]
        with self._connect(write=True) as conn:
            conn.execute(
                "UPDATE sandboxes SET status = ?, vm_pid = ?, control = ?, detached = ?"
                " WHERE name = ? AND owner_pid = ? AND owner_start = ?",
                (
                    new.status.value,
                    new.vm_pid,
                    new.control,
                    int(new.detached),
                    new.name,
                    new.owner_pid,
                    new.owner_start,
                ),
            )
        return new

    def release(self, record: SandboxRecord) -> None:
        """Delete the row of ``record`` if its owner still holds it."""
        with self._connect(write=True) as conn:
            conn.execute(
                "DELETE FROM sandboxes WHERE name = ? AND owner_pid = ? AND owner_start = ?",
                (record.name, record.owner_pid, record.owner_start),
            )

    def get(self, name: str) -> SandboxRecord | None:
        """The live sandbox called ``name``, or None (a stale row is dropped)."""
        with self._connect(write=False) as conn:
            found = _fetch(conn, name)
        if found is None or found.alive:
            return found
        self._sweep([found])
        return None

    def list(self) -> list[SandboxRecord]:
        """Every live named sandbox, oldest first; stale rows are dropped."""
        with self._connect(write=False) as conn:
            rows = conn.execute("SELECT * FROM sandboxes ORDER BY created, name").fetchall()
        records = [_record(row) for row in rows]
        stale = [r for r in records if not r.alive]
        if stale:
            self._sweep(stale)
        return [r for r in records if r not in stale]

    def _sweep(self, stale: builtins.list[SandboxRecord]) -> None:
        with self._connect(write=True) as conn:
            for record in stale:
                found = _fetch(conn, record.name)
                if found is not None and not found.alive:
                    self._drop(conn, found)

    def _drop(self, conn: sqlite3.Connection, record: SandboxRecord) -> None:
        conn.execute(
            "DELETE FROM sandboxes WHERE name = ? AND owner_pid = ? AND owner_start = ?",
            (record.name, record.owner_pid, record.owner_start),
        )
        for path in self.files_of(record.name):
            with contextlib.suppress(OSError):
                path.unlink()
        # The dead owner's VM run dirs (sockets, console, transfer disk), as the
        # next VM start would sweep them; not if the pid is in use again.
        if not Path(f"/proc/{record.owner_pid}").exists():
            run_root = Path(tempfile.gettempdir()) / f"{paths.RUN_ROOT_PREFIX}{record.owner_pid}"
            shutil.rmtree(run_root, ignore_errors=True)

    def files_of(self, name: str) -> tuple[Path, Path, Path]:
        """A detached sandbox's control socket, token file and supervisor log.

        Named by a digest of the name: a unix socket path holds at most 107
        bytes, and a 63-character name under the default cache dir would not fit.
        """
        stem = hashlib.sha256(name.encode()).hexdigest()[:16]
        return (
            self.directory / f"{stem}.sock",
            self.directory / f"{stem}.token",
            self.directory / f"{stem}.log",
        )


@dataclass
class _Open:
    conn: sqlite3.Connection
    lock: threading.Lock
    inode: int


#: One connection per process and database: closing a WAL database's last
#: connection checkpoints it with an fsync (~8 ms a transaction, measured,
#: instead of ~0.02 ms on an open one). Keyed by pid: a forked child opens its
#: own and never touches (nor closes) its parent's.
_open: dict[tuple[int, Path], _Open] = {}
_open_lock = threading.Lock()
#: Connections inherited over a fork, kept referenced so no collection closes them.
_inherited: list[_Open] = []


def _connection(directory: Path, path: Path) -> tuple[sqlite3.Connection, threading.Lock]:
    """This process's connection to ``path`` (a new one if the file was replaced)."""
    with _open_lock:
        for key in [k for k in _open if k[0] != os.getpid()]:
            _inherited.append(_open.pop(key))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = (os.getpid(), path)
        found = _open.get(key)
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if found is not None and found.inode == inode:
            return found.conn, found.lock
        if found is not None:  # the database was deleted or replaced: start afresh
            with contextlib.suppress(sqlite3.Error):
                found.conn.close()
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE);
        # check_same_thread=False: calls come from worker threads, one at a time.
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        _init(conn)
        opened = _Open(conn, threading.Lock(), path.stat().st_ino)
        _open[key] = opened
        return conn, opened.lock


def _init(conn: sqlite3.Connection) -> None:
    """Switch to WAL and create the table. Retried: a switch to WAL while other
    processes first open the same new database can fail with "database is
    locked" without waiting on the busy handler.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # No fsync per commit (WAL keeps the file consistent): rows describe
            # live processes, which a power loss ends anyway.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _fetch(conn: sqlite3.Connection, name: str) -> SandboxRecord | None:
    row = conn.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
    return None if row is None else _record(row)


def _record(row: tuple[object, ...]) -> SandboxRecord:
    name, status, created, config, owner_pid, owner_start, vm_pid, detached, control = row
    return SandboxRecord(
        name=str(name),
        status=SandboxStatus(status),
        created=float(created),  # type: ignore[arg-type]
        config=str(config),
        owner_pid=int(owner_pid),  # type: ignore[call-overload]
        owner_start=int(owner_start),  # type: ignore[call-overload]
        vm_pid=None if vm_pid is None else int(vm_pid),  # type: ignore[call-overload]
        detached=bool(detached),
        control=None if control is None else str(control),
    )


def new_record(name: str, config_json: str, *, detached: bool = False) -> SandboxRecord:
    """A STARTING row for a sandbox this process is about to own."""
    pid = os.getpid()
    start = process_start(pid)
    assert start is not None  # our own process
    return SandboxRecord(
        name=name,
        status=SandboxStatus.STARTING,
        created=time.time(),
        config=config_json,
        owner_pid=pid,
        owner_start=start,
        detached=detached,
    )
