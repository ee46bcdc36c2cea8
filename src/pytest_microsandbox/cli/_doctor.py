"""``microsandbox doctor``: what was found on this host (QEMU, the guest kernel, the
agent, the accelerator and why) and, when a sandbox could not start here, the
fix for each missing piece. Exit code 1 when something is missing.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_FAILURE, EXIT_OK, add_json, print_json

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check this host can run sandboxes, and say how to fix it",
        description=__doc__,
    )
    p.add_argument("--no-probe", action="store_true", help="do not boot the KVM probe VM")
    add_json(p)
    p.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from ..runtime.doctor import diagnose

    report = diagnose(probe=not args.no_probe)
    if args.json:
        print_json({"ok": report.ok, "facts": dict(report.facts), "problems": report.problems})
    else:
        print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILURE
