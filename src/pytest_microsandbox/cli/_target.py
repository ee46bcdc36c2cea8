"""``microsandbox exec NAME -- CMD`` and ``microsandbox shell NAME``: a command or
an interactive shell in the VM called NAME.

NAME is first a running detached sandbox (``microsandbox ls``): the command
runs in it, through its supervisor, and it runs on afterwards. Otherwise NAME
is a snapshot (``microsandbox snapshot ls``; what ``pytest
--sandbox-keep-failed`` saves a failed test's VM as): a copy-on-write clone of
it is started, so the shell sees the VM as it was when it was saved, and the
clone is thrown away on exit (the snapshot stays as it is). A sandbox running
attached to another process cannot be reached: only detached ones serve other
processes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from ._attach import run_command, run_terminal

if TYPE_CHECKING:
    from ..runtime import RemoteSandbox, Sandbox

__all__ = [
    "command_argv",
    "command_options",
    "default_workdir",
    "env_of",
    "open_target",
    "register",
    "run_in",
]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "exec",
        help="run a command in running sandbox NAME (or a clone of snapshot NAME); its exit code",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "name",
        metavar="NAME",
        help="a detached sandbox (microsandbox ls) or a snapshot (microsandbox snapshot ls)",
    )
    command_options(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(handler=_exec)

    p = subparsers.add_parser(
        "shell",
        help="open a shell in running sandbox NAME (or a clone of snapshot NAME)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "name",
        metavar="NAME",
        help="a detached sandbox (microsandbox ls) or a snapshot (microsandbox snapshot ls)",
    )
    p.add_argument("-w", "--workdir", help="start in this guest directory (default: the project's)")
    p.add_argument("--shell", default="/bin/sh", help="the shell to run (default: /bin/sh)")
    p.set_defaults(handler=_shell)


def command_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tty", action="store_true", help="run the command on a terminal")
    p.add_argument("-i", "--interactive", action="store_true", help="forward stdin to it")
    p.add_argument("-w", "--workdir", help="guest working directory")
    p.add_argument(
        "-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="set a variable"
    )


def command_argv(parser_args: argparse.Namespace) -> list[str]:
    argv = list(parser_args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return argv


def env_of(entries: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            from ..runtime import ConfigError

            raise ConfigError(f"--env {entry!r}: write NAME=VALUE")
        out[key] = value
    return out


@asynccontextmanager
async def open_target(name: str) -> AsyncIterator[Sandbox | RemoteSandbox]:
    """A sandbox for NAME: the running detached sandbox of that name, connected
    to and left running; else a clone of the snapshot NAME, killed on the way out.

    :raises SandboxError: NAME is a running sandbox attached to another process
        (only a detached one serves other processes).
    :raises SnapshotNotFoundError: NAME is neither a live sandbox nor a snapshot.
    """
    from ..runtime import Sandbox as _Sandbox
    from ..runtime import SandboxNotFoundError, SnapshotNotFoundError
    from ..snapshots import restore_snapshot

    try:
        handle = await _Sandbox.get(name)
    except SandboxNotFoundError:
        handle = None
    if handle is not None:
        if not handle.detached:
            from ..runtime import SandboxError

            raise SandboxError(
                f"sandbox {name!r} is running attached to process {handle.owner_pid}, which "
                "alone can drive it: create it with detached=True (or call its detach()) to "
                "reach it from here, or snapshot it and open the snapshot"
            )
        # Connected, not owned: leaving the command leaves the sandbox running.
        yield await handle.connect()
        return
    try:
        sandbox = await restore_snapshot(name, name=f"msb-cli-{os.getpid()}")
    except SnapshotNotFoundError as exc:
        raise SnapshotNotFoundError(
            f"{name!r} is neither a running sandbox (microsandbox ls lists them) nor a "
            f"snapshot ({exc.message}; microsandbox snapshot ls lists them)"
        ) from None
    try:
        yield sandbox
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.kill()


async def default_workdir(sandbox: Sandbox | RemoteSandbox) -> str | None:
    """Where a shell starts: the project directory of a test's VM, if it has one."""
    root = sandbox.config.project_root
    if root is None or not await sandbox.fs().exists(str(root)):
        return None
    return str(root)


async def run_in(
    sandbox: Sandbox | RemoteSandbox, args: argparse.Namespace, argv: list[str]
) -> int:
    env = env_of(args.env)
    if args.tty:
        return await run_terminal(sandbox, argv, cwd=args.workdir, env=env)
    return await run_command(sandbox, argv, cwd=args.workdir, env=env, stdin=args.interactive)


def _exec(args: argparse.Namespace) -> int:
    argv = command_argv(args)
    if not argv:
        from ._common import error

        error("exec needs a command: microsandbox exec NAME -- CMD [ARG...]")
        return 2

    async def go() -> int:
        async with open_target(args.name) as sandbox:
            return await run_in(sandbox, args, argv)

    return anyio.run(go)


def _shell(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with open_target(args.name) as sandbox:
            cwd = args.workdir or await default_workdir(sandbox)
            return await run_terminal(sandbox, [args.shell], cwd=cwd)

    return anyio.run(go)
