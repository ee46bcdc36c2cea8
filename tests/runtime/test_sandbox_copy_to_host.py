"""copy_to_host against the real agent in host mode (no VM, milliseconds): guest links,
loops, budgets and modes. The guest-planted links in a volume and the forged agent
replies are in test_sandbox_copy_to_host_vm.py.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    CopyLimitError,
    FilesystemError,
    Sandbox,
    SandboxConfig,
    UnsafeHostPathError,
)
from pytest_microsandbox.runtime.hostproc import HostProcessBackend


def run(body: Callable[[Sandbox], Awaitable[None]]) -> None:
    async def main() -> None:
        sb = await Sandbox.create(SandboxConfig(name="fake"), backend=HostProcessBackend())
        try:
            await body(sb)
        finally:
            await sb.stop()

    anyio.run(main)


def tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` -> 'dir', 'link:<target>' or the file's text (no following)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_text()
    return out


def test_guest_symlinks_are_copied_as_links_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the copy")
    g = tmp_path / "g"
    (g / "d").mkdir(parents=True)
    (g / "f").write_text("file")
    (g / "d" / "inner").write_text("inner")
    (g / "d" / "up").symlink_to("..")  # a loop: following it recurses for ever
    (g / "self").symlink_to("self")  # a link to itself
    (g / "root").symlink_to("/")  # following it copies the whole guest
    (g / "out").symlink_to(outside)
    (g / "dangling").symlink_to("nowhere")

    async def body(sb: Sandbox) -> None:
        back = tmp_path / "back"
        assert await sb.fs().copy_to_host(str(g), back) == len("file") + len("inner")
        assert tree(back) == {
            "d": "dir",
            "f": "file",
            "d/inner": "inner",
            "d/up": "link:..",
            "self": "link:self",
            "root": "link:/",
            "out": f"link:{outside}",
            "dangling": "link:nowhere",
        }

    run(body)


def test_modes_are_copied_without_setuid_and_temporaries_are_gone(tmp_path: Path) -> None:
    g = tmp_path / "g"
    g.mkdir()
    for name, mode in (("plain", 0o640), ("exe", 0o755), ("suid", 0o4755)):
        (g / name).write_text(name)
        (g / name).chmod(mode)

    async def body(sb: Sandbox) -> None:
        back = tmp_path / "back"
        assert await sb.fs().copy_to_host(str(g), back) == len("plainexesuid")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in back.iterdir()}
        assert modes == {"plain": 0o640, "exe": 0o755, "suid": 0o755}
        # A second copy over the first replaces files in place, leaving no temporary.
        assert await sb.fs().copy_to_host(str(g / "plain"), back / "exe") == len("plain")
        assert sorted(p.name for p in back.iterdir()) == ["exe", "plain", "suid"]
        assert (back / "exe").read_text() == "plain"

    run(body)


def test_byte_budget(tmp_path: Path) -> None:
    g = tmp_path / "g"
    g.mkdir()
    (g / "a").write_bytes(b"x" * 600)
    (g / "b").write_bytes(b"y" * 600)

    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        with pytest.raises(CopyLimitError, match=r"g/b takes the copy past .*max_bytes=1000"):
            await fs.copy_to_host(str(g), tmp_path / "dir", max_bytes=1000)
        # Files appear whole or not at all.
        assert [p.name for p in (tmp_path / "dir").iterdir()] == ["a"]
        with pytest.raises(CopyLimitError, match="max_bytes=100"):
            await fs.copy_to_host(str(g / "a"), tmp_path / "one", max_bytes=100)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "g"]
        assert await fs.copy_to_host(str(g), tmp_path / "all", max_bytes=None) == 1200
        assert await fs.copy_to_host(str(g), tmp_path / "exact", max_bytes=1200) == 1200

    run(body)


def test_entry_budget(tmp_path: Path) -> None:
    g = tmp_path / "g"
    (g / "d").mkdir(parents=True)
    for i in range(3):
        (g / "d" / f"f{i}").write_text("")

    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        # g, d and three files: five entries.
        assert await fs.copy_to_host(str(g), tmp_path / "ok", max_entries=5) == 0
        with pytest.raises(CopyLimitError, match=r"max_entries=4.*pass a larger max_entries="):
            await fs.copy_to_host(str(g), tmp_path / "over", max_entries=4)
        assert await fs.copy_to_host(str(g), tmp_path / "free", max_entries=None) == 0

    run(body)


def test_links_inside_the_destination_are_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("host file\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    g = tmp_path / "g"
    (g / "sub").mkdir(parents=True)
    (g / "sub" / "f").write_text("guest")
    (g / "top.txt").write_text("guest")

    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        dst = tmp_path / "dst"
        dst.mkdir()
        (dst / ".top.txt.msb-partial").symlink_to(victim)  # the old fixed temporary name
        (dst / "top.txt").symlink_to(victim)
        assert await fs.copy_to_host(str(g / "top.txt"), dst / "top.txt") == 5
        assert victim.read_text() == "host file\n"
        assert (dst / "top.txt").read_text() == "guest" and not (dst / "top.txt").is_symlink()

        tree_dst = tmp_path / "tree"
        tree_dst.mkdir()
        (tree_dst / "sub").symlink_to(elsewhere)
        with pytest.raises(UnsafeHostPathError, match=r"tree/sub: it is a symlink"):
            await fs.copy_to_host(str(g), tree_dst)
        assert list(elsewhere.iterdir()) == []
        # The top-level destination's own name is not followed either.
        (tmp_path / "linked").symlink_to(elsewhere)
        with pytest.raises(UnsafeHostPathError, match="linked: it is a symlink"):
            await fs.copy_to_host(str(g), tmp_path / "linked")
        assert list(elsewhere.iterdir()) == []

    run(body)


def test_special_files_are_refused_by_name(tmp_path: Path) -> None:
    g = tmp_path / "g"
    g.mkdir()
    os.mkfifo(g / "fifo")

    async def body(sb: Sandbox) -> None:
        with pytest.raises(FilesystemError, match=r"g/fifo is not a regular file, directory or"):
            await sb.fs().copy_to_host(str(g), tmp_path / "back")

    run(body)
