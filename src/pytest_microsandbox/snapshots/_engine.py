"""Templates, restores, snapshots and forks of QEMU microVMs.

A template is a booted guest paused with its RAM in a file (``memory``,
mapped ``share=on``) and its device state in ``state`` (migrated with
``x-ignore-shared``, so RAM is not copied). A clone maps the same file
``share=off`` (MAP_PRIVATE: copy-on-write, the template is never written),
starts with ``-incoming defer`` and loads ``state``. Clones must use the
exact command line of the template, spare devices included, or the load fails.

A snapshot of a running clone cannot use x-ignore-shared (its RAM is a
private mapping), so the whole RAM is migrated once, over a socket, into a
helper QEMU whose RAM is a new shared file, and saved from there as an
ordinary template-shaped entry: forks of it are then as cheap as clones of a
template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc

from ..runtime._cache import GRACE_S
from ..runtime._envvars import env_number
from ..runtime._exceptions import (
    CommandNotFoundError,
    ConfigError,
    FilesystemError,
    SandboxError,
    SandboxNotRunningError,
    SnapshotError,
)
from ..runtime._keys import digest_parts
from ..runtime._locks import LOCK_TIMEOUT_ENV, hold, lock_timeout
from ..runtime.agent.client import AgentClient
from ..runtime.agent.protocol import (
    PROTOCOL_VERSION,
    Field,
    FrameDecoder,
    MsgType,
    Tag,
    bytes_field,
    encode_frame,
    int_field,
)
from ..runtime.backend import Backend, MonitoredVM, VMHandle, VMMonitor, VMSpec
from ..runtime.boot import BootPlan
from ..runtime.config import SandboxConfig, Volume
from ..runtime.lifetime import Runtime, current_runtime
from ..runtime.network import (
    NFT_PATHS,
    NetworkPolicy,
    Secret,
    guest_resolv_conf,
    network_used,
    nft_rehearsal,
    rehearsal_blob,
    stop_rehearsals,
    stream_path_enabled,
)
from ..runtime.paths import make_run_dir
from ..runtime.progress import Stage, stage
from ..runtime.provision import GuestSession, plan_for, start_agent_client
from ..runtime.qemu import tcg_cpu
from ..runtime.sandbox import Sandbox, exec_environment
from ..runtime.volumes import (
    bind_volumes,
    describe_mounted_volumes,
    image_disk_args,
    image_volume,
    volume_device_args,
)
from . import _store
from ._demand import CreateForecast, PoolDemand, pool_cap
from ._model import FORMAT_VERSION, DiskMeta, SnapshotMeta

__all__ = [
    "CACHE_BUDGET_ENV",
    "LOCK_TIMEOUT_ENV",
    "POOL_CLONE_MIB",
    "POOL_MAX_ENV",
    "POOL_MEMORY_ENV",
    "POOL_SIZE_ENV",
    "SnapshotService",
    "TemplateProvisioner",
    "auto_prune",
    "auto_snapshot_budget_bytes",
    "close_pools",
    "ensure_template",
    "expect_creates",
    "fork_sandbox",
    "prefill_pool",
    "restore_snapshot",
    "snapshot_sandbox",
    "template_key",
]

#: QEMU processes kept started in ``-incoming defer`` per template (0: none).
POOL_SIZE_ENV = "MICROSANDBOX_POOL_SIZE"
_DEFAULT_LOCK_TIMEOUT = 600.0
_DEFAULT_POOL_SIZE = 1
#: The deepest a pool grows while creates come back to back (see ``_demand.py``):
#: 24 clones take ~2 s of both cores to make under TCG (11-12 clones/s) and
#: ~720 MiB while they wait; given that head start (``prefill_pool``), a run of
#: 20 fast tests finds every clone ready (the old 8 served the first 8 only).
POOL_MAX_ENV = "MICROSANDBOX_POOL_MAX"
_DEFAULT_POOL_MAX = 24
#: Host memory, in MiB, the waiting clones of one pool may cost.
POOL_MEMORY_ENV = "MICROSANDBOX_POOL_MEMORY_MB"
_DEFAULT_POOL_MEMORY_MB = 1024
#: What one more idle warmed clone costs the host under TCG, rounded up: its
#: private memory (28.5-29.0 MiB measured, pools of 4-16 clones, 512 MiB guest)
#: and page tables (0.5 MiB). Its PSS is higher (31-38 MiB, falling as more
#: clones split the template's shared pages) and its RSS 72.6 MiB, but the
#: shared part is paid once per template, not per clone.
POOL_CLONE_MIB = 30
#: The most clones kept while creates are spaced out (``POOL_SIZE_ENV``).
_MAX_POOL_SIZE = 16
#: Seconds without a create after which a deepened pool shrinks to its base.
_POOL_IDLE_S = 5.0
#: Bumped when the clone device set below changes (it is part of the key).
_DEVICES_VERSION = f"spare-blk:{_store.SPARE_DISK_MIB},net:2"
_MIGRATE_TIMEOUT = 60.0
#: max-bandwidth (bytes/s) for a snapshot's local migration: no cap in practice.
_UNCAPPED = 1 << 40
#: The command a pooled clone runs ahead of use (:func:`_warm_up`). The template
#: build runs it too, so every clone finds it in the guest page cache: otherwise
#: each clone reads it from disk again, which under TCG means translating the
#: virtio-blk, erofs and overlayfs read paths (12% of its first exec's code).
_WARM_COMMAND = "true"

T = TypeVar("T")


# -- keys, specs, devices ---------------------------------------------------------------------


def template_key(plan: BootPlan, config: SandboxConfig) -> str:
    """Digest of everything that shapes a template's memory (BootPlan.identity plus
    the agent build, the clone device set, the store format and the QEMU version).
    """
    return digest_parts(
        plan.identity(config),
        plan.agent.name,
        _DEVICES_VERSION,
        f"9p*{config.volume_slot_count()}",
        str(FORMAT_VERSION),
        _store.current_qemu_version(),
        length=24,
    )


def _device_args(
    run_dir: Path, spare: Path, slots: int, volumes: tuple[Volume, ...] = ()
) -> tuple[str, ...]:
    """Spare devices a template and its clones carry, so a clone can be given an
    image, volumes or a network after restore: the host side is per clone, the
    guest-visible device (and so the migrated state) is the same. Bind
    ``volumes`` back the first of the ``slots`` spare 9p devices (msb.vol0...),
    an image volume the spare disk; the guest mounts them after restore.

    The 9p spares are only there when asked for: QEMU gives each 9p device a
    1 MiB inode-remapping table up front, ~1.2 MiB of host memory per clone.
    """
    images = [v.host_path for v in volumes if v.kind == "image" and v.host_path is not None]
    binds = [v for v in volumes if v.kind in ("bind", "named")]
    return (
        *image_disk_args("spare0", images[0] if images else spare),
        *volume_device_args(binds, run_dir, slots),
        # The NIC comes last, from the backend (qemu.nic_args).
    )  # fmt: skip


def _spec_from_meta(
    meta: SnapshotMeta,
    *,
    name: str,
    run_dir: Path,
    memory_file: Path,
    shared: bool,
    cache: Path | None,
    incoming: bool = True,
    volumes: tuple[Volume, ...] = (),
) -> VMSpec:
    from ..runtime.backend import DiskSpec

    return VMSpec(
        name=name,
        kernel=Path(meta.kernel),
        initrd=Path(meta.initrd),
        cmdline=meta.cmdline,
        cpus=meta.cpus,
        memory_mib=meta.memory_mib,
        accel=meta.accel,
        cpu_model=meta.cpu_model if meta.accel == "tcg" else None,
        run_dir=run_dir,
        disks=tuple(DiskSpec(d.serial, Path(d.path), format=d.format) for d in meta.disks),
        extra_args=_device_args(run_dir, _store.spare_disk(cache), meta.volume_slots, volumes),
        memory_file=memory_file,
        memory_shared=shared,
        qmp=True,
        incoming=incoming,
    )


def _env_float(name: str, default: float) -> float:
    """A count or size from the environment; :raises SnapshotError: not a finite number >= 0."""
    return env_number(name, default, SnapshotError)


def _pool_size() -> int:
    return max(0, min(_MAX_POOL_SIZE, int(_env_float(POOL_SIZE_ENV, _DEFAULT_POOL_SIZE))))


def _pool_cap(base: int) -> int:
    """The deepest a pool may grow under back-to-back creates (:func:`~._demand.pool_cap`):
    ``POOL_MAX_ENV``, within ``POOL_MEMORY_ENV`` at :data:`POOL_CLONE_MIB` per
    clone and within a share of the host's available memory split across the
    run's xdist workers (``PYTEST_XDIST_WORKER_COUNT``: each keeps a pool).
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    return pool_cap(
        base,
        int(_env_float(POOL_MAX_ENV, _DEFAULT_POOL_MAX)),
        _env_float(POOL_MEMORY_ENV, _DEFAULT_POOL_MEMORY_MB),
        POOL_CLONE_MIB,
        _mem_available_mib(),
        int(workers) if workers.isdigit() else 1,
    )


