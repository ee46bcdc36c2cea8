"""OCI images: pull (oras), pin, store blobs by digest, read the image config.

The local store lives in ``<cache>/oci``: ``blobs/sha256/<hex>`` (every blob
checked against its digest on arrival, published by rename) and ``pins/``
(one small JSON file per ``registry/repo:tag``: the digest the tag resolved
to). A tag is resolved once and pinned: with ``pull_policy="if-missing"`` a
sandbox created after the tag moved still gets the pinned digest;
``"always"`` resolves it again; ``"never"`` uses only the local store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .._exceptions import ImageError, ImageNotFoundError, ImagePlatformError
from .._keys import digest_parts
from .._locks import cache_lock, cache_lock_timeout
from ..paths import cache_dir as default_cache_dir
from ..progress import Stage, stage
from ._auth import ProgressCallback, RegistryAuth
from ._reference import ImageReference, parse_reference

if TYPE_CHECKING:
    from ._registry import RegistryClient

__all__ = [
    "LAYER_TYPES",
    "ImageConfig",
    "LayerBlob",
    "PullPolicy",
    "PulledImage",
    "local_image",
    "log_pull_progress",
    "oci_dir",
    "pull_image",
]

logger = logging.getLogger("pytest_microsandbox.images")

PullPolicy = Literal["always", "if-missing", "never"]

#: Layer media types we unpack (tarfile reads gzip, and plain tar).
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
_MAX_CONFIG_BYTES = 1 << 20
#: A manifest or index bigger than this is refused (a registry is untrusted).
MAX_MANIFEST_BYTES = 4 << 20
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
#: More layers than this do not fit the VM's virtio-mmio slots beside its
#: other devices; such an image must be squashed.
MAX_LAYERS = 12
#: A layer blob a registry announces larger than this is refused (it is untrusted).
MAX_LAYER_BYTES = 16 << 30


class ImageConfig(BaseModel):
    """What the image's config says about running it (OCI ``config`` section)."""

    model_config = ConfigDict(frozen=True)

    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerBlob:
    """One layer of a pulled image: its blob in the local store."""

    digest: str
    media_type: str
    size: int
    path: Path


@dataclass(frozen=True)
class PulledImage:
    """An image whose manifest, config and layers are all in the local store."""

    reference: str
    #: The digest pinned for the reference (an index's, when it was one).
    digest: str
    #: The linux/amd64 image manifest's digest.
    manifest_digest: str
    config: ImageConfig
    layers: tuple[LayerBlob, ...]


_progress_lock = threading.Lock()
_progress_logged: dict[str, float] = {}


def log_pull_progress(what: str, done: int, total: int) -> None:
    """The default progress callback: an INFO log line per blob every 2 s and at its end."""
    now = time.monotonic()
    with _progress_lock:
        last = _progress_logged.get(what)
        if done < total and last is not None and now - last < 2.0:
            return
        _progress_logged[what] = now
        if done >= total:
            _progress_logged.pop(what, None)
    logger.info("pulling %s: %.1f of %.1f MiB", what, done / 2**20, total / 2**20)


def oci_dir(cache_dir: Path | None = None) -> Path:
    """The local OCI store (``<cache>/oci``)."""
    return default_cache_dir(cache_dir) / "oci"


