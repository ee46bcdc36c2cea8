"""A test double of the VM engine: the guest agent as an ordinary host process.

:class:`HostProcessBackend` runs the real agent binary in its host mode
(``--serve-unix``), so the Sandbox layer (exec, streams, files, errors,
lifecycle) can be unit-tested in milliseconds without QEMU. It isolates
NOTHING: commands run on the host as the current user. Never use it for
untrusted code; it exists for tests, like httpx's MockTransport.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import anyio.abc

from ._exceptions import BootError, GuestCrashedError
from .backend import Backend, ProcessVMHandle, VMHandle, VMSpec, describe_exit
from .config import SandboxConfig
from .provision import GuestSession, boot_session, check_volumes_supported

__all__ = ["HostProcessBackend", "HostProcessVM"]


class HostProcessVM(ProcessVMHandle):
    """The agent running on the host in place of a VM."""

    @property
    def xfer_guest_dir(self) -> str:
        return str(self.spec.run_dir / "xfer")  # same filesystem: nothing to mount

    async def connect_agent(self, timeout: float) -> anyio.abc.ByteStream:
        with anyio.move_on_after(timeout):
            stream = await self._listener.accept()
            await self._listener.aclose()
            return stream
        await self._listener.aclose()
        if self._process.returncode is not None:
            raise GuestCrashedError(
                f"the host-mode agent {describe_exit(self._process.returncode)}",
                console_tail=self.console_tail(),
            )
        raise BootError(f"the host-mode agent did not connect within {timeout:g} s")


class HostProcessBackend(Backend):
    """Starts the agent on the host instead of a VM (tests only; no isolation).

    It is its own :class:`~.provision.Provisioner`: there is no kernel, image or
    template to prepare, so a sandbox's session is the agent process itself.
    """

    name = "host-process"

    def __init__(self, agent: Path | None = None) -> None:
        self._agent = agent

    async def provision(self, config: SandboxConfig, backend: Backend) -> GuestSession:
        check_volumes_supported(config, self)

        def spec_for(run_dir: Path) -> VMSpec:
            return VMSpec(
                name=config.name,
                kernel=Path("/nonexistent"),
                initrd=Path("/nonexistent"),
                cmdline="",
                cpus=config.cpus,
                memory_mib=config.memory,
                accel="tcg",
                run_dir=run_dir,
            )

        return await boot_session(config, self, spec_for, None)

    async def start(self, spec: VMSpec) -> VMHandle:
        agent = self._agent
        if agent is None:
            from .agent.build import build_agent

            agent = await anyio.to_thread.run_sync(build_agent)
        sock = spec.run_dir / "agent.sock"
        (spec.run_dir / "xfer").mkdir(exist_ok=True)
        listener = await anyio.create_unix_listener(sock)
        console = open(spec.console_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            process = await anyio.open_process(
                [str(agent), "--serve-unix", str(sock)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,
            )
        except BaseException:
            await listener.aclose()
            raise
        finally:
            console.close()
        return HostProcessVM(spec, process, listener)
