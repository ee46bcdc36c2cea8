"""The QEMU backend's monitor capability (:class:`~.backend.VMMonitor`): a thin
QMP client over ``qemu.qmp`` for stop/cont and migration to and from files.

QEMU connects its monitor to a socket the host listens on (``VMSpec.qmp``),
so there is no start-up race; :meth:`Monitor.open` accepts that connection
and negotiates capabilities.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from ._exceptions import SnapshotError

if TYPE_CHECKING:
    from .qemu import QemuVM

__all__ = ["Monitor"]

# qemu.qmp logs every negotiation step at INFO/WARNING; only errors matter to us.
# A VM's owner closes its monitor before QEMU exits (stop, kill, discard), so a
# normal end logs nothing; an EOF or reset logged here means QEMU died on its own.
logging.getLogger("qemu.qmp").setLevel(logging.ERROR)

_POLL_S = 0.001


class Monitor:
    """One VM's QMP session."""

    def __init__(self, client: QMPClient, what: str) -> None:
        self._client = client
        self._what = what
        self._closed = False

    @classmethod
    async def open(cls, vm: QemuVM, timeout: float) -> Monitor:
        """Accept QEMU's monitor connection and negotiate.

        :raises BootError: QEMU did not connect in ``timeout``.
        :raises SnapshotError: the QMP handshake failed.
        """
        sock = await vm.accept_qmp(timeout)
        client = QMPClient(vm.spec.name)
        try:
            with anyio.fail_after(timeout):
                await client.connect(sock)
        except (QMPError, OSError, TimeoutError) as exc:
            sock.close()
            raise SnapshotError(f"QMP handshake with QEMU failed: {exc!r}") from exc
        return cls(client, vm.spec.name)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command; :raises SnapshotError: QEMU refused it."""
        try:
            return await self._client.execute(cmd, args)
        except QMPError as exc:
            raise SnapshotError(f"QMP {cmd} failed on {self._what}: {exc}") from exc

    async def set_ignore_shared(self, on: bool) -> None:
        """x-ignore-shared: leave RAM in a shared file out of the migration stream."""
        caps = [{"capability": "x-ignore-shared", "state": on}]
        await self.execute("migrate-set-capabilities", {"capabilities": caps})

    async def disable_self_announce(self) -> None:
        """Skip the self-announce rounds QEMU runs after a load.

        By default QEMU makes the guest's virtio-net announce itself 5 times over
        ~0.5 s, for the switches of a live-migrated VM. A clone has none to tell,
        and under TCG each round is guest kernel code to translate: 5% of the code
        a clone generated up to its first command, measured with ``info jit``.
        """
        await self.execute("migrate-set-parameters", {"announce-rounds": 0})

    async def save(self, state: Path, timeout: float) -> None:
        """Write the (stopped) VM's device state (and unshared RAM) to ``state``."""
        await self.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
        await self.wait_migration(timeout)

    async def load(self, state: Path, timeout: float) -> None:
        """Load ``state`` into a VM started with ``-incoming defer`` (it stays paused)."""
        await self.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
        await self.wait_migration(timeout)

    async def wait_migration(self, timeout: float) -> None:
        """Poll query-migrate until completed.

        :raises SnapshotError: it failed or took longer than ``timeout``.
        """
        with anyio.move_on_after(timeout):
            while True:
                info = await self.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    detail = info.get("error-desc", "no detail")
                    raise SnapshotError(f"migration {status} on {self._what}: {detail}")
                await anyio.sleep(_POLL_S)
        raise SnapshotError(f"migration on {self._what} did not finish within {timeout:g} s")

    async def close(self) -> None:
        """Disconnect from QEMU (shielded from cancellation). Idempotent; quiet if QEMU is gone.

        Call it before QEMU exits or is killed: qemu.qmp's reader task then ends
        quietly instead of reporting the end of the connection as a failure.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            # QEMU may be gone already (guest powered off, killed): EOF is expected.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._client.disconnect()
