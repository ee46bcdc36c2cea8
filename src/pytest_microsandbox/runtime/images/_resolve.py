"""``resolve_root_layers``: an image name to the stack of layers the guest mounts."""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .._exceptions import ImageError
from ..paths import cache_dir as default_cache_dir
from ._auth import ProgressCallback, RegistryAuth
from ._disk import disk_layer
from ._fingerprint import content_fingerprint, tree_fingerprint
from ._host import DEFAULT_USR_EXCLUDES, PROJECT_SERIAL, plan_host_trees, plan_usr
from ._hostlib import host_python_roots, stage_host_libs
from ._layers import LayerSpec, build_layer
from ._local import import_local_image, is_docker_archive, is_oci_layout
from ._model import Layer
from ._oci import ImageConfig, PullPolicy, local_image, pull_image
from ._patches import Patch, stage_patches
from ._reference import is_oci_reference
from ._staging import MOUNT_POINTS, stage_base, stage_mount_points
from ._store import image_intact
from ._unpack import oci_layers, read_image_file
from ._walks import FirstWalkShared, shared_fingerprint

__all__ = [
    "STABLE_LAYER_TTL",
    "image_config_for",
    "images_dir",
    "prewalk_host_trees",
    "project_exclusions",
    "project_layer",
    "resolve_root_layers",
]

#: Seconds a process trusts its last check of the slow-changing layers (/usr,
#: Python prefix, venv, base). Checking them costs ~0.5 s, too much for every
#: sandbox when a restore costs ~0.1 s; the project layer is checked every time.
STABLE_LAYER_TTL = 60.0

_memo_lock = threading.Lock()
_memo: dict[tuple[str, ...], tuple[float, Layer]] = {}


def _memoized(key: tuple[str, ...], build: Callable[[], Layer]) -> Layer:
    now = time.monotonic()
    with _memo_lock:
        hit = _memo.get(key)
    # The tree is trusted for the TTL, not the image: checked against its digest
    # record (one stat while its verified stamp holds), rebuilt by build() if not.
    if hit is not None and hit[0] > now and image_intact(hit[1].path):
        return hit[1]
    layer = build()
    with _memo_lock:
        _memo[key] = (now + STABLE_LAYER_TTL, layer)
    return layer


