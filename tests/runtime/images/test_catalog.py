"""The local OCI store's listing and removal (runtime/images/_catalog.py), on
OCI layout directories imported into a private cache: no registry, no VM.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from oci_helpers import busybox_entries, file, image_config, write_oci_layout

from pytest_microsandbox.runtime import ImageInUseError, ImageNotFoundError
from pytest_microsandbox.runtime._state import (
    SandboxRecord,
    SandboxStatus,
    StateStore,
    process_start,
)
from pytest_microsandbox.runtime.images import (
    find_image,
    images_dir,
    list_images,
    remove_image,
    resolve_root_layers,
)
from pytest_microsandbox.runtime.images._oci import _blob_path, oci_dir


def _layouts(tmp_path: Path) -> tuple[Path, Path]:
    """Two images sharing their bottom layer."""
    base = busybox_entries()
    a, b = tmp_path / "a", tmp_path / "b"
    write_oci_layout(a, [base, {"srv/a": file("a" * 5000)}], image_config())
    write_oci_layout(b, [base, {"srv/b": file("b")}], image_config())
    return a, b


def test_list_find_and_remove_keep_shared_blobs_and_say_who_uses_what(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a, b = _layouts(tmp_path)
    layers = resolve_root_layers(str(a), cache_dir=cache)  # imports and builds a's layers
    resolve_root_layers(str(b), cache_dir=cache)
    # A template booting from a's layers (the snapshot store's meta.json layout).
    entry = cache / "snapshots" / "templates" / "t1"
    entry.mkdir(parents=True)
    disks = [{"path": str(layer.path)} for layer in layers]
    (entry / "meta.json").write_text(json.dumps({"name": "tmpl-a", "disks": disks}))
    os.utime(entry, (time.time() + 5, time.time() + 5))  # restored just now

    images = list_images(cache)
    assert [i.reference for i in images] == [str(a), str(b)]  # most recently used first
    img_a, img_b = images
    assert (img_a.kind, img_a.used_by, img_a.sandboxes) == ("local", ("tmpl-a",), ())
    assert img_b.used_by == () and img_a.size_bytes > img_b.size_bytes > 0
    assert img_a.last_used == pytest.approx(entry.stat().st_mtime)
    assert json.loads(json.dumps(img_a.to_dict()))["digest"] == img_a.digest
    assert find_image(img_b.digest[:19], cache) == img_b  # a digest prefix
    with pytest.raises(ImageNotFoundError, match="microsandbox image ls"):
        find_image("sha256:", cache)
    with pytest.raises(ImageNotFoundError, match="no image"):
        remove_image("127.0.0.1:5000/absent:1", cache)

    # A live named sandbox created from a: refused unless forced.
    store = StateStore.default(cache)
    record = SandboxRecord(
        "holder", SandboxStatus.RUNNING, time.time(), json.dumps({"image": str(a)}),
        os.getpid(), process_start(os.getpid()) or 0,
    )  # fmt: skip
    assert store.claim(record) is None
    try:
        assert list_images(cache)[0].sandboxes == ("holder",)
        with pytest.raises(ImageInUseError, match="holder"):
            remove_image(str(a), cache)
        assert img_a.pin.exists()
        removed = remove_image(str(a), cache, force=True)
    finally:
        store.release(record)
    assert removed.image.reference == str(a) and removed.freed_bytes > 0
    assert not img_a.pin.exists()
    assert [i.reference for i in list_images(cache)] == [str(b)]
    # b's blobs, the shared layer included, are all still there; a's own are gone.
    store_dir = oci_dir(cache)
    blobs = {p.name for p in (store_dir / "blobs" / "sha256").iterdir()}
    assert list_images(cache)[0].size_bytes == img_b.size_bytes
    assert _blob_path(store_dir, img_a.digest).name not in blobs
    # The layers built from a stay: the template boots as before.
    assert all(layer.path.exists() for layer in layers)
    assert images_dir(cache) == layers[0].path.parent


def test_an_empty_or_broken_store_lists_nothing(tmp_path: Path) -> None:
    assert list_images(tmp_path) == []
    pins = oci_dir(tmp_path) / "pins"
    pins.mkdir(parents=True)
    (pins / "bad.json").write_text("{not json")
    (pins / "odd.json").write_text(json.dumps({"digest": 5}))
    assert list_images(tmp_path) == []
