"""``microsandbox run [OPTIONS] [-- CMD [ARG...]]``: create a sandbox, run a command
in it (or an interactive shell when no command is given), remove it. The exit
code is the command's.

The first run of a configuration builds its template (a boot, tens of seconds
under emulation); later runs restore a copy-on-write clone of it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import anyio

from ._attach import run_terminal
from ._target import command_argv, command_options, run_in

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="create a sandbox, run a command or a shell in it, remove it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--image", default="host", help="root filesystem: 'host' (default) or a directory"
    )
    p.add_argument("--memory", type=int, default=512, metavar="MIB", help="guest memory (512)")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs (1)")
    p.add_argument("--cold", action="store_true", help="boot from scratch (no template)")
    command_options(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from ..runtime import Sandbox, SandboxConfig

    config = SandboxConfig(
        name=f"msb-cli-{os.getpid()}",
        image=args.image,
        memory=args.memory,
        cpus=args.cpus,
        cold_boot=args.cold,
    )
    argv = command_argv(args)

    async def go() -> int:
        sandbox = await Sandbox.create(config)
        try:
            if not argv:
                return await run_terminal(sandbox, ["/bin/sh"], cwd=args.workdir)
            return await run_in(sandbox, args, argv)
        finally:
            with anyio.CancelScope(shield=True):
                await sandbox.kill()

    return anyio.run(go)
