"""``microsandbox prune``: free disk space in the cache.

Removes templates and the plugin's zygotes (built again when needed) unused
for ``--older-than``; with ``--kept``, also the snapshots ``pytest
--sandbox-keep-failed`` saved (``failed-*``); with ``--max-size``, then the
least recently used of those until they fit. Entries used in the last ten
minutes are always spared (another process may be about to restore them).
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_OK, add_json, human_bytes, parse_bytes, parse_duration, print_json

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prune",
        help="remove unused templates and zygotes (and kept snapshots with --kept)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--older-than",
        type=parse_duration,
        default=0.0,
        metavar="AGE",
        help="only entries unused for AGE (e.g. 12h, 7d; default: any age)",
    )
    p.add_argument(
        "--max-size",
        type=parse_bytes,
        default=None,
        metavar="SIZE",
        help="then the least recently used until each kind fits in SIZE (e.g. 10G)",
    )
    p.add_argument("--kept", action="store_true", help="also the failed-* snapshots of tests")
    add_json(p)
    p.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from ..snapshots import AUTO_PRUNE_GRACE_S, Snapshot

    sizes = {(i.kind, i.name): i.disk_bytes for i in Snapshot.list()}
    groups = [("template", None), ("snapshot", "zygote-")]
    if args.kept:
        groups.append(("snapshot", "failed-"))
    removed: list[dict[str, Any]] = []
    for kind, prefix in groups:
        for name in Snapshot.prune(
            max_age=args.older_than if args.max_size is None or args.older_than else None,
            max_bytes=args.max_size,
            kind=kind,
            prefix=prefix,
            min_idle=AUTO_PRUNE_GRACE_S,
        ):
            removed.append({"name": name, "kind": kind, "disk_bytes": sizes.get((kind, name), 0)})
    freed = sum(r["disk_bytes"] for r in removed)
    if args.json:
        print_json({"removed": removed, "freed_bytes": freed})
        return EXIT_OK
    for r in removed:
        print(f"removed {r['kind']} {r['name']} ({human_bytes(r['disk_bytes'])})")
    print(f"{len(removed)} removed, {human_bytes(freed)} freed")
    return EXIT_OK