def _blob_path(store: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ImageError(f"unsupported or malformed digest {digest!r} (sha256 only)")
    return store / "blobs" / "sha256" / hexdigest


def _pin_path(store: Path, ref: ImageReference) -> Path:
    key = digest_parts(ref.name, ref.tag or "", ref.digest or "", length=32)
    return store / "pins" / f"{key}.json"


def _publish(data: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


def _store_bytes(store: Path, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    path = _blob_path(store, digest)
    if not path.exists():
        _publish(data, path)
    return digest


def _read_blob(store: Path, digest: str, limit: int) -> bytes | None:
    path = _blob_path(store, digest)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    if len(data) > limit or f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        path.unlink(missing_ok=True)  # corrupt: fetched again
        return None
    return data


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _is_index(doc: Mapping[str, Any], media_type: str = "") -> bool:
    return doc.get("mediaType", media_type) in INDEX_TYPES or (
        "manifests" in doc and "layers" not in doc
    )


def _pick_amd64(index: Mapping[str, Any], ref: str) -> str:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"image index of {ref} has no manifest list")
    seen = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        platform = entry.get("platform") or {}
        arch, osname = platform.get("architecture"), platform.get("os")
        seen.append(f"{osname}/{arch}")
        if arch == "amd64" and osname == "linux" and isinstance(entry.get("digest"), str):
            return str(entry["digest"])
    raise ImagePlatformError(
        f"image {ref} has no linux/amd64 variant (it has: {', '.join(seen) or 'none'}); "
        "the guest is an x86-64 Linux VM: use an image built for linux/amd64"
    )


def _parse_config(data: bytes, ref: str) -> tuple[ImageConfig, str, str]:
    doc = _json(data, f"config of {ref}")
    inner = doc.get("config") or {}
    if not isinstance(inner, dict):
        inner = {}
    env: dict[str, str] = {}
    for item in inner.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            env[key] = value

    def strings(value: Any) -> tuple[str, ...]:
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

    workdir = inner.get("WorkingDir")
    user = inner.get("User")
    config = ImageConfig(
        env=env,
        workdir=workdir if isinstance(workdir, str) and workdir.startswith("/") else None,
        user=user if isinstance(user, str) and user else None,
        entrypoint=strings(inner.get("Entrypoint")),
        cmd=strings(inner.get("Cmd")),
    )
    return config, str(doc.get("architecture", "")), str(doc.get("os", ""))


def _layers_of(store: Path, manifest: Mapping[str, Any], ref: str) -> list[LayerBlob]:
    raw = manifest.get("layers")
    if not isinstance(raw, list):
        raise ImageError(f"manifest of {ref} has no layer list")
    if len(raw) > MAX_LAYERS:
        raise ImageError(
            f"image {ref} has {len(raw)} layers, more than the {MAX_LAYERS} a guest can "
            "mount: squash it (e.g. docker build --squash, or one RUN per stage)"
        )
    out = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ImageError(f"manifest of {ref} has a malformed layer entry")
        media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
        if media_type not in LAYER_TYPES:
            raise ImageError(
                f"image {ref} has a layer of type {media_type!r}, which cannot be unpacked "
                f"here (supported: {', '.join(LAYER_TYPES)})"
            )
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise ImageError(f"manifest of {ref} has a layer without digest or size")
        if size > MAX_LAYER_BYTES:
            raise ImageError(
                f"image {ref} has a layer of {size} bytes, over the {MAX_LAYER_BYTES >> 30} GiB "
                "a layer may have here: use a smaller image"
            )
        out.append(LayerBlob(digest, media_type, size, _blob_path(store, digest)))
    return out


def _complete(store: Path, digest: str, ref: str) -> PulledImage | None:
    """The image from the local store alone, or None if something is missing."""
    top = _read_blob(store, digest, MAX_MANIFEST_BYTES)
    if top is None:
        return None
    doc = _json(top, f"manifest of {ref}")
    manifest_digest = digest
    if _is_index(doc):
        manifest_digest = _pick_amd64(doc, ref)
        data = _read_blob(store, manifest_digest, MAX_MANIFEST_BYTES)
        if data is None:
            return None
        doc = _json(data, f"manifest of {ref}")
    cfg = doc.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("digest"), str):
        raise ImageError(f"manifest of {ref} has no config")
    cfg_data = _read_blob(store, cfg["digest"], _MAX_CONFIG_BYTES)
    if cfg_data is None:
        return None
    config, arch, osname = _parse_config(cfg_data, ref)
    if (arch, osname) != ("amd64", "linux"):
        raise ImagePlatformError(
            f"image {ref} is {osname}/{arch}, not linux/amd64: the guest is an x86-64 "
            "Linux VM; use an image (or an index entry) built for linux/amd64"
        )
    layers = _layers_of(store, doc, ref)
    if not all(layer.path.exists() for layer in layers):
        return None
    return PulledImage(ref, digest, manifest_digest, config, tuple(layers))


def _read_pin(store: Path, ref: ImageReference) -> str | None:
    try:
        doc = json.loads(_pin_path(store, ref).read_text())
    except (OSError, ValueError):
        return None
    digest = doc.get("digest") if isinstance(doc, dict) else None
    return digest if isinstance(digest, str) else None


def _write_pin(store: Path, ref: ImageReference, digest: str) -> None:
    _publish(json.dumps({"reference": str(ref), "digest": digest}).encode(), _pin_path(store, ref))


def _touch_pin(store: Path, ref: ImageReference) -> None:
    with contextlib.suppress(OSError):
        os.utime(_pin_path(store, ref))  # last use, for pruning


def local_image(reference: str, cache_dir: Path | None = None) -> PulledImage | None:
    """The image ``reference`` as pinned and stored locally, or None (no network)."""
    ref = parse_reference(reference)
    store = oci_dir(cache_dir)
    digest = ref.digest or _read_pin(store, ref)
    return None if digest is None else _complete(store, digest, str(ref))


def _fetch(
    client: RegistryClient,
    store: Path,
    ref: ImageReference,
    progress: ProgressCallback | None,
    reporter: Stage,
) -> str:
    """Resolve ``ref`` on the registry, store its manifests, config and layers;
    return the top-level digest (what the tag is pinned to). ``reporter`` gets a
    step per chunk of every blob downloaded (bytes done and total of that blob).
    """
    what = ref.digest or ref.tag or "latest"
    body, media_type = client.get_manifest(what)
    digest = _store_bytes(store, body)
    if ref.digest and digest != ref.digest:
        raise ImageError(
            f"registry {ref.registry} answered {ref} with a manifest whose digest is "
            f"{digest}: the registry is broken or hostile"
        )
    doc = _json(body, f"manifest of {ref}")
    if _is_index(doc, media_type):
        inner = _pick_amd64(doc, str(ref))
        body = client.get_manifest(inner)[0]
        if _store_bytes(store, body) != inner:
            raise ImageError(f"registry {ref.registry} sent a manifest that is not {inner}")
        doc = _json(body, f"manifest of {ref}")
    cfg = doc.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("digest"), str):
        raise ImageError(f"manifest of {ref} has no config descriptor")
    blobs = [(cfg["digest"], int(cfg.get("size") or 0), "config")]
    layers = _layers_of(store, doc, str(ref))
    blobs += [(b.digest, b.size, f"layer {i + 1}/{len(layers)}") for i, b in enumerate(layers)]
    downloaded = 0

    def report(label: str, done: int, total: int) -> None:
        reporter.step(f"{label}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB", done, total)
        if progress is not None:
            progress(f"{ref} {label}", done, total)

    for blob_digest, size, label in blobs:
        path = _blob_path(store, blob_digest)
        if path.exists():
            continue
        if label == "config" and size > _MAX_CONFIG_BYTES:
            raise ImageError(
                f"config of {ref} is {size} bytes: refused (limit {_MAX_CONFIG_BYTES})"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        try:
            client.download_blob(blob_digest, size, Path(tmp), progress=report, label=label)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        downloaded += size
    reporter.size = downloaded
    return digest


def pull_image(
    reference: str,
    *,
    pull_policy: PullPolicy = "if-missing",
    auth: RegistryAuth | None = None,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> PulledImage:
    """Make ``reference`` available in the local store and return it.

    ``pull_policy``: ``"if-missing"`` (default) uses the pinned digest and the
    local blobs when all are there, and asks the registry otherwise;
    ``"always"`` resolves the tag again (re-pinning it) and fetches missing
    blobs; ``"never"`` never connects. ``progress(what, done, total)`` is
    called as blobs arrive. A pull that asks the registry is reported as a
    ``pull`` stage (:mod:`..progress`) whose steps carry each blob's bytes done
    and total.

    :raises ImageNotFoundError: no such image (or, with ``"never"``, no local copy).
    :raises RegistryAuthError: credentials missing or refused.
    :raises RegistryUnreachableError: the registry does not answer.
    :raises ImagePlatformError: the image is not linux/amd64.
    """
    ref = parse_reference(reference)
    store = oci_dir(cache_dir)
    pinned = ref.digest or _read_pin(store, ref)
    if pull_policy != "always" and pinned is not None:
        image = _complete(store, pinned, str(ref))
        if image is not None:
            _touch_pin(store, ref)
            return image
    if pull_policy == "never":
        raise ImageNotFoundError(
            f"image {ref} is not in the local store and pull_policy is 'never': pull it "
            "once (pull_policy='if-missing' or 'always'), or fix the reference"
        )
    from ._registry import RegistryClient  # oras and requests load on a first pull only

    # One pull of a reference at a time (xdist workers start together): the
    # others wait, then find it complete.
    (store / "locks").mkdir(parents=True, exist_ok=True)
    lock = cache_lock(store / "locks" / f"{_pin_path(store, ref).stem}.lock", f"the pull of {ref}")
    lock.acquire(timeout=cache_lock_timeout(1800))
    try:
        pinned = ref.digest or _read_pin(store, ref)
        if pull_policy != "always" and pinned is not None:
            done = _complete(store, pinned, str(ref))
            if done is not None:
                return done
        # A stage only when the registry is asked: a cached image stays silent.
        with stage("pull", f"image {ref}") as reporter:
            reporter.step("resolving the reference")
            client = RegistryClient(ref, auth)
            try:
                digest = _fetch(client, store, ref, progress, reporter)
            finally:
                client.close()
        previous = _read_pin(store, ref)
        if previous is not None and previous != digest:
            logger.info("%s moved from %s to %s; pinned the new digest", ref, previous, digest)
        # Digest references get a pin too: pruning keeps what pins reach.
        _write_pin(store, ref, digest)
    finally:
        lock.release(delete=True)
    image = _complete(store, digest, str(ref))
    if image is None:  # pragma: no cover - every blob was just stored
        raise ImageError(f"image {ref} is incomplete right after its pull; try again")
    from ._prune import prune_oci_store  # the budget, after each pull

    prune_oci_store(cache_dir)
    return image
