"""The OCI images of the local store, as ``microsandbox image ls|rm`` shows them.

An image of the store is a pin (``<cache>/oci/pins/*.json``, see ``_oci.py``
and ``_local.py``): a pulled reference (``registry/repo:tag``) or an imported
local source (an OCI layout or ``docker save`` archive) with the digest it
resolved to, and the blobs that digest reaches. Its size counts those blobs
(a blob shared with another image counts in both); its last use is the
latest of its pin's (touched on every resolve) and of the last restore of a
template or snapshot booting from the erofs layers built from it.

Removing an image deletes its pin and the blobs no other pin reaches. The
erofs layers already built from it stay in the layer cache, so templates and
snapshots booting from them keep working (they are evicted by the layer
budget, or by ``microsandbox prune``); the next sandbox created from the
reference pulls it again (or fails with ``pull_policy="never"``). An image a
live named sandbox was created from is refused unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .._cache import snapshot_entries
from .._exceptions import ConfigError, ImageError, ImageInUseError, ImageNotFoundError
from ._oci import _blob_path, _complete, oci_dir
from ._prune import _referenced
from ._reference import is_oci_reference, parse_reference
from ._resolve import images_dir
from ._store import image_path
from ._unpack import chain_ids

__all__ = ["RemovedImage", "StoredImage", "find_image", "list_images", "remove_image"]


@dataclass(frozen=True)
class StoredImage:
    """One image of the local OCI store."""

    #: ``registry/repo:tag`` (``@sha256:...``) as pulled, or a local source's path.
    reference: str
    kind: Literal["pulled", "local"]
    #: The digest the reference is pinned to (a manifest or an index).
    digest: str
    #: Bytes of the blobs it reaches (shared blobs count in every image).
    size_bytes: int
    #: Seconds since the epoch: its last resolve, or a restore of what boots from it.
    last_used: float
    #: The pin file (what :func:`remove_image` deletes).
    pin: Path = field(repr=False)
    #: Names of the templates and snapshots booting from layers built from it.
    used_by: tuple[str, ...] = ()
    #: Live named sandboxes created from it (``Sandbox.list()``).
    sandboxes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "reference": self.reference,
            "kind": self.kind,
            "digest": self.digest,
            "size_bytes": self.size_bytes,
            "last_used": self.last_used,
            "used_by": list(self.used_by),
            "sandboxes": list(self.sandboxes),
        }


@dataclass(frozen=True)
class RemovedImage:
    """What :func:`remove_image` did."""

    image: StoredImage
    #: Bytes of the blobs deleted (those no other image reaches).
    freed_bytes: int


def _layer_paths(store: Path, digest: str, reference: str, images: Path) -> set[str]:
    """The erofs layer files built (or to be built) from the image, as paths."""
    try:
        pulled = _complete(store, digest, reference)
    except ImageError:
        return set()
    if pulled is None:
        return set()
    return {
        os.fspath(image_path(images, f"oci-{chain[:16]}", chain))
        for chain in chain_ids(pulled.layers)
    }


def _users(images: Path) -> list[tuple[str, float, set[str]]]:
    """(name, last use, disk paths) of every template and snapshot entry."""
    out = []
    for entry in snapshot_entries(images.parent):
        disks = entry.meta.get("disks")
        paths = {
            d["path"]
            for d in (disks if isinstance(disks, list) else [])
            if isinstance(d, dict) and isinstance(d.get("path"), str)
        }
        name = entry.meta.get("name")
        out.append((name if isinstance(name, str) else "?", entry.last_used, paths))
    return out


def _live_sandboxes(cache_dir: Path | None) -> list[tuple[str, str]]:
    """(name, image) of every live named sandbox of the state store."""
    from .._state import StateStore

    out = []
    with contextlib.suppress(OSError):
        for record in StateStore.default(cache_dir).list():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                image = json.loads(record.config).get("image")
                if isinstance(image, str):
                    out.append((record.name, image))
    return out


def _same_image(stored: str, kind: str, image: str) -> bool:
    """Whether a sandbox's ``image`` names the stored reference or source."""
    if kind == "local":
        return os.path.realpath(os.path.expanduser(image)) == stored
    if not is_oci_reference(image) or image.startswith(("/", ".", "~")):
        return False
    try:
        return str(parse_reference(image)) == stored
    except (ImageError, ConfigError, ValueError):
        return False


