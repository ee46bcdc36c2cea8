"""``microsandbox snapshot ls|rm|restore``: the named snapshots in the cache.

``ls`` shows what you saved and what ``pytest --sandbox-keep-failed`` kept
(``--all`` adds the plugin's zygotes and the templates: built again on demand);
``rm NAME...`` deletes; ``restore NAME [-- CMD]`` starts a clone of NAME and
opens a shell in it (or runs CMD), the clone thrown away on exit.
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio

from ._common import EXIT_FAILURE, EXIT_OK, add_json, age, error, human_bytes, print_json, table
from ._target import command_argv, command_options, default_workdir, open_target, run_in

__all__ = ["register"]

#: Named snapshots the plugin makes for itself.
_INTERNAL_PREFIXES = ("zygote-",)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "snapshot",
        help="list, remove or restore snapshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)

    ls = sub.add_parser("ls", help="list snapshots")
    ls.add_argument(
        "-a", "--all", action="store_true", help="also the plugin's zygotes and the templates"
    )
    add_json(ls)
    ls.set_defaults(handler=_ls)

    rm = sub.add_parser("rm", help="remove snapshots")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(handler=_rm)

    restore = sub.add_parser(
        "restore", help="start a clone of snapshot NAME: a shell in it, or run CMD"
    )
    restore.add_argument("name", metavar="NAME")
    command_options(restore)
    restore.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    restore.set_defaults(handler=_restore)


def _ls(args: argparse.Namespace) -> int:
    from ..snapshots import Snapshot

    infos = Snapshot.list(kind=None if args.all else "snapshot")
    if not args.all:
        infos = [i for i in infos if not i.name.startswith(_INTERNAL_PREFIXES)]
    infos.sort(key=lambda i: (i.kind != "snapshot", -i.created, i.name))
    if args.json:
        print_json(
            [
                {
                    "name": i.name,
                    "kind": i.kind,
                    "path": str(i.path),
                    "created": i.created,
                    "last_used": i.last_used,
                    "disk_bytes": i.disk_bytes,
                    "memory_mib": i.memory_mib,
                }
                for i in infos
            ]
        )
        return EXIT_OK
    if not infos:
        print("no snapshots (pytest --sandbox-keep-failed keeps failed tests' VMs here)")
        return EXIT_OK
    rows = [
        [i.name, i.kind, age(i.created), age(i.last_used), human_bytes(i.disk_bytes),
         f"{i.memory_mib} MiB"]
        for i in infos
    ]  # fmt: skip
    print(table(["NAME", "KIND", "CREATED", "USED", "DISK", "MEMORY"], rows, right=(2, 3, 4, 5)))
    return EXIT_OK


def _rm(args: argparse.Namespace) -> int:
    from ..runtime import SnapshotError
    from ..snapshots import Snapshot

    status = EXIT_OK
    for name in args.names:
        try:
            Snapshot.remove(name)
        except SnapshotError as exc:
            status = error(f"{exc.message}; list the snapshots with: microsandbox snapshot ls")
        else:
            print(f"removed {name}")
    return status if status == EXIT_OK else EXIT_FAILURE


def _restore(args: argparse.Namespace) -> int:
    from ._attach import run_terminal

    argv = command_argv(args)

    async def go() -> int:
        async with open_target(args.name) as sandbox:
            if argv:
                return await run_in(sandbox, args, argv)
            cwd = args.workdir or await default_workdir(sandbox)
            return await run_terminal(sandbox, ["/bin/sh"], cwd=cwd, env=None)

    return anyio.run(go)
