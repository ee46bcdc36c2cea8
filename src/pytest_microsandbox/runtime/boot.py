"""Turn a :class:`SandboxConfig` into what a backend boots: kernel, initramfs,
root layers, kernel command line, accelerator.
"""

from __future__ import annotations

import functools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio

from ._keys import digest_parts
from .accel import AccelDecision, choose_accel, known_accel
from .agent.build import build_agent
from .agent.client import AgentClient
from .backend import Accel, Backend, DiskSpec, VMSpec
from .config import SandboxConfig
from .images import Layer, log_pull_progress, resolve_root_layers
from .initramfs import InitramfsSpec, build_initramfs
from .kernel import KernelInfo, find_kernel
from .paths import cache_dir, make_run_dir
from .qemu import DEVICE_SET, QemuBackend, tcg_cpu

__all__ = ["BootPlan", "boot_identity", "prepare_boot", "resolve_accel"]

#: Kernel arguments for every guest. ``quiet`` because each console byte is an
#: emulated UART write under TCG; ``pci=off`` as microvm has no PCI bus;
#: ``reboot=t`` plus QEMU's -no-reboot turns any reboot into a QEMU exit.
#: ``norandmaps``: TCG keys its translated code by virtual address too, so with
#: ASLR every process re-translates ld.so and libc; without it a dynamically
#: linked ``true`` costs 4.8 ms instead of 23 ms and ``import pytest`` 0.11 s
#: instead of 0.45 s (measured here). ASLR inside a throwaway test VM protects
#: nothing on the host. ``init_on_alloc=0``: no zeroing of every page the guest
#: allocates, emulated work that also dirties copy-on-write clone memory.
#: ``lsm=landlock,yama``: Debian's kernel also starts AppArmor, TOMOYO (which
#: records a domain for every new program it sees), BPF-LSM and lockdown, none
#: of them configured by anything in the guest; their hooks were 3% of the code
#: a clone translates for its first command. Landlock (programs sandbox
#: themselves with it) and Yama (ptrace scope) stay, as tests may use them.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=t pci=off nomodeset tsc=reliable norandmaps "
    "init_on_alloc=0 lsm=landlock,yama"
)


@dataclass(frozen=True)
class BootPlan:
    """Files and settings for booting one configuration."""

    kernel: KernelInfo
    initrd: Path
    layers: tuple[Layer, ...]
    accel: Accel
    agent: Path

    @property
    def cmdline(self) -> str:
        parts = [BASE_CMDLINE]
        tsc_khz = host_tsc_khz() if self.accel == "tcg" else None
        if tsc_khz:
            parts.append(f"tsc_early_khz={tsc_khz}")
        if self.layers:
            parts.append(
                "msb.layers="
                + ",".join(
                    layer.serial if layer.fstype == "erofs" else f"{layer.serial}:{layer.fstype}"
                    for layer in self.layers
                )
            )
        return " ".join(parts)

    def identity(self, config: SandboxConfig) -> str:
        """Digest of everything that shapes guest memory at boot (a template key)."""
        return digest_parts(
            self.kernel.digest,
            self.initrd.name,
            *(layer.digest for layer in self.layers),
            self.accel,
            tcg_cpu() if self.accel == "tcg" else "host",
            DEVICE_SET,
            str(config.cpus),
            str(config.memory),
            self.cmdline,
            length=24,
        )

    def vm_spec(self, config: SandboxConfig, run_dir: Path) -> VMSpec:
        return VMSpec(
            name=config.name,
            kernel=self.kernel.vmlinux,
            initrd=self.initrd,
            cmdline=self.cmdline,
            cpus=config.cpus,
            memory_mib=config.memory,
            accel=self.accel,
            cpu_model=tcg_cpu() if self.accel == "tcg" else None,
            run_dir=run_dir,
            disks=tuple(
                DiskSpec(layer.serial, layer.path, format=layer.format) for layer in self.layers
            ),
        )


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, if the host has a constant TSC.

    Under TCG the guest's TSC is the host's, but the kernel's calibration
    against the emulated PIT fails now and then on a loaded host, and the boot
    then hangs right after "Marking TSC unstable" (seen here, about 1 boot in
    6 with both cores busy). Telling the kernel the frequency skips that.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "constant_tsc" not in text:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    return int(float(match.group(1)) * 1000) if match else None


