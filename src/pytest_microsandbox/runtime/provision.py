"""How a :class:`~.sandbox.Sandbox` gets a running guest: provisioners.

A :class:`Provisioner` hands the sandbox a :class:`GuestSession`: a started VM
whose agent serves. The runtime has one of its own, :class:`ColdBoot` (boot the
kernel, wait for the agent's READY). Restoring copy-on-write clones of
templates, named snapshots and forks live one layer up, in
``pytest_microsandbox.snapshots``, which the runtime does not import: that
package implements :class:`Provisioner` and :class:`Snapshotter`, and
``pytest_microsandbox/__init__.py`` (above both layers) installs them with
:func:`install_extensions` when the package is first imported (the registry
is ``pytest_microsandbox/_extensions.py``, a leaf module). A runtime used
without them cold-boots every sandbox and has no snapshots.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import anyio.abc

from .._extensions import extensions, install_extensions
from ._exceptions import (
    ConfigError,
    GuestCrashedError,
    GuestTimeoutError,
    ProtocolError,
    SandboxError,
    SandboxNotRunningError,
)
from .agent.client import AgentClient
from .backend import Backend, VMHandle, VMMonitor, VMSpec, describe_exit
from .boot import BootPlan, prepare_boot, resolve_accel
from .config import SandboxConfig, Volume
from .lifetime import current_runtime
from .network import NetworkPolicy, Secret
from .paths import make_run_dir
from .volumes import bind_volumes, image_disk_args, image_volume, volume_device_args

if TYPE_CHECKING:
    import os

    from .sandbox import Sandbox

#: Seconds a guest whose agent connection dropped at boot gets to exit, so the
#: error can say how its VM process ended.
_EXIT_GRACE_S = 1.0

__all__ = [
    "ColdBoot",
    "Extensions",
    "GuestSession",
    "Provisioner",
    "Snapshotter",
    "boot_failure",
    "boot_session",
    "check_volumes_supported",
    "extensions",
    "install_extensions",
    "plan_for",
    "start_agent_client",
]


@dataclass(eq=False)
class GuestSession:
    """A started guest whose agent serves, as a provisioner hands it over.

    ``stack`` owns everything the session holds (the agent client's task, the
    VM process, its run directory); closing it ends the session. ``backend``
    started the VM (a snapshot's helper VM and a fork's children use it too). ``monitor`` is
    the VM's monitor when the provisioner opened one (restores do: snapshots
    and forks of the sandbox need it); ``origin`` is what the provisioner
    restored from, opaque to the runtime (the snapshot store's entry).
    """

    vm: VMHandle
    agent: AgentClient
    stack: AsyncExitStack
    backend: Backend
    plan: BootPlan | None = None
    monitor: VMMonitor | None = None
    origin: Any = None

    async def aclose(self) -> None:
        """End the session: close the monitor before the VM goes (its EOF is no
        error then), then everything the stack holds.
        """
        if self.monitor is not None:
            await self.monitor.close()
        await self.stack.aclose()


@runtime_checkable
class Provisioner(Protocol):
    """Starts a guest for a configuration."""

    async def provision(self, config: SandboxConfig, backend: Backend) -> GuestSession:
        """Return a session whose agent serves; the caller configures the guest
        (clock, RNG seed, hostname, volumes) and owns the session.

        :raises BootError: the guest did not reach its agent.
        :raises SnapshotError: a template could not be built or restored.
        """


@runtime_checkable
class Snapshotter(Protocol):
    """Named snapshots and forks of running sandboxes."""

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
        """Start a sandbox from a named snapshot (or a snapshot directory)."""

    async def snapshot(self, sandbox: Sandbox, name: str) -> Path:
        """Capture a running sandbox as snapshot ``name``; return its path."""

    async def fork(self, sandbox: Sandbox, name: str | None) -> Sandbox:
        """A child sandbox carrying ``sandbox``'s state."""

    async def remove(self, name: str, cache: Path | None) -> None:
        """Delete the named snapshot ``name`` of the cache ``cache``."""


@dataclass(frozen=True)
class Extensions:
    """What the layers above the runtime add to it."""

    #: Provisions sandboxes that are not ``cold_boot`` (template clones).
    templates: Provisioner | None = None
    snapshots: Snapshotter | None = None


async def plan_for(config: SandboxConfig, backend: Backend) -> BootPlan:
    """Resolve the accelerator and build (or find cached) what ``config`` boots from.

    :raises ConfigError: ``memory`` or ``cpus`` is more than this host has.
    """
    config.check_host_capacity()
    accel = await resolve_accel(config, backend)
    return await anyio.to_thread.run_sync(prepare_boot, config, accel.accel, config.cache_dir)


class ColdBoot:
    """Boots the kernel and waits for the agent's READY (seconds under TCG)."""

    async def provision(self, config: SandboxConfig, backend: Backend) -> GuestSession:
        plan = await plan_for(config, backend)

        def spec_for(run_dir: Path) -> VMSpec:
            spec = plan.vm_spec(config, run_dir)
            if not config.volumes:
                return spec
            # A cold boot needs one 9p device per bind volume (same tags as a
            # clone's) and the image volume's disk (same serial).
            binds = tuple(bind_volumes(config.volumes).values())
            vol_args = volume_device_args(binds, run_dir, len(binds))
            image = image_volume(config.volumes)
            if image is not None and image[1].host_path is not None:
                vol_args += image_disk_args("image0", image[1].host_path)
            return dataclasses.replace(spec, extra_args=(*spec.extra_args, *vol_args))

        return await boot_session(config, backend, spec_for, plan)


async def boot_session(
    config: SandboxConfig,
    backend: Backend,
    spec_for: Callable[[Path], VMSpec],
    plan: BootPlan | None,
) -> GuestSession:
    """Start a VM from ``spec_for(run_dir)`` and wait for its agent's READY."""
    stack = AsyncExitStack()
    run_dir = make_run_dir(config.name)
    stack.callback(shutil.rmtree, run_dir, True)
    try:
        vm = await backend.start(spec_for(run_dir))
        stack.push_async_callback(vm.kill)
        boot_deadline = anyio.current_time() + config.boot_timeout
        stream = await vm.connect_agent(config.boot_timeout)
        agent = await start_agent_client(stack, stream)
        try:
            await agent.wait_ready(timeout=max(0.1, boot_deadline - anyio.current_time()))
        except (GuestTimeoutError, SandboxNotRunningError, ProtocolError) as exc:
            raise await boot_failure(vm, config, exc) from exc
        return GuestSession(vm, agent, stack, backend, plan)
    except BaseException:
        # Not shielded: the stack holds the agent client's task group, which
        # must be exited from its own cancel scope; vm.kill shields itself.
        await stack.aclose()
        raise


def check_volumes_supported(config: SandboxConfig, backend: Backend) -> None:
    """:raises ConfigError: ``config`` has volumes and ``backend`` boots no guest."""
    if config.volumes:
        raise ConfigError(
            f"volumes: the {backend.name} backend boots no guest to mount them in; "
            "use the QEMU backend"
        )


async def boot_failure(vm: VMHandle, config: SandboxConfig, exc: SandboxError) -> SandboxError:
    """The error for a guest that did not reach a serving agent, with its console
    tail and what the VM process printed.
    """
    if isinstance(exc, SandboxNotRunningError) and vm.returncode is None:
        # A lost agent connection at boot means the VM is going down (QEMU
        # connects its ports before it fails, e.g. to allocate guest memory):
        # wait briefly, so the error says how it ended and what QEMU said.
        with anyio.move_on_after(_EXIT_GRACE_S, shield=True):
            await vm.wait()
    tail = vm.console_tail()
    if vm.returncode is not None or isinstance(exc, SandboxNotRunningError):
        printed = vm.stderr_tail()
        said = f"; {printed}" if printed else ""
        return GuestCrashedError(
            f"sandbox {config.name!r}: the guest died while booting "
            f"(its VM process {describe_exit(vm.returncode)}{said})",
            console_tail=tail,
        )
    if isinstance(exc, GuestTimeoutError):
        return GuestTimeoutError(
            f"sandbox {config.name!r}: the agent did not become ready within "
            f"{config.boot_timeout:g} s (raise boot_timeout, or check the console below)",
            console_tail=tail,
        )
    exc.console_tail = tail
    return exc


async def start_agent_client(stack: AsyncExitStack, stream: anyio.abc.ByteStream) -> AgentClient:
    """Run an AgentClient in a task of the current runtime (``lifetime.py``);
    ``stack`` closes it.

    The client's reader lives in a task group, and anyio requires a task group
    to be left by the task that entered it, in LIFO order. Sandboxes are
    created and stopped in any order (``sandbox_factory``, pytest fixtures), so
    each client gets an owner task of its own instead of borrowing the caller's.
    """
    runtime = await current_runtime()
    client = AgentClient(stream)
    entered = anyio.Event()
    release = anyio.Event()
    finished = anyio.Event()
    failure: list[BaseException] = []

    async def own() -> None:
        try:
            async with client:
                entered.set()
                await release.wait()
        except BaseException as exc:  # reported to whoever waits below
            failure.append(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation: the runtime is closing
        finally:
            entered.set()
            finished.set()

    runtime.spawn(own)

    async def close() -> None:
        release.set()
        with anyio.CancelScope(shield=True):
            await finished.wait()

    stack.push_async_callback(close)
    await entered.wait()
    if failure:
        raise failure[0]
    return client
