"""OCI images from local files: OCI layout directories and ``docker save`` archives.

Both are imported into the local OCI store (``<cache>/oci``), every blob
checked against its digest, and pinned by the source's path, size and mtime:
a second use reads only the pin. From there they are images like pulled ones
(layers as erofs by chain id, the image config honoured).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .._exceptions import ImageError, ImageNotFoundError
from .._keys import digest_parts
from ._oci import (
    MAX_MANIFEST_BYTES,
    PulledImage,
    _blob_path,
    _complete,
    _is_index,
    _json,
    _pick_amd64,
    _publish,
    _store_bytes,
    oci_dir,
)

__all__ = ["import_local_image", "is_docker_archive", "is_oci_layout"]

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def is_oci_layout(path: Path) -> bool:
    """Whether ``path`` is an OCI image layout directory."""
    return path.is_dir() and (path / "oci-layout").is_file() and (path / "index.json").is_file()


def is_docker_archive(path: Path) -> bool:
    """Whether ``path`` is a tar archive holding a ``manifest.json`` (``docker save``)."""
    if not path.is_file() or not tarfile.is_tarfile(path):
        return False
    try:
        with tarfile.open(path) as tar:
            return any(m.name.lstrip("./") == "manifest.json" for m in tar)
    except (tarfile.TarError, OSError):
        return False


def _pin_file(store: Path, source: Path) -> Path:
    st = source.stat()
    key = digest_parts("local", os.fspath(source), str(st.st_size), str(st.st_mtime_ns), length=32)
    return store / "pins" / f"local-{key}.json"


def _copy_blob(store: Path, source: Path, digest: str) -> None:
    """Copy ``source`` into the store as blob ``digest``, checking the digest."""
    dest = _blob_path(store, digest)
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        hasher = hashlib.sha256()
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                hasher.update(chunk)
                out.write(chunk)
        if f"sha256:{hasher.hexdigest()}" != digest:
            raise ImageError(f"blob {source} does not match its digest {digest}: corrupt layout")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _import_layout(store: Path, layout: Path) -> str:
    index = _json((layout / "index.json").read_bytes()[:MAX_MANIFEST_BYTES], f"{layout}/index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ImageNotFoundError(f"OCI layout {layout} lists no image in index.json")
    if len(entries) == 1 and isinstance(entries[0], dict):
        digest = str(entries[0].get("digest"))
    else:
        digest = _pick_amd64(index, str(layout))

    def blob(d: str) -> Path:
        return layout / "blobs" / "sha256" / _blob_path(store, d).name

    _copy_blob(store, blob(digest), digest)
    doc = _json(_blob_path(store, digest).read_bytes(), f"manifest {digest} in {layout}")
    if _is_index(doc):
        inner = _pick_amd64(doc, str(layout))
        _copy_blob(store, blob(inner), inner)
        doc = _json(_blob_path(store, inner).read_bytes(), f"manifest {inner} in {layout}")
    descriptors = [doc.get("config"), *(doc.get("layers") or [])]
    for desc in descriptors:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise ImageError(f"OCI layout {layout}: a manifest descriptor has no digest")
        _copy_blob(store, blob(desc["digest"]), desc["digest"])
    return digest


def _member_blob(store: Path, tar: tarfile.TarFile, name: str) -> tuple[str, int, bool]:
    """Store archive member ``name`` as a blob: ``(digest, size, gzipped)``."""
    try:
        member = tar.getmember(name)
    except KeyError:
        raise ImageError(f"docker archive lacks {name!r} named in its manifest.json") from None
    src = tar.extractfile(member)
    if src is None:
        raise ImageError(f"docker archive member {name!r} is not a file")
    (store / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store / "blobs" / "sha256", prefix=".tmp-")
    try:
        hasher = hashlib.sha256()
        size = 0
        head = b""
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                if not head:
                    head = chunk[:2]
                hasher.update(chunk)
                size += len(chunk)
                out.write(chunk)
        digest = f"sha256:{hasher.hexdigest()}"
        dest = _blob_path(store, digest)
        if not dest.exists():
            os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return digest, size, head == b"\x1f\x8b"


def _import_docker_archive(store: Path, archive: Path) -> str:
    with tarfile.open(archive) as tar:
        names = {m.name.lstrip("./"): m.name for m in tar.getmembers()}
        if "oci-layout" in names and "index.json" in names:
            with tempfile.TemporaryDirectory(dir=store, prefix=".layout-") as tmp:
                # Docker >= 25 saves an OCI layout: import only what it names.
                tar.extractall(tmp, members=_layout_members(tar), filter="data")
                return _import_layout(store, Path(tmp))
        raw = tar.extractfile(names.get("manifest.json", "manifest.json"))
        if raw is None:
            raise ImageError(f"{archive} has no manifest.json")
        entries: Any = json.loads(raw.read(MAX_MANIFEST_BYTES))
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise ImageNotFoundError(f"docker archive {archive} lists no image")
        entry = entries[0]
        config_digest, config_size, _ = _member_blob(store, tar, names[str(entry["Config"])])
        layers = []
        for layer in entry.get("Layers") or []:
            digest, size, gz = _member_blob(store, tar, names[str(layer)])
            layers.append(
                {"mediaType": _LAYER_GZIP if gz else _LAYER_TAR, "digest": digest, "size": size}
            )
    manifest = {
        "schemaVersion": 2,
        "mediaType": _OCI_MANIFEST,
        "config": {"mediaType": _OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    return _store_bytes(store, json.dumps(manifest, sort_keys=True).encode())


def _layout_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    return [
        m
        for m in tar.getmembers()
        if m.name.lstrip("./") in ("oci-layout", "index.json")
        or m.name.lstrip("./").startswith("blobs/")
    ]


def import_local_image(source: Path, cache_dir: Path | None = None) -> PulledImage:
    """Import an OCI layout directory or a ``docker save`` archive (cached by its
    path, size and mtime) and return it as an image in the local store.

    :raises ImageError: the source is malformed or a blob does not match its digest.
    :raises ImagePlatformError: it is not linux/amd64.
    """
    source = source.resolve()
    store = oci_dir(cache_dir)
    pin = _pin_file(store, source)
    try:
        digest = json.loads(pin.read_text())["digest"]
        image = _complete(store, str(digest), str(source))
        if image is not None:
            return image
    except (OSError, ValueError, KeyError, TypeError):
        pass
    store.mkdir(parents=True, exist_ok=True)
    try:
        if is_oci_layout(source):
            digest = _import_layout(store, source)
        else:
            digest = _import_docker_archive(store, source)
    except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
        raise ImageError(f"cannot import image {source}: {exc}") from exc
    _publish(json.dumps({"source": os.fspath(source), "digest": digest}).encode(), pin)
    image = _complete(store, digest, str(source))
    if image is None:
        raise ImageError(f"image {source} names blobs it does not contain")
    return image
