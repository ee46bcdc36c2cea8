"""``microsandbox ls``, ``stop`` and ``rm``: the named sandboxes of the state store.

``ls`` lists the live named sandboxes of every process (an aligned table, or
``--json``); ``stop`` and ``rm`` stop sandboxes by name whichever process owns
them and remove what they hold (a stopped sandbox leaves the store, so the two
differ only in ``rm --force``, which ignores names that are not there).
Exit status: 0 done, 1 a name was not found or a stop failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from ..runtime import SandboxError, SandboxNotFoundError

__all__ = ["format_table", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ls``, ``stop`` and ``rm``."""
    ls = subparsers.add_parser("ls", help="list the live named sandboxes")
    ls.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    _cache_option(ls)
    ls.set_defaults(handler=_ls)
    for name, what in (("stop", "stop"), ("rm", "stop and remove")):
        cmd = subparsers.add_parser(name, help=f"{what} named sandboxes (any process's)")
        cmd.add_argument("names", nargs="+", metavar="NAME")
        cmd.add_argument("--timeout", type=float, default=None, help="seconds of graceful shutdown")
        if name == "rm":
            cmd.add_argument(
                "-f", "--force", action="store_true", help="ignore names that do not exist"
            )
        _cache_option(cmd)
        cmd.set_defaults(handler=_stop)


def _cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", default=None, help="cache directory (default: $MICROSANDBOX_CACHE_DIR)"
    )


def _ls(args: argparse.Namespace) -> int:
    from ..runtime import Sandbox

    handles = anyio.run(lambda: Sandbox.list(cache_dir=args.cache_dir))
    if args.json:
        print(json.dumps([h.to_dict() for h in handles], indent=2))
        return 0
    rows = [
        [
            h.name,
            h.status.value,
            _age(h.created),
            "detached" if h.detached else "attached",
            str(h.owner_pid),
            "-" if h.pid is None else str(h.pid),
            h.config.image,
        ]
        for h in handles
    ]
    header = ["NAME", "STATUS", "CREATED", "MODE", "OWNER", "VM PID", "IMAGE"]
    print(format_table(header, rows))
    return 0


def _stop(args: argparse.Namespace) -> int:

    status = 0
    for name in args.names:
        try:
            anyio.run(_remove, name, args.timeout, args.cache_dir)
        except SandboxNotFoundError:
            if getattr(args, "force", False):
                continue
            print(
                f"microsandbox: no live sandbox is named {name!r}; `microsandbox ls` lists them",
                file=sys.stderr,
            )
            status = 1
        except SandboxError as exc:
            print(f"microsandbox: stopping {name!r} failed: {exc}", file=sys.stderr)
            status = 1
        else:
            print(name)
    return status


async def _remove(name: str, timeout: float | None, cache_dir: str | None) -> None:
    from ..runtime import Sandbox

    await Sandbox.remove(name, timeout=timeout, cache_dir=cache_dir)


def _age(when: datetime.datetime) -> str:
    seconds = (datetime.datetime.now(tz=datetime.timezone.utc) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{max(0, int(seconds))}s ago"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    table = [list(map(str, header)), *[list(map(str, row)) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
