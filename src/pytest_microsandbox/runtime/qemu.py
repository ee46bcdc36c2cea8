"""The QEMU backend: command line, process lifetime, agent socket.

Machine ``microvm`` (virtio-mmio, ACPI so the guest can power off), the agent
on a ``virtio-serial`` port backed by a unix socket the host listens on (so no
byte the guest sends before the host looks is lost), the serial console in a
file for error reports. QEMU is exec'd through the launcher (:mod:`.launcher`;
``setpriv --pdeathsig KILL`` without a C compiler), so it dies with the thread
that started it: a SIGKILLed owner leaves no VM.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import anyio
import anyio.abc

from ._exceptions import (
    BackendUnavailableError,
    BootError,
    GuestCrashedError,
    SandboxNotRunningError,
)
from .backend import Backend, ProcessVMHandle, VMHandle, VMMonitor, VMSpec, describe_exit
from .launcher import CONSOLE_FD, launch_prefix
from .network._stack import HOST_SOCKET, QEMU_SOCKET

__all__ = [
    "CHANNEL_PORT_NAME",
    "QEMU_BINARY",
    "STREAM_PORT_NAME",
    "QemuBackend",
    "QemuVM",
    "build_command",
    "find_qemu",
    "nic_args",
    "tcg_cpu",
]

QEMU_BINARY = "qemu-system-x86_64"

#: TCG translation cache per VM, in MiB. QEMU's default reserves up to 1 GiB
#: of address space per process; 64 MiB measured as plenty for our guests.
TCG_TB_SIZE_MIB = 64

#: The guest CPU under TCG: what QEMU can emulate (``max``: host binaries built
#: for x86-64-v2/v3 need SSE4.2, AVX2, ...) less ERMS ("enhanced REP
#: MOVSB/STOSB"), a speed hint that emulation makes false. With it the guest
#: kernel clears every new page with a 4096-iteration ``rep stosb`` and copies
#: to and from user memory with ``rep movsb``, each iteration emulated; without
#: it, with ``rep stosq``/``rep movsq``, eight bytes per iteration. Measured
#: here, same run, two guests side by side (issue #16): a 32 MiB zero-filled
#: allocation 163 -> 60 ms, a forked child writing 4096 inherited pages 77 ->
#: 51 ms, a fork+exec of ``/usr/bin/true`` from ``sh`` 1.35x as fast, a marked
#: test under ``process`` isolation (copy-on-write faults) 0.66-1.9x per
#: round, 1.19x p50. Less SMAP too: QEMU ends a translation block at every
#: ``stac``/``clac``, which the guest kernel wraps around each access to user
#: memory, so each syscall's copies leave translated code for a lookup;
#: without it (two same-run A/Bs, load average 2.6 and 4.4) an exec round trip
#: is 1.06-1.11x and ``sh``'s fork+exec 1.11-1.15x as fast. SMAP only hardens
#: the guest kernel against itself, which the threat model (guest root is
#: hostile) gives nothing to; programs cannot tell it is off.
TCG_CPU = "max,-erms,-smap"
#: Overrides :data:`TCG_CPU` (e.g. ``max`` for the CPU of before); part of every
#: template key (:func:`tcg_cpu` is in the boot identity).
TCG_CPU_ENV = "MICROSANDBOX_TCG_CPU"
_CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*")

AGENT_PORT_NAME = "msb.agent"
#: virtio-serial port of the raw host<->guest channel (``Sandbox.open_channel``).
CHANNEL_PORT_NAME = "msb.chan"
#: virtio-serial port of the network's stream path (``agent --stream``): a raw
#: port moves ~200 MB/s host -> guest under TCG, the agent channel ~30.
STREAM_PORT_NAME = "msb.stream"

#: Serial of the read-only host->guest transfer disk, backed by the sparse
#: file ``run_dir/xfer.img`` (:data:`XFER_DISK_BYTES`): the host writes a
#: payload into it, the agent copies it out with O_DIRECT (``FS_COPY``). A disk
#: rather than a 9p share: QEMU gives every 9p device a 1 MiB table up front.
XFER_SERIAL = "msb.xfer"
#: The stream port's socket in the run directory (the host listens, QEMU connects).
STREAM_SOCKET = "stream.sock"
XFER_IMAGE = "xfer.img"
#: The transfer disk's capacity (sparse: no blocks used until a transfer).
#: Fixed, since the guest reads a disk's capacity once, at boot.
XFER_DISK_BYTES = 1 << 40

#: Names the guest-visible device set of build_command; part of every
#: template key, so bump it whenever a device is added or changed.
DEVICE_SET = "serial+chan+stream,rng,xferblk:3,net:dgram"


def tcg_cpu() -> str:
    """The ``-cpu`` model of TCG guests: ``$MICROSANDBOX_TCG_CPU``, else :data:`TCG_CPU`.

    :raises BootError: the variable is not a QEMU CPU model with options.
    """
    value = os.environ.get(TCG_CPU_ENV) or TCG_CPU
    if not _CPU_MODEL.fullmatch(value):
        raise BootError(
            f"${TCG_CPU_ENV}={value!r} is not a QEMU CPU model (e.g. {TCG_CPU!r}): fix or unset it"
        )
    return value


def find_qemu() -> str:
    """Return the QEMU binary path.

    :raises BackendUnavailableError: QEMU is not installed.
    """
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise BackendUnavailableError(
            f"{QEMU_BINARY} not found on PATH: apt-get install qemu-system-x86 "
            "(or run the set-up command from README.md)"
        )
    return path


def build_command(
    spec: VMSpec, qemu: str = QEMU_BINARY, *, console_fd: int | None = None
) -> list[str]:
    """Return QEMU's argv for ``spec`` (pure: no I/O). With ``console_fd`` the
    serial console goes to that inherited descriptor (the launcher's bounded
    console keeper) instead of straight to ``spec.console_path``.
    """
    accel = "kvm" if spec.accel == "kvm" else f"tcg,tb-size={TCG_TB_SIZE_MIB}"
    cpu = "host" if spec.accel == "kvm" else (spec.cpu_model or tcg_cpu())
    agent_sock = spec.run_dir / "agent.sock"
    chan_sock = spec.run_dir / "chan.sock"
    stream_sock = spec.run_dir / STREAM_SOCKET
    machine = "microvm,acpi=on,rtc=on,x-option-roms=off"
    console = spec.console_path if console_fd is None else f"/proc/self/fd/{console_fd}"
    if spec.memory_file is not None:
        machine += ",memory-backend=mem"
    argv = [
        qemu,
        "-M", machine,
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
        "-chardev", f"file,id=console,path={console}",
        "-serial", "chardev:console",
        "-device", "virtio-serial-device,max_ports=4",
        "-chardev", f"socket,id=agent,path={agent_sock},server=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        # QEMU connects at start like the agent's: a guest reading a port whose
        # host side is closed gets EOF at once instead of blocking.
        "-chardev", f"socket,id=chan,path={chan_sock},server=off",
        "-device", f"virtserialport,chardev=chan,name={CHANNEL_PORT_NAME}",
        "-chardev", f"socket,id=stream,path={stream_sock},server=off",
        "-device", f"virtserialport,chardev=stream,name={STREAM_PORT_NAME}",
        "-device", "virtio-rng-device",
        # Bulk host->guest data: the agent's port moves ~30 MB/s that way under
        # TCG (its poll loop and pipes), this disk ~200 MB/s. Read-only: the guest
        # cannot write into the host file.
        "-drive", f"id=xfer,file={spec.run_dir / XFER_IMAGE},format=raw,if=none,readonly=on",
        "-device", f"virtio-blk-device,drive=xfer,serial={XFER_SERIAL}",
    ]  # fmt: skip
    for i, disk in enumerate(spec.disks):
        ro = "on" if disk.readonly else "off"
        argv += [
            "-drive",
            f"id=disk{i},file={disk.path},format={disk.format},if=none,readonly={ro},cache=unsafe",
            "-device",
            f"virtio-blk-device,drive=disk{i},serial={disk.serial}",
        ]
    if spec.memory_file is not None:
        share = "on" if spec.memory_shared else "off"
        argv += [
            "-object",
            f"memory-backend-file,id=mem,size={spec.memory_mib}M,"
            f"mem-path={spec.memory_file},share={share}",
        ]
    if spec.qmp:
        # QEMU connects to a socket the host already listens on: no start-up race.
        argv += ["-chardev", f"socket,id=qmp,path={spec.run_dir / 'qmp.sock'},server=off"]
        argv += ["-mon", "chardev=qmp,mode=control"]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    argv += list(spec.extra_args)
    argv += nic_args(spec.run_dir)
    return argv


def nic_args(run_dir: Path) -> list[str]:
    """The guest's one NIC, in every VM, last in the device order: its frames go
    to ``run_dir``'s :data:`~.network.HOST_SOCKET` as unix datagrams, where a
    sandbox with network on runs its shim (:class:`~.network.NetworkStack`).
    With network off nothing listens there and the guest keeps eth0 down. The
    backing is per VM, the device the same, so templates and clones match.
    """
    return [
        "-netdev",
        f"dgram,id=net0,local.type=unix,local.path={run_dir / QEMU_SOCKET},"
        f"remote.type=unix,remote.path={run_dir / HOST_SOCKET}",
        "-device",
        "virtio-net-device,netdev=net0",
    ]


class QemuVM(ProcessVMHandle):
    """A running QEMU process."""

    def __init__(
        self,
        spec: VMSpec,
        process: anyio.abc.Process,
        listener: anyio.abc.SocketListener,
        qmp_listener: socket.socket | None = None,
        chan_listener: anyio.abc.SocketListener | None = None,
        stream_listener: anyio.abc.SocketListener | None = None,
    ) -> None:
        super().__init__(spec, process, listener)
        self._qmp_listener = qmp_listener
        self._chan_listener = chan_listener
        self._chan_taken = False
        self._stream_listener = stream_listener

    async def connect_stream_port(self, timeout: float) -> anyio.abc.ByteStream:
        if self._stream_listener is None:
            raise SandboxNotRunningError(
                "the stream port of this VM was already opened (one connection per VM)"
            )
        listener, self._stream_listener = self._stream_listener, None
        try:
            with anyio.move_on_after(timeout):
                return await listener.accept()
        finally:
            await listener.aclose()
        raise BootError(f"QEMU did not connect the stream port within {timeout:g} s")

    async def connect_channel(self, timeout: float) -> anyio.abc.ByteStream:
        if self._chan_listener is None or self._chan_taken:
            raise SandboxNotRunningError(
                "the channel of this VM was already opened (one connection per VM)"
            )
        self._chan_taken = True
        listener = self._chan_listener
        with anyio.move_on_after(timeout):
            stream = await listener.accept()
            await listener.aclose()
            self._chan_listener = None
            return stream
        raise BootError(f"QEMU did not connect the channel port within {timeout:g} s")

    async def connect_agent(self, timeout: float) -> anyio.abc.ByteStream:
        stream: anyio.abc.ByteStream | None = None

        async def accept(tg: anyio.abc.TaskGroup) -> None:
            nonlocal stream
            stream = await self._listener.accept()
            tg.cancel_scope.cancel()

        async def watch(tg: anyio.abc.TaskGroup) -> None:
            await self._process.wait()
            tg.cancel_scope.cancel()

        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                tg.start_soon(accept, tg)
                tg.start_soon(watch, tg)
        await self._listener.aclose()
        if stream is not None:
            return stream
        if self._process.returncode is not None:
            raise GuestCrashedError(
                f"QEMU {describe_exit(self._process.returncode)} before the agent "
                f"connected; {self.stderr_tail()}",
                console_tail=self.console_tail(),
            )
        raise BootError(
            f"QEMU did not connect the agent port within {timeout:g} s",
            console_tail=self.console_tail(),
        )

    async def accept_qmp(self, timeout: float) -> socket.socket:
        """Return the connected QMP socket (``spec.qmp``); QEMU connects at start.

        :raises BootError: QEMU did not connect within ``timeout``.
        """
        if self._qmp_listener is None:
            raise RuntimeError("this VM was started without a QMP monitor")
        listener = self._qmp_listener
        with anyio.move_on_after(timeout):
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    await anyio.wait_readable(listener)
                    continue
                listener.close()
                self._qmp_listener = None
                conn.setblocking(False)
                return conn
        if self._process.returncode is not None:
            raise GuestCrashedError(
                f"QEMU {describe_exit(self._process.returncode)}; {self.stderr_tail()}"
            )
        raise BootError(f"QEMU did not connect its QMP monitor within {timeout:g} s")

    async def open_monitor(self, timeout: float) -> VMMonitor:
        """The QMP monitor (:class:`MonitoredVM`); the VM must have ``spec.qmp``."""
        from .qmp import Monitor  # qemu.qmp is imported only by what snapshots

        return await Monitor.open(self, timeout)

    def stderr_tail(self) -> str:
        """What QEMU printed on stderr (its last 1500 characters), for error messages."""
        try:
            text = (self.spec.run_dir / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"QEMU said: {text[-1500:]}" if text else "QEMU printed nothing"

    def _release(self) -> None:
        if self._stream_listener is not None:
            with contextlib.suppress(Exception):
                self._stream_listener.extra(anyio.abc.SocketAttribute.raw_socket).close()
            self._stream_listener = None
        if self._chan_listener is not None:
            # Sync close of the listening socket: kill() may run where awaiting is not safe.
            with contextlib.suppress(Exception):
                self._chan_listener.extra(anyio.abc.SocketAttribute.raw_socket).close()
            self._chan_listener = None
        if self._qmp_listener is not None:
            self._qmp_listener.close()
            self._qmp_listener = None


class QemuBackend(Backend):
    """Starts VMs with QEMU."""

    name = "qemu"

    def __init__(self, qemu: str | None = None) -> None:
        self._qemu = qemu

    async def start(self, spec: VMSpec) -> VMHandle:
        qemu = self._qemu or find_qemu()
        try:
            with open(spec.run_dir / XFER_IMAGE, "wb") as image:
                image.truncate(XFER_DISK_BYTES)  # sparse
        except OSError as exc:
            raise BackendUnavailableError(
                f"cannot create the transfer disk {spec.run_dir / XFER_IMAGE}: {exc.strerror}; "
                "its file system must allow sparse files of 1 TiB (set TMPDIR to one that does)"
            ) from exc
        listener = await anyio.create_unix_listener(spec.run_dir / "agent.sock")
        chan_listener = await anyio.create_unix_listener(spec.run_dir / "chan.sock")
        stream_listener = await anyio.create_unix_listener(spec.run_dir / STREAM_SOCKET)
        qmp_listener: socket.socket | None = None
        if spec.qmp:
            qmp_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            qmp_listener.setblocking(False)
            qmp_listener.bind(str(spec.run_dir / "qmp.sock"))
            qmp_listener.listen(1)
        # The launcher arms PR_SET_PDEATHSIG and a THP filter, then execs QEMU
        # (compiled on first use, hence the thread).
        prefix = await anyio.to_thread.run_sync(
            functools.partial(launch_prefix, console=spec.console_path)
        )
        console_fd = CONSOLE_FD if "--console" in prefix else None
        argv = [*prefix, *build_command(spec, qemu, console_fd=console_fd)]
        stderr = open(spec.run_dir / "qemu.stderr", "wb")  # noqa: SIM115 - handed to the child
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # Ctrl+C in a terminal reaches us, not QEMU
            )
        except OSError as exc:
            await listener.aclose()
            await chan_listener.aclose()
            await stream_listener.aclose()
            if qmp_listener is not None:
                qmp_listener.close()
            raise BackendUnavailableError(f"cannot start QEMU ({argv[0]}): {exc}") from exc
        finally:
            stderr.close()
        return QemuVM(spec, process, listener, qmp_listener, chan_listener, stream_listener)


def qemu_version(qemu: str | None = None) -> str:
    """Return QEMU's version line, e.g. ``QEMU emulator version 7.2.22``."""
    out = subprocess.run(
        [qemu or find_qemu(), "-version"], capture_output=True, text=True, check=False
    ).stdout
    return out.splitlines()[0].strip() if out else "unknown"
