"""The VM engine interface: what the sandbox layer needs from a hypervisor.

Every backend boots VMs (:class:`Backend`, :class:`VMHandle`). What only some
can do is a capability, a protocol a handle implements or not, checked with
``isinstance`` against the protocol, never against a concrete backend:

* :class:`MonitoredVM`: a VM monitor (:class:`VMMonitor`) to pause, resume and
  migrate the VM: templates, restores, snapshots and forks need it;
* :class:`DirectTransferVM`: a guest that sees a host directory, so host files
  reach it by a plain copy (the test double's transfer path).

Restores are VMs started from a :class:`VMSpec` with ``memory_file`` and
``incoming`` set, finished through the monitor.

:class:`QemuBackend` (``qemu.py``) is the real implementation; a libkrun one can
sit beside it later. :class:`HostProcessBackend` (``hostproc.py``) is the test
double: it runs the agent as an ordinary host process, so sandbox logic can be
tested without a VM.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import anyio.abc

from ._exceptions import BackendUnavailableError

__all__ = [
    "Accel",
    "Backend",
    "DirectTransferVM",
    "DiskSpec",
    "MonitoredVM",
    "ProcessVMHandle",
    "VMHandle",
    "VMMonitor",
    "VMSpec",
    "describe_exit",
    "read_console_tail",
]

Accel = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk; the guest finds it by ``serial``."""

    serial: str
    path: Path
    readonly: bool = True
    #: QEMU block driver of the file (raw, qcow2, vmdk).
    format: str = "raw"


@dataclass(frozen=True)
class VMSpec:
    """Everything a backend needs to start one VM."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    cpus: int
    memory_mib: int
    accel: Accel
    run_dir: Path  # private directory for sockets and the console log
    disks: tuple[DiskSpec, ...] = ()
    extra_args: tuple[str, ...] = field(default=())
    # Snapshot hooks (see snapshots/): guest RAM in a file (shared: the file is
    # the RAM, a template; private: a copy-on-write clone of it), a QMP monitor
    # the host accepts on ``qmp.sock``, and ``-incoming defer`` for restores.
    memory_file: Path | None = None
    memory_shared: bool = True
    qmp: bool = False
    incoming: bool = False
    #: The TCG guest's ``-cpu`` model; None: :func:`~.qemu.tcg_cpu` (a clone
    #: runs on the model its template was made with).
    cpu_model: str | None = None

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.log"


class VMHandle(abc.ABC):
    """A started VM: its agent stream, its console and its process."""

    spec: VMSpec

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The host process id of the VM, if it has one."""

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """The exit status once the VM process has exited, else None."""

    @abc.abstractmethod
    async def connect_agent(self, timeout: float) -> anyio.abc.ByteStream:
        """Return the byte stream to the guest agent's port.

        :raises BootError: the VM did not connect within ``timeout``.
        :raises GuestCrashedError: the VM process exited first.
        """

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the VM process to exit; return its status."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the VM at once and reap it. Idempotent."""

    async def connect_channel(self, timeout: float) -> anyio.abc.ByteStream:
        """Return the byte stream to the guest's raw channel port (see
        ``Sandbox.open_channel``). One connection per VM.

        :raises BackendUnavailableError: this backend has no such channel.
        :raises SandboxNotRunningError: the channel was already taken.
        """
        raise BackendUnavailableError(f"{type(self).__name__} has no host-guest channel")

    async def connect_stream_port(self, timeout: float) -> anyio.abc.ByteStream:
        """Return the byte stream to the guest's stream-path port (the
        network's ``agent --stream``). One connection per VM.

        :raises BackendUnavailableError: this backend has no such port (the
            stream path then runs over the agent channel).
        :raises SandboxNotRunningError: the port was already taken.
        """
        raise BackendUnavailableError(f"{type(self).__name__} has no stream port")

    def console_tail(self, lines: int = 40) -> str:
        return read_console_tail(self.spec.console_path, lines)

    def stderr_tail(self) -> str:
        """What the VM process itself printed, for error messages ("" if nothing)."""
        return ""

    @abc.abstractmethod
    def kill_now(self) -> None:
        """Kill the VM without awaiting anything and free its run directory: the
        last resort at interpreter exit or for a VM whose event loop is gone.
        """


