"""``microsandbox volume ls|rm`` and ``microsandbox image ls|pull|rm``: the named
volumes and OCI images kept in the cache directory.

``image rm`` deletes an image's pin and the blobs no other image reaches; the
layers already built from it stay, so templates and snapshots booting from
them keep working, and the next sandbox created from it pulls it again. It
refuses an image a running named sandbox was created from, unless ``--force``.
Exit status: 0 done, 1 an image was not found or is in use.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ._common import EXIT_OK, add_json, age, error, human_bytes, print_json, table

__all__ = ["register"]


def register(subparsers: Any) -> None:
    volume = subparsers.add_parser("volume", help="list or remove named volumes")
    vsub = volume.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)
    ls = vsub.add_parser("ls", help="list named volumes: quota, disk use, last use")
    add_json(ls)
    ls.set_defaults(handler=_volume_ls)
    rm = vsub.add_parser("rm", help="delete named volumes and their data")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(handler=_volume_rm)

    image = subparsers.add_parser(
        "image",
        help="list, pull or remove the cached OCI images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    ils = isub.add_parser("ls", help="list cached images: reference, pinned digest, size, last use")
    add_json(ils)
    ils.set_defaults(handler=_image_ls)
    irm = isub.add_parser("rm", help="remove cached images (their pins and unshared blobs)")
    irm.add_argument("references", nargs="+", metavar="REF", help="a reference, path or digest")
    irm.add_argument(
        "-f", "--force", action="store_true", help="remove it even if a running sandbox uses it"
    )
    irm.set_defaults(handler=_image_rm)
    pull = isub.add_parser("pull", help="pull an image (resolving its tag again) and pin it")
    pull.add_argument("reference", metavar="REF", help="e.g. 127.0.0.1:5000/team/app:1.4")
    pull.set_defaults(handler=_image_pull)


def _volume_ls(args: argparse.Namespace) -> int:
    from ..runtime import Volume

    volumes = Volume.list()
    if args.json:
        print_json(
            [
                {
                    "name": v.name,
                    "quota_mb": v.quota_mb,
                    "disk_bytes": v.disk_bytes,
                    "last_used": v.last_used,
                }
                for v in volumes
            ]
        )
        return EXIT_OK
    now = time.time()
    rows = [
        [
            v.name,
            f"{v.quota_mb} MiB",
            human_bytes(v.disk_bytes),
            f"{(now - v.last_used) / 3600:.1f} h",
        ]
        for v in volumes
    ]
    print(table(["NAME", "QUOTA", "ON DISK", "UNUSED FOR"], rows, right=(1, 2, 3)))
    return EXIT_OK


def _volume_rm(args: argparse.Namespace) -> int:
    from ..runtime import Volume

    status = EXIT_OK
    for name in args.names:
        if Volume.remove(name):
            print(name)
        else:
            status = error(f"no named volume {name!r}; list them with: microsandbox volume ls")
    return status


def _image_pull(args: argparse.Namespace) -> int:
    from ..runtime import pull_image

    def progress(what: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            share = f"{100 * done // total:3d}%" if total else human_bytes(done)
            print(f"\r{what[:60]:<60} {share}", end="", file=sys.stderr, flush=True)

    pulled = pull_image(args.reference, pull_policy="always", progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    layers = sum(layer.size for layer in pulled.layers)
    print(f"{args.reference}: {pulled.digest} ({len(pulled.layers)} layers, {human_bytes(layers)})")
    return EXIT_OK


def _image_ls(args: argparse.Namespace) -> int:
    from ..runtime.images import list_images

    images = list_images()
    if args.json:
        print_json([image.to_dict() for image in images])
        return EXIT_OK
    rows = [
        [
            image.reference,
            image.digest[:19],
            human_bytes(image.size_bytes),
            age(image.last_used) + " ago",
            ", ".join([*image.sandboxes, *image.used_by][:3])
            + (" ..." if len(image.sandboxes) + len(image.used_by) > 3 else "")
            or "-",
        ]
        for image in images
    ]
    print(table(["REFERENCE", "DIGEST", "SIZE", "LAST USED", "USED BY"], rows, right=(2,)))
    return EXIT_OK


def _image_rm(args: argparse.Namespace) -> int:
    from ..runtime import ImageError
    from ..runtime.images import remove_image

    status = EXIT_OK
    for reference in args.references:
        try:
            removed = remove_image(reference, force=args.force)
        except ImageError as exc:
            status = error(str(exc))
            continue
        image = removed.image
        print(f"{image.reference}: removed ({human_bytes(removed.freed_bytes)} freed)")
        if image.used_by:
            print(
                f"  {len(image.used_by)} template(s)/snapshot(s) keep their built layers "
                "and still work; microsandbox prune frees them",
                file=sys.stderr,
            )
    return status
