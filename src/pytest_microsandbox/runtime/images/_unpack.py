"""OCI layers to read-only erofs images, whiteouts translated for overlayfs.

Each layer becomes one erofs image, cached by its chain id (the digests of
the layer and of every layer below it, as Docker keys its layer store): the
guest stacks them in one overlay, so layers are shared by every image and
template built on the same base. OCI marks deletions inside the tar:

- ``dir/.wh.NAME`` deletes ``dir/NAME`` from the layers below: overlayfs
  reads a character device 0/0 named ``NAME`` as that (a "whiteout"; the
  kernel lets an unprivileged user create exactly this device node);
- ``dir/.wh..wh..opq`` hides everything ``dir`` held below ("opaque"):
  overlayfs's marker for that is a ``trusted.*`` xattr only root may set, so
  every entry of the lower layers under ``dir`` that this layer does not
  provide gets a whiteout of its own. That is why an image depends on the
  layers below it, and why the key is the chain id.

Layer tars are untrusted: every member is checked to land inside the
staging directory (no ``..``, no path through a symlink out of it, no
hard link to a file outside it); device nodes are skipped (the guest has a
devtmpfs on /dev).
"""

from __future__ import annotations

import contextvars
import functools
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .._exceptions import ImageError
from .._keys import digest_parts
from ..progress import stage
from ._mkfs import build_erofs
from ._model import Layer
from ._oci import LayerBlob, PulledImage
from ._store import ensure_image, image_path, logger, usable_image

__all__ = [
    "LAYER_WORKERS_ENV",
    "UNPACK_VERSION",
    "chain_ids",
    "layer_workers",
    "oci_layers",
    "read_image_file",
    "unpack_layer",
]

#: Bumped whenever the way layers are translated changes.
UNPACK_VERSION = 1

#: Bytes of file data one layer may unpack to (a small gzip can claim far more).
MAX_UNPACKED_BYTES = 64 << 30

_WH = ".wh."
_OPAQUE = ".wh..wh..opq"


def chain_ids(layers: Iterable[LayerBlob]) -> list[str]:
    """The chain id of each layer, bottom first."""
    out: list[str] = []
    parent = f"oci-unpack-{UNPACK_VERSION}"
    for layer in layers:
        parent = digest_parts(parent, layer.digest)
        out.append(parent)
    return out


def _clean_name(name: str) -> str | None:
    """The member's path relative to the layer root, or None for the root itself."""
    path = posixpath.normpath("/" + name).lstrip("/")
    if path in ("", "."):
        return None
    return path


def _open(blob: LayerBlob) -> tarfile.TarFile:
    try:
        return tarfile.open(blob.path, mode="r|*")
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"layer {blob.digest} is not a readable tar archive: {exc}") from exc


def _listing(blob: LayerBlob) -> tuple[set[str], set[str], set[str]]:
    """``(paths, whiteouts, opaque dirs)`` of one layer tar, names only."""
    paths: set[str] = set()
    whiteouts: set[str] = set()
    opaque: set[str] = set()
    with _open(blob) as tar:
        for member in tar:
            name = _clean_name(member.name)
            if name is None:
                continue
            parent, base = posixpath.split(name)
            if base == _OPAQUE:
                opaque.add(parent)
            elif base.startswith(_WH):
                whiteouts.add(posixpath.join(parent, base[len(_WH) :]))
            else:
                paths.add(name)
    return paths, whiteouts, opaque


def _under(path: str, directory: str) -> bool:
    return directory == "" or path.startswith(directory + "/")


def _merged_paths(lowers: Iterable[LayerBlob]) -> set[str]:
    """Every path the stack of ``lowers`` (bottom first) shows."""
    merged: set[str] = set()
    for blob in lowers:
        paths, whiteouts, opaque = _listing(blob)
        for directory in opaque:
            merged = {p for p in merged if not _under(p, directory)}
        for gone in whiteouts:
            merged = {p for p in merged if p != gone and not _under(p, gone)}
        merged |= paths
        # A path's ancestors are shown too (tars normally list them anyway).
        for path in paths:
            parent = posixpath.dirname(path)
            while parent and parent not in merged:
                merged.add(parent)
                parent = posixpath.dirname(parent)
    return merged