def list_images(cache_dir: Path | None = None) -> list[StoredImage]:
    """The images of the local OCI store, most recently used first."""
    store = oci_dir(cache_dir)
    pins = store / "pins"
    if not pins.is_dir():
        return []
    images = images_dir(cache_dir)
    users = _users(images)
    sandboxes = _live_sandboxes(cache_dir)
    out = []
    for pin in pins.glob("*.json"):
        try:
            doc = json.loads(pin.read_text())
            used = pin.stat().st_mtime
        except (OSError, ValueError):
            continue  # removed meanwhile, or a half-written pin
        if not isinstance(doc, dict) or not isinstance(doc.get("digest"), str):
            continue
        kind: Literal["pulled", "local"] = "local" if "source" in doc else "pulled"
        reference = doc.get("source" if kind == "local" else "reference")
        if not isinstance(reference, str):
            continue
        digest = doc["digest"]
        size = 0
        for blob in _referenced(store, digest):
            with contextlib.suppress(OSError, ImageError):
                size += _blob_path(store, blob).stat().st_size
        layers = _layer_paths(store, digest, reference, images)
        # All its layers: a base layer shared with other images does not make them users.
        by = [(name, last) for name, last, paths in users if layers and layers <= paths]
        out.append(
            StoredImage(
                reference=reference,
                kind=kind,
                digest=digest,
                size_bytes=size,
                last_used=max([used, *(last for _, last in by)]),
                pin=pin,
                used_by=tuple(sorted({name for name, _ in by})),
                sandboxes=tuple(
                    sorted(n for n, image in sandboxes if _same_image(reference, kind, image))
                ),
            )
        )
    out.sort(key=lambda i: (-i.last_used, i.reference))
    return out


def find_image(reference: str, cache_dir: Path | None = None) -> StoredImage:
    """The stored image ``reference`` names: as listed, as a sandbox's ``image``
    would spell it, or by a digest (or a prefix of at least 12 hex digits).

    :raises ImageNotFoundError: none, or a digest prefix matching several.
    """
    images = list_images(cache_dir)
    exact = [i for i in images if i.reference == reference or i.digest == reference]
    if not exact:
        exact = [i for i in images if _same_image(i.reference, i.kind, reference)]
    hexpart = reference.removeprefix("sha256:")
    if not exact and len(hexpart) >= 12 and all(c in "0123456789abcdef" for c in hexpart):
        exact = [i for i in images if i.digest.removeprefix("sha256:").startswith(hexpart)]
    if len(exact) != 1:
        what = "several images" if exact else "no image"
        raise ImageNotFoundError(
            f"{what} of the local store match {reference!r}: microsandbox image ls lists "
            "them; name one by its reference or full digest"
        )
    return exact[0]


def remove_image(
    reference: str,
    cache_dir: Path | None = None,
    *,
    force: bool = False,
) -> RemovedImage:
    """Delete the stored image ``reference`` names (see :func:`find_image`): its
    pin, then those of its blobs no other pin reaches.

    :raises ImageNotFoundError: no such image in the store.
    :raises ImageInUseError: a live named sandbox was created from it (``force``
        removes it anyway: the sandbox runs on, from its built layers).
    """
    image = find_image(reference, cache_dir)
    if image.sandboxes and not force:
        raise ImageInUseError(
            f"image {image.reference} is used by running sandbox(es) "
            f"{', '.join(image.sandboxes)}: stop them first (microsandbox rm NAME), or "
            "force it (they run on from their built layers; the next create pulls it again)"
        )
    store = oci_dir(cache_dir)
    image.pin.unlink(missing_ok=True)
    live: set[str] = set()
    for pin in (store / "pins").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            live |= _referenced(store, str(json.loads(pin.read_text())["digest"]))
    freed = 0
    for blob in _referenced(store, image.digest) - live:
        with contextlib.suppress(OSError, ImageError):
            path = _blob_path(store, blob)
            size = path.stat().st_size
            path.unlink()
            freed += size
    return RemovedImage(image, freed)
