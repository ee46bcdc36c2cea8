"""``--sandbox-keep-failed``: a failed test's VM is saved as a named snapshot, and
the summary says how to restore it.

Two kinds of VMs are kept: a marked test's own VM (its clone of the zygote) and
the sandboxes a test created through the fixtures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._names import safe_name
from ._stats import Stats

if TYPE_CHECKING:
    from ..runtime import Sandbox, SyncSandbox

# The runtime is imported where it is used: this module is imported with the
# plugin, and a run that creates no sandbox never loads it.

__all__ = ["keep_fixture_sandbox", "keep_marked_test_vm"]

#: Longest snapshot name of a kept VM.
_NAME_LIMIT = 60


async def keep_marked_test_vm(sandbox: Sandbox, nodeid: str, stats: Stats) -> str:
    """Snapshot the VM a marked test ran in; return what the report says about it
    (also added to the summary when it worked).
    """
    from ..runtime import SandboxError

    name = safe_name("failed-" + nodeid.rsplit("::", 1)[-1], _NAME_LIMIT)
    try:
        await sandbox.snapshot(name)
    except SandboxError as exc:
        return f"could not keep {sandbox.name}: {exc.message}"
    text = (
        f"{nodeid}: the failed test's VM was saved as snapshot {name!r}; reach it with "
        f"`await Sandbox.restore({name!r})` (pytest_microsandbox.runtime), then exec/shell "
        f"in it; remove it with Snapshot.remove({name!r})"
    )
    stats.kept.append(text)
    return text


def keep_fixture_sandbox(sandbox: SyncSandbox, nodeid: str, stats: Stats) -> None:
    """Snapshot a sandbox a failed test created through the fixtures; the summary
    says how to reach it, or why it could not be kept.
    """
    from ..runtime import SandboxError, _portal

    name = safe_name("failed-" + sandbox.name, _NAME_LIMIT)
    try:
        _portal.call(sandbox.async_sandbox.snapshot, name)
    except SandboxError as exc:
        stats.kept.append(f"{nodeid}: could not keep {sandbox.name}: {exc.message}")
        return
    stats.kept.append(
        f"{nodeid}: sandbox {sandbox.name} saved as snapshot {name!r}; reach it with "
        f"`await Sandbox.restore({name!r})` (pytest_microsandbox.runtime); remove it with "
        f"Snapshot.remove({name!r})"
    )
