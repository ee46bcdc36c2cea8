"""copy_to_host against a hostile guest in real VMs (TCG here): links planted in a
read-write volume, guest link trees, and an impersonated agent (tests/hostile_agent).

Every sandbox here has the default cpus/memory, so all are clones of the template
the other default-config VM tests use. A hostile test freezes its sandbox's agent
for good: each gets a fresh clone, killed afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from hostile_agent import Rule, chunk, dirent, ok, stat_reply, take_over
from pytest_microsandbox.runtime import (
    CopyLimitError,
    ProtocolError,
    Sandbox,
    SandboxConfig,
    SyncSandbox,
    UnsafeHostPathError,
    Volume,
)
from pytest_microsandbox.runtime.agent.protocol import MsgType, Tag, int_field
from pytest_microsandbox.runtime.agent.results import FileKind

pytestmark = pytest.mark.vm


def snapshot_tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` (links not followed) -> a short description."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes().decode(errors="replace")
    return out


@pytest.fixture(scope="module")
def host_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostwrite")
    dirs = {name: root / name for name in ("vol", "elsewhere")}
    for path in dirs.values():
        path.mkdir()
    dirs["victim"] = root / "victim.txt"
    dirs["victim"].write_text("host file, not the guest's\n")
    return dirs


@pytest.fixture(scope="module")
def vol_sandbox(host_dirs: dict[str, Path]) -> Iterator[SyncSandbox]:
    config = SandboxConfig(name="hostwrite", volumes={"/data": Volume.bind(host_dirs["vol"])})
    with SyncSandbox.create(config) as sb:
        yield sb


def test_planted_temporary_link_in_a_volume_is_not_written_through(
    vol_sandbox: SyncSandbox, host_dirs: dict[str, Path]
) -> None:
    """Issue #19 item 1: the guest links the host's temporary name to a host file."""
    victim = host_dirs["victim"]
    out = vol_sandbox.shell(
        f"printf payload > /root/payload.txt && ln -s {victim} /data/.out.txt.msb-partial"
        f" && ln -s {victim} /data/out.txt"
    )
    assert out.success, out.stderr_text
    assert (host_dirs["vol"] / ".out.txt.msb-partial").is_symlink()  # a real host link
    dst = host_dirs["vol"] / "out.txt"
    assert vol_sandbox.fs().copy_to_host("/root/payload.txt", dst) == len("payload")
    assert victim.read_text() == "host file, not the guest's\n"
    assert not dst.is_symlink() and dst.read_text() == "payload"


def test_planted_subdirectory_link_in_a_volume_is_refused(
    vol_sandbox: SyncSandbox, host_dirs: dict[str, Path]
) -> None:
    """Issue #19 item 1: a directory copy into the volume meets a guest-made link
    to a host directory where it will create a subdirectory."""
    elsewhere = host_dirs["elsewhere"]
    out = vol_sandbox.shell(
        "mkdir -p /root/tree/sub /data/outdir && printf x > /root/tree/sub/f"
        f" && ln -s {elsewhere} /data/outdir/sub"
    )
    assert out.success, out.stderr_text
    with pytest.raises(UnsafeHostPathError, match=r"outdir/sub: it is a symlink"):
        vol_sandbox.fs().copy_to_host("/root/tree", host_dirs["vol"] / "outdir")
    assert list(elsewhere.iterdir()) == []


def test_guest_link_loop_and_link_to_root_are_copied_as_links(
    vol_sandbox: SyncSandbox, tmp_path: Path
) -> None:
    """Issue #19 item 1: a loop wrote 82 entries, a link to / would copy the guest."""
    out = vol_sandbox.shell(
        "rm -rf /root/links && mkdir -p /root/links/d && printf f > /root/links/d/f"
        " && ln -s .. /root/links/d/up && ln -s loop /root/links/loop && ln -s / /root/links/root"
    )
    assert out.success, out.stderr_text
    assert vol_sandbox.fs().copy_to_host("/root/links", tmp_path / "links") == 1
    assert snapshot_tree(tmp_path / "links") == {
        "d": "dir",
        "d/f": "f",
        "d/up": "link:..",
        "loop": "link:loop",
        "root": "link:/",
    }


# --- an impersonated agent ------------------------------------------------------------------


def run_hostile(body: Callable[[Sandbox], Awaitable[None]]) -> None:
    """Run ``body`` with a fresh clone; it is killed afterwards (its agent is frozen)."""

    async def main() -> None:
        sb = await Sandbox.create(SandboxConfig(name="hostile"))
        try:
            await body(sb)
        finally:
            await sb.kill()

    anyio.run(main)


@pytest.mark.parametrize("kind", ["traversal", "absolute"])
def test_forged_fs_list_names_write_nothing_outside_the_destination(
    tmp_path: Path, kind: str
) -> None:
    """Issue #19 item 2: an impersonated agent answers FS_LIST with a name that
    leaves the destination; the host must refuse it and write nothing."""
    dst = tmp_path / "a" / "b" / "dst"
    name = b"../../escape_pwned.txt" if kind == "traversal" else f"{tmp_path}/abs_pwned.txt"
    rules = [
        Rule(MsgType.FS_STAT, [stat_reply(FileKind.DIRECTORY, mode=0o755)], path="/g"),
        Rule(MsgType.FS_LIST, [dirent(name, size=6), ok()], path="/g"),
        # What the old code asked next, answered as the attacker would.
        Rule(MsgType.FS_STAT, [stat_reply(FileKind.FILE, size=6)]),
        Rule(MsgType.FS_READ, [chunk(b"pwned\n"), ok(int_field(Tag.SIZE, 6))]),
    ]

    async def body(sb: Sandbox) -> None:
        await take_over(sb, rules)
        with pytest.raises(ProtocolError, match="the agent sent the entry name"):
            await sb.fs().copy_to_host("/g", dst)

    run_hostile(body)
    assert snapshot_tree(tmp_path) == {"a": "dir", "a/b": "dir", "a/b/dst": "dir"}


def test_lying_size_is_stopped_by_the_byte_budget(tmp_path: Path) -> None:
    """The agent says 10 bytes and streams 16 MiB: the budget stops the copy and
    no partial file stays."""
    rules = [
        Rule(MsgType.FS_STAT, [stat_reply(FileKind.FILE, size=10)], path="/big"),
        Rule(
            MsgType.FS_READ,
            [chunk(b"\0" * (256 * 1024), repeat=64), ok(int_field(Tag.SIZE, 10))],
        ),
    ]

    async def body(sb: Sandbox) -> None:
        await take_over(sb, rules)
        with pytest.raises(CopyLimitError, match=r"max_bytes=1048576"):
            await sb.fs().copy_to_host("/big", tmp_path / "big", max_bytes=1024 * 1024)

    run_hostile(body)
    assert list(tmp_path.iterdir()) == []
