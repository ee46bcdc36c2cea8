"""``python -m pytest_microsandbox.runtime.images build host|DIR``: build layers ahead of time."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .._exceptions import ImageError
from ..config import find_project_root
from ._resolve import resolve_root_layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_microsandbox.runtime.images")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find cached) the layers of an image")
    build.add_argument("image", help='"host" or a directory path')
    build.add_argument("--project-root", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.monotonic()
    project = args.project_root or (find_project_root() if args.image == "host" else None)
    try:
        layers = resolve_root_layers(args.image, project_root=project)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for layer in layers:
        size = layer.path.stat().st_size / 1e6
        print(f"{layer.serial:10} {size:9.1f} MB  {layer.description}")
    print(f"{len(layers)} layers ready in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