def _mem_available_mib() -> float | None:
    """The host's MemAvailable in MiB (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _prestart_concurrency() -> int:
    """Pre-starts run at once per pool: one per host core (they are CPU-bound
    under TCG), at least 1 and at most 4.
    """
    return max(1, min(4, os.cpu_count() or 1))


def _mkrun(name: str) -> Path:
    return make_run_dir(name)


def _tmp_entry(root: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".tmp-{name[:40]}-pid{os.getpid()}-", dir=root))


# -- templates --------------------------------------------------------------------------------


async def ensure_template(
    config: SandboxConfig, backend: Backend, plan: BootPlan, cache: Path | None = None
) -> _store.Entry:
    """Return the template for ``config``, building it once under a file lock.

    A broken, corrupt (a digest recorded at its build no longer matches) or
    foreign entry (sizes, metadata, QEMU version) is rebuilt.

    :raises SnapshotLockTimeoutError: another process held the build lock too long.
    :raises SnapshotError: the build failed (e.g. the disk is full).
    """
    key = template_key(plan, config)
    root = _store.templates_root(cache)
    final = root / key
    with contextlib.suppress(SnapshotError):
        return await _store.acheck_entry(final)
    timeout = lock_timeout(_DEFAULT_LOCK_TIMEOUT)
    async with hold(_store.entry_lock_path(final), f"template {key}", timeout):
        with contextlib.suppress(SnapshotError):
            return await _store.acheck_entry(final)  # another process built it meanwhile
        _store.clean_stale_temps(root)
        what = f"template {key[:12]} ({config.memory} MiB, {config.cpus} vCPU)"
        with stage("template", what) as progress:
            entry = await _build_template(config, backend, plan, key, final, cache, progress)
            progress.size = entry.memory.stat().st_blocks * 512  # sparse: blocks used
    auto_prune(cache, kind="template")
    return entry


#: Disk budget, in MiB, for automatically built entries (templates; the
#: plugin's zygotes have their own): every project edit makes a new template,
#: so the least recently used go beyond this. Named snapshots are never
#: pruned automatically. 2 GiB each (measured: a template takes ~120 MiB on
#: disk, a zygote ~175 MiB), so with the root layers' 4 GiB the whole cache
#: stays under ~8.5 GiB by default: a laptop's disk can spare it.
CACHE_BUDGET_ENV = "MICROSANDBOX_AUTO_SNAPSHOT_BUDGET_MB"
_DEFAULT_BUDGET_MB = 2048


#: Seconds after its last use during which an entry is never evicted by the
#: budget (another process may have just checked it exists and be about to
#: restore it: xdist workers, parallel jobs building one after another): the
#: cache-wide grace period, :data:`pytest_microsandbox.runtime._cache.GRACE_S`.
AUTO_PRUNE_GRACE_S = GRACE_S


def auto_snapshot_budget_bytes() -> int:
    """Bytes of the disk budget of templates, and separately of zygotes
    (``$MICROSANDBOX_AUTO_SNAPSHOT_BUDGET_MB``, in MiB).
    """
    return int(_env_float(CACHE_BUDGET_ENV, _DEFAULT_BUDGET_MB) * 1024 * 1024)


def auto_prune(cache: Path | None, *, kind: str, prefix: str | None = None) -> list[str]:
    """Evict the least recently used automatic entries beyond the disk budget."""
    budget = auto_snapshot_budget_bytes()
    try:
        return _store.prune(
            cache, max_bytes=budget, kind=kind, prefix=prefix, min_idle=AUTO_PRUNE_GRACE_S
        )
    except OSError:
        return []  # a concurrent prune got there first


async def _build_template(
    config: SandboxConfig,
    backend: Backend,
    plan: BootPlan,
    key: str,
    final: Path,
    cache: Path | None,
    progress: Stage | None = None,
) -> _store.Entry:
    def step(text: str) -> None:
        if progress is not None:
            progress.step(text)

    root = final.parent
    _store.check_free_space(root, (config.memory << 20) + (64 << 20))
    tmp = _tmp_entry(root, key)
    run_dir = _mkrun("template")
    slots = config.volume_slot_count()
    vm: VMHandle | None = None
    try:
        spec = plan.vm_spec(config.model_copy(update={"name": f"template-{key[:12]}"}), run_dir)
        spec = VMSpec(
            **{
                **spec.__dict__,
                "extra_args": (
                    *spec.extra_args,
                    *_device_args(run_dir, _store.spare_disk(cache), slots),
                ),
                "memory_file": tmp / _store.MEMORY,
                "memory_shared": True,
                "qmp": True,
            }
        )
        step("booting the VM")
        vm = await backend.start(spec)
        try:
            monitor = await _open_monitor(vm, backend, config.boot_timeout)
            try:
                stream = await vm.connect_agent(config.boot_timeout)
                async with AgentClient(stream) as agent:
                    await agent.wait_ready(timeout=config.boot_timeout)
                    step("warming the guest up")
                    # Warm the guest page cache (it is in the template's RAM) and make
                    # sure the agent is idle with no I/O in flight.
                    for argv in (["/bin/sh", "-c", "true"], [_WARM_COMMAND], ["sync"]):
                        with contextlib.suppress(CommandNotFoundError):
                            await agent.exec(argv, timeout=60)
                    step("saving its state")
                    await monitor.execute("stop")
                    await monitor.set_ignore_shared(True)
                    await monitor.save(tmp / _store.STATE, _MIGRATE_TIMEOUT)
            finally:
                await monitor.close()
        finally:
            await vm.kill()
        meta = SnapshotMeta(
            kind="template",
            name=key,
            template=key,
            created=time.time(),
            qemu_version=_store.current_qemu_version(),
            accel=plan.accel,
            cpus=config.cpus,
            memory_mib=config.memory,
            kernel=str(plan.kernel.vmlinux),
            kernel_size=plan.kernel.vmlinux.stat().st_size,
            initrd=str(plan.initrd),
            initrd_size=plan.initrd.stat().st_size,
            cmdline=plan.cmdline,
            cpu_model=(spec.cpu_model or tcg_cpu()) if plan.accel == "tcg" else "host",
            disks=tuple(
                DiskMeta(
                    serial=d.serial, path=str(d.path), size=d.path.stat().st_size, format=d.format
                )
                for d in spec.disks
            ),
            volume_slots=slots,
            state_size=(tmp / _store.STATE).stat().st_size,
            # Volumes are per clone: the template never mounts any.
            config=config.model_copy(update={"volumes": {}}).to_json(),
        )
        _check_sizes(tmp, meta)
        _store.write_meta(tmp, meta)
        step("recording digests")
        await anyio.to_thread.run_sync(_store.publish, tmp, final)  # hashes the memory file
        return _store.check_entry(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _store.disk_error(exc, root, vm.returncode if vm is not None else None)
        if full is not None:
            raise full from exc
        if isinstance(exc, SandboxError) and not isinstance(exc, SnapshotError):
            raise SnapshotError(f"building template {key} failed: {exc}") from exc
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _check_sizes(tmp: Path, meta: SnapshotMeta) -> None:
    if meta.state_size == 0:
        raise SnapshotError("QEMU wrote an empty state file (is the disk full?)")
    if (tmp / _store.MEMORY).stat().st_size != meta.memory_mib << 20:
        raise SnapshotError("the memory file has the wrong size (is the disk full?)")


# -- restore ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Incoming:
    """A QEMU started with ``-incoming defer`` for one entry: monitor negotiated,
    agent port accepted; only the state load and ``cont`` are left.
    """

    entry: _store.Entry
    backend: Backend
    vm: VMHandle
    monitor: VMMonitor
    stream: anyio.abc.ByteStream
    stack: AsyncExitStack
    loop: asyncio.AbstractEventLoop | None = field(default=None)
    #: Already restored, running, and warmed up by :func:`_warm_up`.
    warmed: bool = False

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()
            await self.stack.aclose()


async def _start_incoming(
    entry: _store.Entry,
    backend: Backend,
    name: str,
    timeout: float,
    cache: Path | None,
    volumes: tuple[Volume, ...] = (),
) -> _Incoming:
    stack = AsyncExitStack()
    run_dir = _mkrun(name)
    stack.callback(shutil.rmtree, run_dir, True)
    try:
        spec = _spec_from_meta(
            entry.meta, name=name, run_dir=run_dir, memory_file=entry.memory, shared=False,
            cache=cache, volumes=volumes,
        )  # fmt: skip
        vm = await backend.start(spec)
        stack.push_async_callback(vm.kill)
        stack.callback((await current_runtime()).track(vm))
        monitor = await _open_monitor(vm, backend, timeout)
        stack.push_async_callback(monitor.close)
        await monitor.set_ignore_shared(True)
        await monitor.disable_self_announce()
        stream = await vm.connect_agent(timeout)
        return _Incoming(entry, backend, vm, monitor, stream, stack)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise


async def _finish_restore(
    inc: _Incoming, config: SandboxConfig, plan: BootPlan | None
) -> GuestSession:
    stack = inc.stack
    try:
        if not inc.warmed:
            await inc.monitor.load(inc.entry.state, _MIGRATE_TIMEOUT)
            await inc.monitor.execute("cont")
        agent = await start_agent_client(stack, inc.stream)
        # The guest agent is the template's, mid-loop: it sends no READY, so HELLO
        # confirms it serves (and speaks our protocol version).
        await agent.hello(timeout=config.boot_timeout)
        _store.touch(inc.entry.path)
        # Sandbox.from_session then gives it a fresh clock, RNG seed and hostname.
        return GuestSession(
            inc.vm, agent, stack, inc.backend, plan, monitor=inc.monitor, origin=inc.entry
        )
    except BaseException:
        await inc.stream.aclose()
        await stack.aclose()
        raise


async def _open_monitor(vm: VMHandle, backend: Backend, timeout: float) -> VMMonitor:
    if not isinstance(vm, MonitoredVM):
        await vm.kill()
        raise SnapshotError(
            f"the {backend.name} backend has no VM monitor: templates, snapshots and "
            "forks need one (use the QEMU backend, or cold_boot=True)"
        )
    return await vm.open_monitor(timeout)


#: The hostname a pooled clone is configured with while it waits (each create
#: then gives it the sandbox's own).
_POOL_HOSTNAME = "msb-pooled"


async def _warm_up(inc: _Incoming, timeout: float = 30.0, command: bool = True) -> None:
    """Restore a pooled clone ahead of use, configure it once and (``command``)
    run one command in it.

    A restored TCG clone starts with an empty translation cache, so the first
    time it runs any code path costs translation: ~100 ms for the first
    command (agent, kernel exec path, ld.so, libc), 30-70 ms for the first
    CONFIGURE (the clock, the RNG reseed's crypto, a write and rename in the
    overlay). Paying both while the clone waits in the pool leaves a create
    with the same steps on translated code (a placeholder hostname, clock and
    extra seed now; the sandbox's own at create, so nothing of these leaks
    into it). The command runs with the environment and working directory of
    the entry's configuration, as a sandbox's first exec would (its PATH
    search is part of the path to warm). Plain frames, not AgentClient: the
    client's task group must live in the task that will own the sandbox.
    """
    await inc.monitor.load(inc.entry.state, _MIGRATE_TIMEOUT)
    await inc.monitor.execute("cont")
    config = SandboxConfig.from_json(inc.entry.meta.config)
    configure = [
        int_field(Tag.TIME_NS, time.time_ns()),
        bytes_field(Tag.SEED, os.urandom(64)),
        bytes_field(Tag.HOSTNAME, _POOL_HOSTNAME),
    ]
    exec_fields = [
        bytes_field(Tag.ARG, _WARM_COMMAND),
        *(bytes_field(Tag.ENV, f"{k}={v}") for k, v in exec_environment(config).items()),
        bytes_field(Tag.CWD, config.workdir),
    ]
    decoder = FrameDecoder()
    next_id = 0

    async def call(type_: MsgType, fields: list[Field], final: set[MsgType]) -> MsgType:
        """Send one request and wait for its final frame (or ERROR); its type."""
        nonlocal next_id
        next_id += 1
        await inc.stream.send(encode_frame(next_id, type_, fields))
        while True:
            for frame in decoder.feed(await inc.stream.receive()):
                if frame.id == next_id and frame.type in final | {MsgType.ERROR}:
                    return MsgType(frame.type)

    with anyio.fail_after(timeout):
        await call(MsgType.HELLO, [int_field(Tag.VERSION, PROTOCOL_VERSION)], {MsgType.OK})
        await call(MsgType.CONFIGURE, configure, {MsgType.OK})
        if command:
            await call(MsgType.EXEC, exec_fields, {MsgType.EXITED})
        if network_used():
            # Once this process has used a network: rehearse NET with a throwaway
            # identity the agent undoes: a create's NET then runs on translated code.
            net = [
                bytes_field(Tag.NET, rehearsal_blob()),
                bytes_field(Tag.DATA, guest_resolv_conf()),
            ]
            if await call(MsgType.NET, net, {MsgType.OK}) == MsgType.ERROR:
                # Half a rehearsal may leave a route: not a clone to hand out;
                # and no more rehearsals, or none would be.
                stop_rehearsals()
                raise RuntimeError("the pooled clone's NET rehearsal failed")
            if stream_path_enabled():
                # And the stream path's nft run (nothing committed): the
                # sandbox's own then runs translated beside its first command.
                # No nft in the image: ERROR (not found), the next path.
                for nft in NFT_PATHS:
                    argv = [bytes_field(Tag.ARG, a) for a in (nft, nft_rehearsal())]
                    rehearse = [*argv, bytes_field(Tag.CWD, "/"), bytes_field(Tag.USER, "0")]
                    if await call(MsgType.EXEC, rehearse, {MsgType.EXITED}) == MsgType.EXITED:
                        break
    inc.warmed = True


async def _restore_session(
    entry: _store.Entry,
    config: SandboxConfig,
    backend: Backend,
    plan: BootPlan | None,
    cache: Path | None,
    pooled: bool,
    warm_command: bool = True,
) -> GuestSession:
    volumes = tuple(config.volumes.values())
    # A pooled QEMU was started with empty spare 9p devices and a 9p device's host
    # directory is fixed at QEMU start: a clone with volumes starts its own QEMU.
    pool = await _pool_for(entry, backend, cache, warm_command) if pooled and not volumes else None
    inc = await pool.acquire() if pool is not None else None
    if inc is None:
        inc = await _start_incoming(
            entry, backend, config.name, config.boot_timeout, cache, volumes
        )
    return await _finish_restore(inc, config, plan)


async def _restore_entry(
    entry: _store.Entry,
    config: SandboxConfig,
    backend: Backend,
    plan: BootPlan | None,
    cache: Path | None,
    pooled: bool,
    warm_command: bool = True,
    secret_placeholders: Mapping[str, str] | None = None,
) -> Sandbox:
    session = await _restore_session(entry, config, backend, plan, cache, pooled, warm_command)
    captured = SandboxConfig.from_json(entry.meta.config).network is not None
    return await Sandbox.from_session(
        config, session, secret_placeholders=secret_placeholders, captured_network=captured
    )


class TemplateProvisioner:
    """``Sandbox.create``'s default path: a copy-on-write clone of the template of
    the configuration, built once (:func:`ensure_template`).
    """

    async def provision(self, config: SandboxConfig, backend: Backend) -> GuestSession:
        plan = await plan_for(config, backend)
        cache = config.cache_dir
        entry = await ensure_template(config, backend, plan, cache)
        try:
            return await _restore_session(entry, config, backend, plan, cache, pooled=True)
        except (SnapshotError, ConfigError, FilesystemError):
            raise  # a bad volume (gone, or its guest mount refused) is not a restore failure
        except SandboxError as exc:
            raise SnapshotError(
                f"restoring a clone of template {entry.meta.name} failed: {exc}"
            ) from exc


class SnapshotService:
    """Named snapshots and forks (:class:`~pytest_microsandbox.runtime.provision.Snapshotter`)."""

    async def restore(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        name: str | None,
        volumes: Mapping[str, Volume | str | os.PathLike[str]] | None,
        network: NetworkPolicy | str | None = None,
        disable_network: bool = False,
        secrets: Sequence[Secret] | None = None,
    ) -> Sandbox:
        return await restore_snapshot(
            name_or_path,
            name=name,
            volumes=volumes,
            network=network,
            disable_network=disable_network,
            secrets=secrets,
        )

    async def snapshot(self, sandbox: Sandbox, name: str) -> Path:
        return (await snapshot_sandbox(sandbox, name)).path

    async def fork(self, sandbox: Sandbox, name: str | None) -> Sandbox:
        return (await fork_sandbox(sandbox, name))[0]

    async def remove(self, name: str, cache: Path | None) -> None:
        await anyio.to_thread.run_sync(_store.remove_snapshot, name, cache)


async def restore_snapshot(
    name_or_path: str | os.PathLike[str],
    backend: Backend | None = None,
    *,
    name: str | None = None,
    cache: Path | None = None,
    volumes: Mapping[str, Volume | str | os.PathLike[str]] | None = None,
    warm_command: bool = True,
    pooled: bool = True,
    network: NetworkPolicy | str | None = None,
    disable_network: bool = False,
    secrets: Sequence[Secret] | None = None,
) -> Sandbox:
    """Start a sandbox from a named snapshot (or a snapshot/template directory).

    A snapshot carries no volumes (it cannot be taken while one is mounted);
    ``volumes`` binds host directories in the restored sandbox, mounted after
    the restore as with :attr:`SandboxConfig.volumes`.

    Pooled clones run one command ahead of use, which pays the code translation
    of the exec path under TCG; ``warm_command=False`` skips it for callers that
    talk to a process already running in the snapshot (the plugin's zygotes),
    where it would only cost CPU. ``pooled=False`` starts a QEMU of its own and
    leaves the snapshot's pool alone, for a caller that restores a snapshot
    once and keeps the sandbox (a pooled clone nobody takes costs a restore's
    CPU and ~32 MiB of memory).

    ``network`` (a policy or its name) replaces the captured configuration's,
    ``disable_network`` drops it: a snapshot carries no network of its own, each
    restore gets a fresh one (new key, MAC and address).

    ``secrets``: a snapshot keeps its secrets' placeholders, never their
    values; a restore with network passes each of them again (by ``env_var``)
    and the guest's placeholders keep working. More secrets may be added.

    :raises SnapshotNotFoundError: there is no such snapshot.
    :raises SnapshotError: it is broken or the restore failed.
    :raises ConfigError: a volume is invalid, a secret of the capture is missing.
    """
    raw = os.fspath(name_or_path)
    if os.sep in raw or isinstance(name_or_path, os.PathLike):
        entry = await _store.acheck_entry(Path(raw))
    else:
        entry = await _store.acheck_entry(_store.named_root(cache) / _store.check_name(raw))
    if backend is None:
        from ..runtime.qemu import QemuBackend

        backend = QemuBackend()
    config = SandboxConfig.from_json(entry.meta.config)
    if name is not None:
        config = config.model_copy(update={"name": name})
    placeholders = entry.meta.secret_placeholders
    if disable_network:
        config = config.model_copy(update={"network": None})
        placeholders = {}
    elif network is not None:
        config = SandboxConfig(**{**config.model_dump(), "network": network})
    if placeholders:
        _check_secrets_passed(entry.meta.name, placeholders, secrets or ())
    if secrets:
        config = SandboxConfig(**{**config.model_dump(), "secrets": tuple(secrets)})
    if volumes:
        # volume_slots of the capture's config is not the user's to raise: checked below.
        config = SandboxConfig(
            **{**config.model_dump(), "volumes": dict(volumes), "volume_slots": None}
        )
        binds = len(bind_volumes(config.volumes))
        slots = entry.meta.volume_slots
        if binds > slots:
            have = f"{slots} volume slot{'' if slots == 1 else 's'}"
            asked = f"{binds} bind volume{'' if binds == 1 else 's'}"
            raise ConfigError(
                f"snapshot {entry.meta.name!r} has {have} and {asked} were asked for: a "
                "restore binds volumes into the spare 9p devices its capture had. "
                "Capture a sandbox created with "
                f"SandboxConfig(volume_slots={binds}) (and no volumes mounted) to restore "
                "it with bind volumes"
            )
        config = config.model_copy(update={"volume_slots": slots})
    return await _restore_entry(
        entry, config, backend, None, cache, pooled=pooled, warm_command=warm_command,
        secret_placeholders=placeholders,
    )  # fmt: skip


# -- snapshot and fork of a running sandbox ---------------------------------------------------


async def _check_no_mounted_volumes(sandbox: Sandbox) -> None:
    try:
        agent = sandbox.session.agent
        mounts = (await agent.read_file("/proc/self/mounts", timeout=10)).decode()
    except SandboxError:
        return  # nothing we can check; QEMU itself refuses a migration with a mounted 9p
    shares = describe_mounted_volumes(mounts, sandbox.config.volumes)
    if shares:
        image = image_volume(sandbox.config.volumes)
        where = " ".join(
            line.split()[1]
            for line in mounts.splitlines()
            if line.split()[2:3] == ["9p"]
            or (image is not None and line.split()[1:2] == [image[0]])
        )
        raise SnapshotError(
            f"cannot snapshot or fork sandbox {sandbox.name!r}: {'; '.join(shares)} "
            f"{'is' if len(shares) == 1 else 'are'} mounted, and QEMU cannot migrate a "
            "guest with a mounted 9p share (nor could a restore reattach a clone's image "
            "volume). Snapshot or fork a sandbox created without volumes= but with "
            "volume_slots=N (then bind volumes in the restored one: "
            "Sandbox.restore(name, volumes=...)), or unmount them in the guest first "
            f"(umount {where})"
        )


async def snapshot_sandbox(sandbox: Sandbox, name: str, cache: Path | None = None) -> _store.Entry:
    """Capture a running sandbox (RAM, devices, its in-RAM overlay) as snapshot ``name``.

    The sandbox pauses for the capture and then runs on. An existing snapshot of
    that name is replaced.

    :raises SnapshotError: the sandbox was cold-booted, has a 9p share mounted,
        the disk is full, or QEMU failed.
    """
    _store.check_name(name)
    session = sandbox.session
    monitor, origin = session.monitor, session.origin
    if monitor is None or not isinstance(origin, _store.Entry):
        raise SnapshotError(
            f"sandbox {sandbox.name!r} was cold-booted (cold_boot=True) and has no QMP "
            "monitor: only sandboxes created from a template can be snapshotted"
        )
    if not sandbox.running:
        raise SandboxNotRunningError(f"sandbox {sandbox.name!r} is not running")
    await _check_no_mounted_volumes(sandbox)
    cache = cache if cache is not None else sandbox.config.cache_dir
    root = _store.named_root(cache)
    _store.clean_stale_temps(root)
    meta0 = origin.meta
    # The guest's page cache came from the files its origin booted from: record
    # those digests, not those of files rebuilt since (when they still differ,
    # the restore refuses the snapshot by name rather than mix the two).
    inputs = _store.recorded_inputs(origin.path)
    # The new memory file: at most the guest's RAM.
    _store.check_free_space(root, (meta0.memory_mib << 20) + (64 << 20))
    tmp = _tmp_entry(root, name)
    helper_vm: VMHandle | None = None
    try:
        async with _helper(meta0, tmp, cache, session.backend) as helper:
            helper_vm = helper.vm
            # Streamed straight into the helper, which loads while this VM sends:
            # ~1.6 s instead of ~2.5-3.2 s through a file (512 MiB guest, measured).
            stream = helper.vm.spec.run_dir / "migrate.sock"
            await helper.monitor.execute("migrate-incoming", {"uri": f"unix:{stream}"})
            await monitor.execute("stop")
            try:
                # A clone's RAM is a private mapping: it is migrated whole, and
                # QEMU caps a migration at 128 MiB/s unless told otherwise.
                await monitor.set_ignore_shared(False)
                await monitor.execute("migrate-set-parameters", {"max-bandwidth": _UNCAPPED})
                await monitor.execute("migrate", {"uri": f"unix:{stream}"})
                await monitor.wait_migration(_MIGRATE_TIMEOUT)
            finally:
                with contextlib.suppress(SnapshotError):
                    await monitor.set_ignore_shared(True)
                await monitor.execute("cont")
            await helper.monitor.wait_migration(_MIGRATE_TIMEOUT)
            await helper.monitor.set_ignore_shared(True)
            await helper.monitor.save(tmp / _store.STATE, _MIGRATE_TIMEOUT)
        meta = meta0.model_copy(
            update={
                "kind": "snapshot",
                "name": name,
                "created": time.time(),
                "state_size": (tmp / _store.STATE).stat().st_size,
                # No volume is mounted in the capture (checked above): restores bind
                # their own with Sandbox.restore(name, volumes=...).
                "config": sandbox.config.model_copy(update={"volumes": {}}).to_json(),
                "secret_placeholders": _placeholders(sandbox),
            }
        )
        _check_sizes(tmp, meta)
        _store.write_meta(tmp, meta)
        await anyio.to_thread.run_sync(_store.publish, tmp, root / name, inputs)  # hashes memory
        return _store.check_entry(root / name)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        status = helper_vm.returncode if helper_vm is not None else None
        full_disk = _store.disk_error(exc, root, status)
        if full_disk is not None:
            raise full_disk from exc
        raise


@dataclass
class _Helper:
    vm: VMHandle
    monitor: VMMonitor


@contextlib.asynccontextmanager
async def _helper(
    meta: SnapshotMeta, out: Path, cache: Path | None, backend: Backend
) -> AsyncGenerator[_Helper, None]:
    """A paused VM with ``meta``'s devices, waiting for a migration, whose RAM is
    the new shared file ``out/memory``: what a snapshot's state is saved from.
    """
    run_dir = _mkrun("materialize")
    try:
        spec = _spec_from_meta(
            meta, name="materialize", run_dir=run_dir, memory_file=out / _store.MEMORY,
            shared=True, cache=cache,
        )  # fmt: skip
        vm = await backend.start(spec)
        try:
            monitor = await _open_monitor(vm, backend, 30)
            try:
                yield _Helper(vm, monitor)
            finally:
                await monitor.close()
        finally:
            await vm.kill()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _placeholders(sandbox: Sandbox) -> dict[str, str]:
    """The secret placeholders ``sandbox``'s guest holds (env var -> placeholder)."""
    if sandbox.config.network is None or sandbox.network.secrets is None:
        return {}
    return sandbox.network.secrets.env()


def _check_secrets_passed(
    snapshot: str, placeholders: Mapping[str, str], secrets: Sequence[Secret]
) -> None:
    """A snapshot whose guest holds placeholders is restored with their secrets:
    else they would reach their hosts unsubstituted (requests failing for no
    visible reason) while a test believes it has its credentials.
    """
    missing = sorted(set(placeholders) - {s.env_var for s in secrets})
    if missing:
        names = ", ".join(missing)
        raise ConfigError(
            f"snapshot {snapshot!r} was captured with secret(s) {names}, whose values "
            "are never stored: pass them again, Sandbox.restore(name, secrets=["
            f"Secret.env({missing[0]!r}, value=..., allow_hosts=[...])]) (the guest's "
            "placeholders keep working), or restore with disable_network=True"
        )


async def fork_sandbox(
    sandbox: Sandbox, name: str | None = None, *, count: int = 1
) -> list[Sandbox]:
    """Capture ``sandbox`` and start ``count`` children from the capture.

    With a ``name`` the capture is kept as a named snapshot (restore more children
    later with ``Sandbox.restore(name)``); without one it is deleted once the
    children run (they keep their copy-on-write mapping of it).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    keep = name is not None
    snap = name or f"fork-{sandbox.name[:40]}-{os.getpid()}-{time.monotonic_ns()}"
    entry = await snapshot_sandbox(sandbox, snap)
    children: list[Sandbox] = []
    try:
        for i in range(count):
            child_name = (
                f"{sandbox.name[:50]}-fork{i}" if count > 1 else f"{sandbox.name[:56]}-fork"
            )
            # Children get no volumes: none was mounted in the capture.
            config = sandbox.config.model_copy(update={"name": child_name, "volumes": {}})
            children.append(
                await _restore_entry(entry, config, sandbox.session.backend, None,
                                     sandbox.config.cache_dir, pooled=False,
                                     secret_placeholders=entry.meta.secret_placeholders)
            )  # fmt: skip
    except BaseException:
        # Each child holds an agent task group: unwind them in reverse (LIFO) order.
        for child in reversed(children):
            await child.kill()
        raise
    finally:
        if not keep:
            _store.remove_snapshot(snap, sandbox.config.cache_dir)
    return children


# -- pre-started pool -------------------------------------------------------------------------


class _Pool:
    """Pre-started VMs waiting for one entry, restored and warmed up: a resource
    of the runtime (``runtime/lifetime.py``) whose task group runs its pre-starts.

    The depth follows the demand (:class:`~._demand.PoolDemand`): ``base`` clones
    while creates are spaced out, up to ``cap`` while they come back to back,
    back to ``base`` once they stop. At most ``concurrency`` pre-starts run at
    once (each is mostly CPU: more would only slow the creates they serve). A
    create that finds the pool empty while pre-starts are in flight waits for
    the next one instead of starting a QEMU of its own, which would arrive
    later and compete with them for the same cores.
    """

    def __init__(
        self,
        runtime: Runtime,
        entry: _store.Entry,
        backend: Backend,
        cache: Path | None,
        demand: PoolDemand,
        warm_command: bool = True,
        concurrency: int = 2,
    ) -> None:
        self.entry = entry
        self._runtime = runtime
        self._backend = backend
        self._cache = cache
        self.demand = demand
        self._warm_command = warm_command
        self._concurrency = max(1, concurrency)
        self._ready: deque[_Incoming] = deque()
        self._starting = 0
        self._waiters = 0
        self._changed = anyio.Event()  # set (and replaced) when a pre-start ends
        self._busy = 0  # pre-starts and discards in flight
        self._idle = anyio.Event()
        self._idle.set()
        self._closed = False
        self._trimmer: anyio.CancelScope | None = None

    @property
    def depth(self) -> int:
        """Clones waiting plus clones being started."""
        return len(self._ready) + self._starting

    def close_now(self) -> None:
        """Kill the pooled VMs without awaiting (the event loop is gone)."""
        self._closed = True
        if self._trimmer is not None:
            self._trimmer.cancel()
        while self._ready:
            self._ready.popleft().vm.kill_now()

    def take(self) -> _Incoming | None:
        while self._ready:
            inc = self._ready.popleft()
            if inc.vm.returncode is None:
                return inc
            self._background(inc.discard)
        return None

    async def acquire(self) -> _Incoming | None:
        """A warmed clone: one waiting, else the next pre-start in flight to
        finish; None when neither is there (the caller starts its own).
        """
        self.demand.note_take(time.monotonic())
        self.refill()
        while not self._closed:
            inc = self.take()
            if inc is not None:
                self.refill()
                return inc
            if self._starting <= self._waiters:
                break
            self._waiters += 1
            try:
                await self._changed.wait()
            finally:
                self._waiters -= 1
        self.refill()
        return None

    def prefill(self) -> None:
        """Start filling to the forecast now, before the first create takes a clone."""
        self.demand.note_prefill(time.monotonic())
        self.refill()

    def refill(self) -> None:
        if self._closed:
            return
        want = self.demand.target(time.monotonic())
        while self.depth < want and self._starting < self._concurrency:
            self._background(self._start_one)
            self._starting += 1
        if want > self.demand.base and self._trimmer is None:
            self._trimmer = anyio.CancelScope()
            self._runtime.spawn(self._trim_when_idle, self._trimmer)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _background(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the runtime's task group, counted until it ends.

        :raises RuntimeError: the runtime is closed (nothing is counted then:
            a count nobody ends would keep :meth:`aclose` waiting forever).
        """

        async def run() -> None:
            try:
                await fn()
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()

        self._runtime.spawn(run)  # run starts at the next checkpoint, after the count
        self._busy += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    async def _start_one(self) -> None:
        began = time.monotonic()
        inc: _Incoming | None = None
        try:
            try:
                inc = await _start_incoming(self.entry, self._backend, "pooled", 60, self._cache)
                await _warm_up(inc, command=self._warm_command)
            except Exception:
                if inc is not None:
                    await inc.discard()
                inc = None
            else:
                self.demand.note_prestart(time.monotonic() - began)
        finally:
            self._starting -= 1
        if inc is not None and self._closed:
            await inc.discard()
        elif inc is not None:
            self._ready.append(inc)
        self._notify()
        if inc is not None:
            self.refill()  # the next one, if the demand still asks for it

    async def _trim_when_idle(self, scope: anyio.CancelScope) -> None:
        """Once creates stop, discard the clones beyond the base depth (each
        costs ~30 MiB of host memory while it waits).
        """
        with scope:
            while not self._closed:
                await anyio.sleep(self.demand.idle_s / 2)
                if not self.demand.idle(time.monotonic()):
                    continue
                while len(self._ready) > self.demand.base:
                    await self._ready.pop().discard()
                break
        self._trimmer = None

    async def aclose(self) -> None:
        self._closed = True
        if self._trimmer is not None:
            self._trimmer.cancel()
        self._notify()
        # In-flight pre-starts are awaited, not cancelled (they take tens of ms, and
        # cancelling qemu.qmp mid-handshake logs errors); they discard themselves.
        await self._idle.wait()
        while self._ready:
            await self._ready.popleft().discard()


_POOL = "snapshot-pool"
#: Creates expected soon in this process (process state, like the default
#: runtimes: the plugin says it from the tests' thread, the pools of every
#: runtime read it).
_FORECAST = CreateForecast()


def expect_creates(count: int) -> None:
    """Say that about ``count`` sandbox creates will come back to back (the
    plugin: the collected tests using the ``sandbox`` fixture), so the pool of
    pre-started clones fills to that depth (within ``POOL_MAX_ENV`` and
    ``POOL_MEMORY_ENV``) from the first create instead of deepening only once
    the rate shows. A hint: wrong counts cost memory or speed, never
    correctness; 0 clears it.

    :raises ValueError: ``count`` is negative.
    """
    _FORECAST.expect(count)


async def prefill_pool(config: SandboxConfig, count: int, backend: Backend | None = None) -> None:
    """Announce ``count`` creates of ``config`` (:func:`expect_creates`) and start
    filling its template's pool now, in the background of the current runtime:
    for a caller that knows a run of creates is coming before the first (the
    plugin, once the tests are collected). Builds or checks the template first,
    so this takes as long as a first create's template step; the clones then
    come while the caller does other work. Clones nobody takes within the
    pool's idle time are discarded. No-op for volumes (their clones are never
    pooled), ``cold_boot`` or a pool size of 0.

    :raises ValueError: ``count`` is negative.
    :raises SnapshotError: the template could not be built.
    """
    expect_creates(count)
    if count == 0 or config.cold_boot or config.volumes:
        return
    if backend is None:
        from ..runtime.qemu import QemuBackend

        backend = QemuBackend()
    plan = await plan_for(config, backend)
    entry = await ensure_template(config, backend, plan, config.cache_dir)
    pool = await _pool_for(entry, backend, config.cache_dir)
    if pool is not None:
        pool.prefill()


async def _pool_for(
    entry: _store.Entry, backend: Backend, cache: Path | None, warm_command: bool = True
) -> _Pool | None:
    base = _pool_size()
    if base == 0:
        return None
    runtime = await current_runtime()
    key = (_POOL, str(entry.path))

    def make() -> _Pool:
        demand = PoolDemand(base, _pool_cap(base), _POOL_IDLE_S, _FORECAST)
        return _Pool(runtime, entry, backend, cache, demand, warm_command, _prestart_concurrency())

    pool = runtime.resource(key, make)
    if pool.entry.meta.created != entry.meta.created:
        # The entry was rebuilt (found corrupt, or replaced) since the pool
        # started: its VMs map the old files.
        runtime.drop_resource(key)
        runtime.spawn(pool.aclose)
        pool = runtime.resource(key, make)
    return pool


async def close_pools() -> None:
    """Kill every pre-started VM of the current runtime (by default: this event
    loop's), waiting for pre-starts in flight.
    """
    await (await current_runtime()).close_resources(_POOL)
