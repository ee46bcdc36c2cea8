"""The ``microsandbox`` command: ``python -m pytest_microsandbox.cli COMMAND``.

Each command module exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` (``args -> exit status``) on each parser.
Layer 3 (docs/architecture.md): it drives the runtime and snapshots, never
the pytest plugin.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _sandboxes

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: The modules whose ``register`` adds subcommands, in ``--help`` order.
COMMAND_MODULES = (_sandboxes,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microsandbox", description="Manage pytest-microsandbox sandboxes."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (0 ok, 1 failed, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = func(args)
    return status