@runtime_checkable
class VMMonitor(Protocol):
    """The monitor capability: pause, resume and migrate one VM.

    Errors are :class:`SnapshotError` (the monitor serves snapshots).
    """

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one monitor command and return its result."""

    async def set_ignore_shared(self, on: bool) -> None:
        """Leave RAM in a shared memory file out of migrations (or not)."""

    async def disable_self_announce(self) -> None:
        """Skip the network self-announce after a load (a clone has no switch to tell)."""

    async def save(self, state: Path, timeout: float) -> None:
        """Write the paused VM's device state to ``state``."""

    async def load(self, state: Path, timeout: float) -> None:
        """Load ``state`` into a VM started with ``incoming`` (it stays paused)."""

    async def wait_migration(self, timeout: float) -> None:
        """Wait until a migration in flight completed."""

    async def close(self) -> None:
        """Disconnect; call before the VM exits. Idempotent."""


@runtime_checkable
class MonitoredVM(Protocol):
    """A VM handle with a monitor (``VMSpec.qmp``)."""

    async def open_monitor(self, timeout: float) -> VMMonitor:
        """Connect to the VM's monitor.

        :raises BootError: the VM did not offer it within ``timeout``.
        :raises SnapshotError: the monitor handshake failed.
        """


@runtime_checkable
class DirectTransferVM(Protocol):
    """A VM handle whose guest sees ``run_dir/xfer`` of the host without mounting
    anything (the host-process double): transfers are plain file copies.
    """

    @property
    def xfer_guest_dir(self) -> str:
        """The guest's path of ``run_dir/xfer``."""


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for our child ``pid`` (Linux 5.3+), or None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class ProcessVMHandle(VMHandle):
    """A VM that is one host process plus the listener its agent connects to."""

    def __init__(
        self, spec: VMSpec, process: anyio.abc.Process, listener: anyio.abc.SocketListener
    ) -> None:
        self.spec = spec
        self._process = process
        self._listener = listener
        self._pidfd = _open_pidfd(process.pid)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    def send_kill(self) -> None:
        """Send SIGKILL unless the process is gone; never waits.

        Through a pidfd where there is one: ``Popen.send_signal`` polls first,
        and that poll reaps a child that already died, racing asyncio's child
        watcher, which then reports status 255 instead of the real one (under
        load a QEMU killed by SIGBUS, the sign of a full disk, looked like any
        other exit). A pidfd also cannot reach a recycled pid.
        """
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        elif self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)

    def close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    async def kill(self) -> None:
        if self._process.returncode is None:
            self.send_kill()
        with anyio.CancelScope(shield=True):
            await self._process.wait()
            self.close_pidfd()
            await self._process.aclose()
            await self._listener.aclose()
            self._release()

    def kill_now(self) -> None:
        if self._process.returncode is None:
            self.send_kill()
        self.close_pidfd()
        self._release()
        shutil.rmtree(self.spec.run_dir, ignore_errors=True)

    def _release(self) -> None:
        """Free per-VM host resources once the process is gone (subclass hook)."""


class Backend(abc.ABC):
    """Starts VMs."""

    name: str

    @abc.abstractmethod
    async def start(self, spec: VMSpec) -> VMHandle:
        """Start a VM for ``spec``; the caller must eventually ``kill`` it."""


def describe_exit(returncode: int | None) -> str:
    """How a process ended, for error messages: ``exited with status 1``,
    ``was killed by SIGBUS`` (a negative status), ``is still running`` (None).
    """
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def read_console_tail(path: Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """Return the last ``lines`` lines of a console log, printable characters only."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    cleaned = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")
    return "\n".join(cleaned.splitlines()[-lines:])
