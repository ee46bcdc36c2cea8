"""The ``microsandbox`` console command: look into sandboxes and the cache.

A layer-3 sibling of the plugin: it imports ``runtime`` and ``snapshots``, never
pytest or the plugin (``tests/test_layers.py``). Each command module exposes
``register(subparsers) -> None``, which adds its subcommand(s) with a
``handler(args) -> int`` default; :data:`COMMANDS` lists them, in help order.

Exit codes: 0 done, 1 failed (the message says what to do), 2 usage error,
130 interrupted; ``run``, ``exec``, ``shell`` and ``snapshot restore`` return
the guest command's own exit code (128 + N when signal N killed it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _doctor, _prune, _run, _sandboxes, _snapshot, _storage, _target
from ._common import EXIT_FAILURE, EXIT_INTERRUPTED, error

__all__ = ["COMMANDS", "build_parser", "doctor_main", "main"]

#: The modules whose ``register(subparsers)`` adds the subcommands, in help order.
COMMANDS = (_run, _target, _sandboxes, _snapshot, _storage, _prune, _doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microsandbox",
        description="Run commands and shells in microVM sandboxes, open the VMs that "
        "pytest --sandbox-keep-failed kept, manage the snapshot cache.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit code."""
    from ..runtime import SandboxError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except SandboxError as exc:
        return error(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `microsandbox snapshot ls | head`
        return EXIT_FAILURE


def doctor_main(argv: Sequence[str] | None = None) -> int:
    """``microsandbox-doctor``, the old name of ``microsandbox doctor``."""
    return main(["doctor", *(sys.argv[1:] if argv is None else argv)])