def _inside(root: Path, rel: str) -> bool:
    real = os.path.realpath(root / rel)
    return real == os.fspath(root) or real.startswith(os.fspath(root) + os.sep)


def _whiteout(root: Path, rel: str) -> None:
    target = root / rel
    parent = target.parent
    if not _inside(root, posixpath.dirname(rel) or "."):
        raise ImageError(f"whiteout {rel!r} points outside the layer: refused")
    parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        return  # the layer provides the path itself: no deletion to record
    try:
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    except PermissionError as exc:
        raise ImageError(
            f"cannot create the overlayfs whiteout for {rel!r}: {exc}. Linux >= 5.8 lets "
            "any user create one; on an older kernel, run as root"
        ) from exc


def unpack_layer(blob: LayerBlob, root: Path, lowers: list[LayerBlob]) -> None:
    """Extract ``blob`` into the empty directory ``root``, translating whiteouts.

    ``lowers`` are the layers below (bottom first), read only when this layer
    has an opaque directory.

    :raises ImageError: the tar is unreadable, or a member would leave ``root``.
    """
    root = Path(os.path.realpath(root))
    whiteouts: list[str] = []
    opaque: list[str] = []
    provided: set[str] = set()
    unpacked = [0]

    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        name = _clean_name(member.name)
        if name is None:
            return None
        parent, base = posixpath.split(name)
        if base == _OPAQUE:
            opaque.append(parent)
            return None
        if base.startswith(_WH):
            whiteouts.append(posixpath.join(parent, base[len(_WH) :]))
            return None
        unpacked[0] += member.size
        if unpacked[0] > MAX_UNPACKED_BYTES:
            raise ImageError(
                f"layer {blob.digest} unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB: refused"
            )
        if member.ischr() or member.isblk():
            logger.debug("layer %s: skipping device node %s", blob.digest, name)
            return None
        try:
            # Path checks only (inside dest, not through a symlink out of it);
            # the member keeps its mode, setuid bits included.
            checked = tarfile.tar_filter(member.replace(name=name, deep=False), dest)
        except tarfile.FilterError as exc:
            raise ImageError(f"layer {blob.digest}: member {member.name!r} refused: {exc}") from exc
        out = checked.replace(mode=member.mode, deep=False)
        if member.islnk():
            link = _clean_name(member.linkname)
            if link is None or not _inside(root, link):
                raise ImageError(
                    f"layer {blob.digest}: hard link {name!r} -> {member.linkname!r} leaves "
                    "the layer: refused"
                )
            out = out.replace(linkname=link, deep=False)
        provided.add(name)
        return out

    try:
        with _open(blob) as tar:
            tar.extractall(root, filter=check, numeric_owner=True)
    except (tarfile.TarError, OSError, EOFError, KeyError) as exc:
        # KeyError: a hard link to a member the layer does not hold.
        raise ImageError(f"unpacking layer {blob.digest} failed: {exc}") from exc
    for rel in whiteouts:
        _whiteout(root, rel)
    if opaque:
        lower_paths = _merged_paths(lowers)
        for directory in opaque:
            if not _inside(root, directory):
                raise ImageError(f"opaque directory {directory!r} points outside the layer")
            (root / directory).mkdir(parents=True, exist_ok=True)
            shown = provided | {directory}
            for path in sorted(lower_paths):
                # A whiteout where the parent is this layer's: deeper paths are
                # hidden by it, or by a whiteout of an ancestor.
                if (
                    _under(path, directory)
                    and path not in provided
                    and posixpath.dirname(path) in shown
                ):
                    _whiteout(root, path)


