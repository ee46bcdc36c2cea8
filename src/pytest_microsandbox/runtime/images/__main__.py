"""``python -m pytest_microsandbox.runtime.images build host|DIR | prune [--max-mb N] | verify``.

``build`` builds layers ahead of time; ``prune`` evicts the least recently
used images beyond a disk budget, as every build does on its own; ``verify``
hashes every cached image and initramfs archive in full against the digest
recorded at its build (a use only compares a stamp: this finds what changed
below the filesystem) and exits non-zero if one is corrupt (it is rebuilt on
its next use).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from .._exceptions import ImageError
from .._integrity import IntegrityMismatch, verify_file
from ..config import find_project_root
from ..paths import cache_dir
from ._resolve import images_dir, resolve_root_layers
from ._store import (
    IMAGE_BUDGET_ENV,
    RECENT_USE_GRACE,
    cached_images,
    image_budget_bytes,
    prune_images,
    verify_images,
)


def _mib(value: str) -> float:
    try:
        mib = float(value)
    except ValueError:
        mib = math.nan
    if not math.isfinite(mib) or mib < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of MiB >= 0")
    return mib


def _build(image: str, project_root: Path | None) -> int:
    start = time.monotonic()
    project = project_root or (find_project_root() if image == "host" else None)
    layers = resolve_root_layers(image, project_root=project)
    for layer in layers:
        size = layer.path.stat().st_size / 1e6
        print(f"{layer.serial:10} {size:9.1f} MB  {layer.description}")
    print(f"{len(layers)} layers ready in {time.monotonic() - start:.1f} s")
    return 0


def _prune(max_mib: float | None) -> int:
    budget = image_budget_bytes() if max_mib is None else int(max_mib * 2**20)
    images = images_dir()
    result = prune_images(images, max_bytes=budget)
    for image in result.removed:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(image.last_used))
        print(f"removed {image.path.name}  {image.disk_bytes / 2**20:9.1f} MiB  last used {used}")
    kept = cached_images(images)
    print(
        f"{images}: {result.bytes_before / 2**20:.1f} MiB before, "
        f"{result.bytes_after / 2**20:.1f} MiB after (budget {budget / 2**20:.0f} MiB); "
        f"{len(result.removed)} removed, {len(kept)} kept"
    )
    if result.bytes_after > budget:
        now = time.time()
        recent = sum(now - i.last_used < RECENT_USE_GRACE for i in kept)
        print(
            f"still over budget: {recent} images were used in the last "
            f"{RECENT_USE_GRACE / 60:.0f} minutes, {sum(i.pinned for i in kept)} belong to "
            "named snapshots (remove those with Snapshot.remove(name))"
        )
    return 0


def _verify() -> int:
    start = time.monotonic()
    results = verify_images(images_dir())
    for archive in sorted((cache_dir() / "initramfs").glob("initramfs-*.cpio")):
        try:
            verify_file(archive, full=True)
        except FileNotFoundError:
            continue
        except IntegrityMismatch as exc:
            results.append((archive, exc.reason))
        else:
            results.append((archive, None))
    bad = [(path, problem) for path, problem in results if problem is not None]
    for path, problem in bad:
        print(f"CORRUPT {path}: {problem} (rebuilt on its next use)")
    print(
        f"{len(results)} files hashed in {time.monotonic() - start:.1f} s, {len(bad)} corrupt "
        "(snapshot entries are checked on use; $MICROSANDBOX_VERIFY_CACHE=1 hashes "
        "everything on every use)"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_microsandbox.runtime.images")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find cached) the layers of an image")
    build.add_argument("image", help='"host" or a directory path')
    build.add_argument("--project-root", type=Path, default=None)
    prune = sub.add_parser(
        "prune", help="remove the least recently used images beyond a disk budget"
    )
    prune.add_argument(
        "--max-mb",
        type=_mib,
        default=None,
        help=f"budget in MiB (default: ${IMAGE_BUDGET_ENV}, else 4096)",
    )
    sub.add_parser(
        "verify", help="hash every cached image and initramfs against its recorded digest"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prune":
            return _prune(args.max_mb)
        if args.command == "verify":
            return _verify()
        return _build(args.image, args.project_root)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