def images_dir(cache_dir: Path | None = None) -> Path:
    """The directory that holds the erofs images (``<cache>/images``)."""
    path = default_cache_dir(cache_dir) / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _staging_parent(images: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return images


def _staged_layer(
    images: Path, serial: str, label: str, description: str, stage: Callable[[Path], None]
) -> Layer:
    # Staged every time a process resolves the layer (the content decides
    # whether an image is built), so in RAM where there is a tmpfs: its ~700
    # symlinks took 0.6 s in the cache directory here, 3 ms in /dev/shm. Cleaned
    # up even when the build fails; the random name stays out of the digest.
    with tempfile.TemporaryDirectory(dir=_staging_parent(images), prefix=".staging-") as tmp:
        root = Path(tmp)
        stage(root)
        spec = LayerSpec(
            serial=serial,
            label=label,
            description=description,
            source=root,
            fingerprint=lambda: content_fingerprint(root),
            all_root=True,
            identity=(label,),
        )
        return build_layer(spec, images)


def _stable_key(images: Path, spec: LayerSpec) -> tuple[str, ...]:
    return (str(images), spec.serial, spec.family(), *spec.exclude_names)


def _walk_identity(images: Path, spec: LayerSpec) -> tuple[str, ...]:
    return (*_stable_key(images, spec), *map(os.fspath, spec.exclude_paths))


def _is_stable(spec: LayerSpec) -> bool:
    """Not a source tree that changes with every edit (checked on every resolve)."""
    return not spec.serial.startswith((PROJECT_SERIAL, "l-edit"))


def prewalk_host_trees(project_root: Path | None, cache_dir: Path | None = None) -> None:
    """Fingerprint the host's stable trees (venv, Python prefix) through the
    shared walk records (:mod:`._walks`), building nothing: an xdist controller
    does it while its workers start, so that they find the walks done.
    """
    images = images_dir(cache_dir)
    cache = images.parent
    for spec in plan_host_trees(project_root=project_root, cache_dir=cache):
        if _is_stable(spec):
            shared_fingerprint(cache, _walk_identity(images, spec), spec.fingerprint)


def _host_tree_layers(
    images: Path, project_root: Path | None, cache: Path, include_project: bool
) -> list[Layer]:
    """Project, editable installs, venv, Python prefix (those not under /usr)."""

    def stable(spec: LayerSpec) -> Layer:
        key = _stable_key(images, spec)
        # An xdist worker's first walk of a big tree is usually another's (_walks).
        shared = dataclasses.replace(
            spec, fingerprint=FirstWalkShared(cache, _walk_identity(images, spec), spec.fingerprint)
        )
        return _memoized(key, lambda: build_layer(shared, images))

    return [
        # Source trees that change with every edit are checked on every resolve.
        stable(spec) if _is_stable(spec) else build_layer(spec, images)
        for spec in plan_host_trees(project_root=project_root, cache_dir=cache)
        if include_project or spec.serial != PROJECT_SERIAL
    ]


def _host_layers(
    images: Path,
    project_root: Path | None,
    cache: Path,
    usr_excludes: Sequence[str],
    include_project: bool = True,
) -> list[Layer]:
    trees = _host_tree_layers(images, project_root, cache, include_project)
    base = _memoized(
        (str(images), "l-base"),
        lambda: _staged_layer(
            images, "l-base", "base", "/etc and skeleton (generated)", stage_base
        ),
    )
    usr_spec = plan_usr(usr_excludes=usr_excludes)
    usr = _memoized((str(images), "l-usr", *usr_excludes), lambda: build_layer(usr_spec, images))
    return [*trees, base, usr]


def _host_python_layers(
    images: Path, project_root: Path | None, cache: Path, include_project: bool
) -> list[Layer]:
    """The host's project, venv and Python prefix (as ``"host"`` stacks them) and
    its loader and libraries (``l-hostlib``), to stack over another image.
    """
    host_python_roots()  # refuses a Python under /usr before anything is built
    layers = _host_tree_layers(images, project_root, cache, include_project)
    hostlib = _memoized(
        (str(images), "l-hostlib"),
        lambda: _staged_layer(
            images,
            "l-hostlib",
            "hostlib",
            "host loader and libraries",
            functools.partial(stage_host_libs, memo=images / "hostlib-ldd.json"),
        ),
    )
    return [*layers, hostlib]


def _skel_layer(images: Path) -> Layer:
    """Mount points only, below an image that may lack them (OCI, disk)."""
    return _memoized(
        (str(images), "l-skel"),
        lambda: _staged_layer(
            images, "l-skel", "skel", "mount points (generated)", stage_mount_points
        ),
    )


def _directory_layers(images: Path, directory: Path) -> list[Layer]:
    spec = LayerSpec(
        serial="l-root",
        label="dir",
        description=f"{directory} (directory)",
        source=directory,
        fingerprint=lambda: tree_fingerprint(directory),
    )
    layers = [build_layer(spec, images)]
    missing = [rel for rel, _ in MOUNT_POINTS if not (directory / rel).exists()]
    if missing:
        # Below the directory's own layer: it only adds what is missing.
        layers.append(
            _staged_layer(images, "l-skel", "skel", "mount points (generated)", stage_mount_points)
        )
    return layers


def resolve_root_layers(
    image: str,
    *,
    project_root: Path | None = None,
    cache_dir: Path | None = None,
    usr_excludes: Sequence[str] | None = None,
    include_project: bool = True,
    pull_policy: PullPolicy = "if-missing",
    registry_auth: RegistryAuth | None = None,
    progress: ProgressCallback | None = None,
    patches: Sequence[Patch] = (),
    scripts: Mapping[str, str] | None = None,
    disk_fstype: str = "auto",
    disk_partition: int | None = None,
    host_python: bool = False,
) -> list[Layer]:
    """Return the read-only layers of a guest root, top layer first, building what is stale.

    ``image`` is ``"host"`` (the host's own userspace: project, venv, Python
    prefix, generated /etc + skeleton, /usr) or the path of a local directory
    whose contents become the root. ``usr_excludes`` (absolute globs) replaces
    :data:`DEFAULT_USR_EXCLUDES` for the host's /usr layer. ``include_project=False``
    leaves out the project's own layer but still treats the project as imaged
    (editable installs inside it get no layer of their own): see
    :func:`project_layer`.

    Anything else shaped like an image reference (``registry/repo:tag``,
    ``...@sha256:...``) is an OCI image, pulled per ``pull_policy`` (with
    ``registry_auth`` or ``~/.docker/config.json``; ``progress`` sees the
    download), each layer an erofs image cached by its chain id.

    ``patches`` and ``scripts`` go into one more layer on top (``l-patch``),
    built from their content; the image's own layers stay as they are.

    ``host_python`` (an image other than ``"host"``): the host's project (per
    ``include_project``), venv and Python prefix go on top of the image at
    their host paths, and the host's loader and libraries in ``/.msb/hostlib``
    (see :mod:`._hostlib`): what the guest runner of marked tests needs.
    """
    layers = _image_layers(
        image,
        project_root=project_root,
        cache_dir=cache_dir,
        usr_excludes=usr_excludes,
        include_project=include_project,
        pull_policy=pull_policy,
        registry_auth=registry_auth,
        progress=progress,
        disk_fstype=disk_fstype,
        disk_partition=disk_partition,
    )
    if host_python and image != "host":
        images = images_dir(cache_dir)
        layers = [
            *_host_python_layers(images, project_root, images.parent, include_project),
            *layers,
        ]
    if not patches and not scripts:
        return layers
    images = images_dir(cache_dir)
    read_base = _base_reader(image, cache_dir)
    patch = _staged_layer(
        images,
        "l-patch",
        "patch",
        "patches and scripts",
        lambda root: stage_patches(root, patches, scripts or {}, read_base),
    )
    return [patch, *layers]


def _base_reader(image: str, cache_dir: Path | None) -> Callable[[str], bytes | None]:
    """How an append patch reads the image's own version of a file."""

    def read_file(path: Path) -> bytes | None:
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError:
            return None

    def read(guest_path: str) -> bytes | None:
        rel = guest_path.lstrip("/")
        if image == "host":
            if rel.startswith("etc/"):
                with tempfile.TemporaryDirectory(prefix=".base-") as tmp:
                    stage_base(Path(tmp))
                    return read_file(Path(tmp) / rel)
            return read_file(Path("/") / rel)
        if is_oci_reference(image) and not image.startswith(("/", ".", "~")):
            pulled = local_image(image, cache_dir)
            return None if pulled is None else read_image_file(pulled, guest_path)
        return read_file(Path(image).expanduser() / rel)

    return read


def _image_layers(
    image: str,
    *,
    project_root: Path | None,
    cache_dir: Path | None,
    usr_excludes: Sequence[str] | None,
    include_project: bool,
    pull_policy: PullPolicy,
    registry_auth: RegistryAuth | None,
    progress: ProgressCallback | None,
    disk_fstype: str,
    disk_partition: int | None = None,
) -> list[Layer]:
    images = images_dir(cache_dir)
    if image == "host":
        excludes = DEFAULT_USR_EXCLUDES if usr_excludes is None else tuple(usr_excludes)
        return _host_layers(images, project_root, images.parent, excludes, include_project)
    candidate = Path(image).expanduser()
    # Path-like names get path errors; anything else that does not exist is
    # an unsupported image name (registry refs contain "/" too).
    if image.startswith(("/", ".", "~")) or candidate.exists():
        if not candidate.exists():
            raise ImageError(
                f"image directory {candidate} does not exist; create it or fix the path"
            )
        if is_oci_layout(candidate) or is_docker_archive(candidate):
            local = import_local_image(candidate, images.parent)
            return [*oci_layers(local, images), _skel_layer(images)]
        if candidate.is_file():
            disk = disk_layer(candidate, images, fstype=disk_fstype, partition=disk_partition)
            return [disk, _skel_layer(images)]
        if not candidate.is_dir():
            raise ImageError(
                f"image {candidate} is neither a directory nor a disk image file; pass a "
                "directory whose contents become the guest's root, or a disk image"
            )
        resolved = candidate.resolve()
        if resolved == Path("/"):
            raise ImageError('refusing to image / as a directory; use image="host" instead')
        return _directory_layers(images, resolved)
    if is_oci_reference(image):
        pulled = pull_image(
            image,
            pull_policy=pull_policy,
            auth=registry_auth,
            cache_dir=images.parent,
            progress=progress,
        )
        return [*oci_layers(pulled, images), _skel_layer(images)]
    raise ImageError(
        f'unsupported image {image!r}: use "host", the path of a local directory, or an '
        f"OCI image reference such as registry.example:5000/team/app:1.0 (no directory "
        f"{image!r} exists here)"
    )


@functools.lru_cache(maxsize=64)
def _local_config(
    candidate: Path, _size: int, _mtime_ns: int, cache_dir: Path | None
) -> ImageConfig | None:
    # Keyed by size and mtime too: listing a docker archive reads all its headers.
    if is_oci_layout(candidate) or is_docker_archive(candidate):
        return import_local_image(candidate, cache_dir).config
    return None


def image_config_for(image: str, cache_dir: Path | None = None) -> ImageConfig | None:
    """The OCI config (env, workdir, user, entrypoint) of ``image`` as the local
    store has it (no network), or None for images without one (host, directories,
    disk images) or not pulled yet.
    """
    if image == "host":
        return None
    candidate = Path(image).expanduser()
    if image.startswith(("/", ".", "~")) or candidate.exists():
        try:
            st = candidate.stat()
        except OSError:
            return None
        return _local_config(candidate, st.st_size, st.st_mtime_ns, cache_dir)
    if not is_oci_reference(image):
        return None
    pulled = local_image(image, cache_dir)
    return None if pulled is None else pulled.config


def project_exclusions(
    project_root: Path, cache_dir: Path | None = None
) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """What the project's layer leaves out: (absolute paths, names at any depth),
    for callers that copy the project's files in one by one.
    """
    images = images_dir(cache_dir)
    for spec in plan_host_trees(project_root=project_root, cache_dir=images.parent):
        if spec.serial == PROJECT_SERIAL:
            return spec.exclude_paths, spec.exclude_names
    raise ImageError(f"{project_root} has no project layer")  # pragma: no cover


def project_layer(project_root: Path, cache_dir: Path | None = None) -> Layer:
    """The project's own layer (built unless current), as ``resolve_root_layers``
    would stack it: for callers that left it out of the root and copy it in.
    """
    images = images_dir(cache_dir)
    for spec in plan_host_trees(project_root=project_root, cache_dir=images.parent):
        if spec.serial == PROJECT_SERIAL:
            return build_layer(spec, images)
    raise ImageError(f"{project_root} has no project layer")  # pragma: no cover