def _build(blob: LayerBlob, lowers: list[LayerBlob], images: Path, family: str, tmp: Path) -> None:
    # Unpacked beside the images (a layer can be large: not in /dev/shm). We
    # hold the family's lock here, so a staging dir of the family left by a
    # killed build is nobody's: removed first.
    for stale in images.glob(f".unpack-{family}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=images, prefix=f".unpack-{family}-") as staging:
        root = Path(staging)
        root.chmod(0o755)
        unpack_layer(blob, root, lowers)
        # Unprivileged, extraction cannot chown: the image then says root.
        build_erofs(root, tmp, all_root=os.geteuid() != 0)


#: How many layers are converted at once: ``$MICROSANDBOX_LAYER_WORKERS``, or
#: the CPUs this process may run on. Each conversion is mostly one process
#: (gzip in Python, then ``mkfs.erofs``) that uses one core.
LAYER_WORKERS_ENV = "MICROSANDBOX_LAYER_WORKERS"


def layer_workers() -> int:
    """How many layers :func:`oci_layers` converts at once (at least 1).

    :raises ImageError: ``$MICROSANDBOX_LAYER_WORKERS`` is not a whole number >= 1.
    """
    raw = os.environ.get(LAYER_WORKERS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ImageError(
                f"{LAYER_WORKERS_ENV}={raw!r} is not a whole number >= 1 (layers converted "
                "at once); unset it to use one per CPU"
            )
        return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def oci_layers(image: PulledImage, images: Path, *, workers: int | None = None) -> list[Layer]:
    """The erofs layers of ``image``, top first (as the guest stacks them).

    Layers not cached yet are converted in parallel, ``workers`` at a time
    (default :func:`layer_workers`), under one ``pull`` stage whose steps count
    the layers done; each conversion is a ``layer`` stage inside it. A layer
    depends only on the blobs below it (opaque directories read them), never
    on their images, so any order is fine.
    """
    blobs = list(image.layers)
    jobs: list[tuple[str, str, Callable[[Path], None], str]] = []
    for index, (blob, chain) in enumerate(zip(blobs, chain_ids(blobs), strict=True)):
        family = f"oci-{chain[:16]}"
        jobs.append(
            (
                family,
                chain,
                functools.partial(_build, blob, blobs[:index], images, family),
                f"layer {index + 1}/{len(blobs)} of {image.reference} ({blob.digest[:19]})",
            )
        )

    def ensure(job: tuple[str, str, Callable[[Path], None], str]) -> Path:
        family, chain, build, description = job
        return ensure_image(images, family, chain, build, description=description)

    missing = [j for j in jobs if not usable_image(image_path(images, j[0], j[1]))]
    if missing:
        count = min(len(missing), workers or layer_workers())
        what = f"image {image.reference} (converting {len(missing)} layers to erofs)"
        with stage("pull", what) as reporter:
            reporter.step(f"0 of {len(missing)} layers converted", 0, len(missing))
            # Each task runs in a copy of this context: its layer stage is a
            # child of this one (a Context cannot be entered by two threads).
            with ThreadPoolExecutor(count, thread_name_prefix="msb-layer") as pool:
                futures = [
                    pool.submit(contextvars.copy_context().run, ensure, job) for job in missing
                ]
                for done, _ in enumerate(as_completed(futures), 1):
                    reporter.step(f"{done} of {len(missing)} layers converted", done, len(missing))
                for future in futures:
                    future.result()  # the first failure, after the others finished
            reporter.size = sum(image_path(images, j[0], j[1]).stat().st_size for j in missing)
    out = [
        Layer(
            serial=f"l-oci{index}",
            path=ensure(job),  # cached now: marks it used, rebuilds one evicted meanwhile
            digest=job[1],
            description=f"{image.reference} layer {index + 1}",
        )
        for index, job in enumerate(jobs)
    ]
    out.reverse()
    return out


#: The largest base file an append patch reads out of a layer.
MAX_APPEND_BASE = 16 << 20


def read_image_file(image: PulledImage, guest_path: str) -> bytes | None:
    """The regular file ``guest_path`` as ``image`` shows it (top layer first,
    whiteouts and opaque directories honoured), or None. For append patches.
    """
    rel = _clean_name(guest_path)
    if rel is None:
        return None
    ancestors = []
    parent = posixpath.dirname(rel)
    while parent:
        ancestors.append(parent)
        parent = posixpath.dirname(parent)
    for blob in reversed(image.layers):
        hidden = False
        with _open(blob) as tar:
            for member in tar:
                name = _clean_name(member.name)
                if name is None:
                    continue
                head, base = posixpath.split(name)
                if (base == _OPAQUE and head in ancestors) or (
                    base.startswith(_WH)
                    and posixpath.join(head, base[len(_WH) :]) in (rel, *ancestors)
                ):
                    hidden = True
                elif name == rel:
                    if not member.isfile() or member.size > MAX_APPEND_BASE:
                        return None
                    data = tar.extractfile(member)
                    return None if data is None else data.read()
        if hidden:
            return None
    return None