def _base_files(cache: Path) -> tuple[KernelInfo, Path, Path]:
    kernel = find_kernel(cache)
    agent = build_agent(cache)
    initrd = build_initramfs(
        InitramfsSpec(agent=agent, modules_dir=kernel.modules_dir), cache / "initramfs"
    )
    return kernel, agent, initrd


def prepare_boot(config: SandboxConfig, accel: Accel, cache: Path | None = None) -> BootPlan:
    """Build (or find cached) everything needed to boot ``config``. Blocking."""
    cache = cache_dir(cache)
    kernel, agent, initrd = _base_files(cache)
    layers = resolve_root_layers(
        config.image,
        project_root=(
            config.resolved_project_root() if config.image == "host" or config.host_python else None
        ),
        cache_dir=cache,
        include_project=config.image_project,
        pull_policy=config.pull_policy,
        registry_auth=config.registry_auth,
        progress=log_pull_progress,
        patches=config.patches,
        scripts=config.scripts,
        disk_fstype=config.disk_fstype,
        disk_partition=config.disk_partition,
        host_python=config.host_python,
    )
    return BootPlan(kernel=kernel, initrd=initrd, layers=tuple(layers), accel=accel, agent=agent)


async def _probe_kvm(backend: Backend, cache: Path, timeout: float) -> None:
    """Boot the bare initramfs under KVM and wait for the agent's READY."""
    kernel, agent, initrd = await anyio.to_thread.run_sync(_base_files, cache)
    plan = BootPlan(kernel=kernel, initrd=initrd, layers=(), accel="kvm", agent=agent)
    run_dir = make_run_dir("kvm-probe")
    try:
        probe_config = SandboxConfig(name="kvm-probe", memory=256)
        vm = await backend.start(plan.vm_spec(probe_config, run_dir))
        try:
            stream = await vm.connect_agent(timeout)
            async with AgentClient(stream) as client:
                await client.wait_ready(timeout=timeout)
        finally:
            await vm.kill()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def resolve_accel(config: SandboxConfig, backend: Backend) -> AccelDecision:
    """The accelerator for ``config``: forced by config/env, or probed once per host boot."""

    cache = cache_dir(config.cache_dir)
    choice = config.resolved_accel()

    async def probe(timeout: float) -> None:
        await _probe_kvm(backend, cache, timeout)

    if known_accel(choice, cache) is None:
        # A probe may run: build its boot files first, outside its timed window
        # (a first build on a busy host can take longer than the probe may).
        await anyio.to_thread.run_sync(_base_files, cache)
    return await choose_accel(choice, cache, probe)


async def boot_identity(config: SandboxConfig) -> str:
    """A digest of what a VM of ``config`` boots from, as QEMU would run it here.

    It covers the kernel, the initramfs (hence the guest agent), the root layers
    (for ``image="host"`` the project's files and the host prefixes), the
    accelerator and its CPU model, the device set, cpus, memory and the kernel
    command line: equal
    digests mean equal guest memory at boot. Use it to key caches of things
    derived from a booted guest. Builds (or finds cached) the initramfs and
    images and resolves the accelerator like :meth:`Sandbox.create` does (a KVM
    probe boot once per host boot, TCG if it fails), so the first call can take
    seconds; later ones read the caches.

    :raises KernelNotFoundError: the guest kernel has not been provisioned.
    :raises AgentBuildError: the guest agent cannot be compiled.
    :raises ImageError: a root filesystem layer cannot be built.
    """
    decision = await resolve_accel(config, QemuBackend())
    plan = await anyio.to_thread.run_sync(prepare_boot, config, decision.accel, config.cache_dir)
    return plan.identity(config)
