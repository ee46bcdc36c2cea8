"""``--sandbox-keep-failed``: a failed test's VM is saved as a named snapshot, and
the summary prints the command that opens a shell in it (``microsandbox shell
NAME``: a clone of the snapshot, as the VM was when the test failed).

Two kinds of VMs are kept: a marked test's own VM (its clone of the zygote; the
plugin runs marked tests with ``vm`` isolation under this option, so that VM is
the test's own and still holds what the test left) and the sandboxes a test
created through the fixtures. Names come from ``_names.kept_name``: one per node
id (and sandbox), so same-named tests of two files do not overwrite each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._names import kept_name
from ._stats import Stats

if TYPE_CHECKING:
    from ..runtime import Sandbox, SyncSandbox

# The runtime is imported where it is used: this module is imported with the
# plugin, and a run that creates no sandbox never loads it.

__all__ = ["how_to_reach", "keep_fixture_sandbox", "keep_marked_test_vm"]


def how_to_reach(name: str) -> str:
    """What the summary says about kept snapshot ``name``."""
    return (
        f"open a shell in it: microsandbox shell {name}  (remove: microsandbox snapshot rm {name})"
    )


async def keep_marked_test_vm(sandbox: Sandbox, nodeid: str, stats: Stats) -> str:
    """Snapshot the VM a marked test ran in; return what the report says about it
    (also added to the summary when it worked).
    """
    from ..runtime import SandboxError

    name = kept_name(nodeid)
    try:
        await sandbox.snapshot(name)
    except SandboxError as exc:
        return f"could not keep {sandbox.name}: {exc.message}"
    text = f"{nodeid}: the failed test's VM was saved as snapshot {name}; {how_to_reach(name)}"
    stats.kept.append(text)
    return text


def keep_fixture_sandbox(sandbox: SyncSandbox, nodeid: str, stats: Stats) -> None:
    """Snapshot a sandbox a failed test created through the fixtures; the summary
    says how to reach it, or why it could not be kept.
    """
    from ..runtime import SandboxError, _portal

    name = kept_name(nodeid, sandbox.name)
    try:
        _portal.call(sandbox.async_sandbox.snapshot, name)
    except SandboxError as exc:
        stats.kept.append(f"{nodeid}: could not keep {sandbox.name}: {exc.message}")
        return
    stats.kept.append(
        f"{nodeid}: sandbox {sandbox.name} saved as snapshot {name}; {how_to_reach(name)}"
    )
