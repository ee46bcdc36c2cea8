"""Root filesystems for the guest: read-only erofs layers, cached by fingerprint.

The guest agent mounts each :class:`Layer` (a virtio-blk disk whose serial is
``Layer.serial``) and stacks them in one overlay, top layer first, under a
tmpfs upper dir (docs/protocol.md, "Boot"). :func:`resolve_root_layers` turns
an image name into that stack, building only the images whose tree changed.
"""

from __future__ import annotations

from ._host import (
    DEFAULT_USR_EXCLUDES,
    PROJECT_EXCLUDE_NAMES,
    PROJECT_EXCLUDE_TOP,
    imaged_venv,
)
from ._model import Layer
from ._resolve import images_dir, project_layer, resolve_root_layers
from ._staging import ETC_COPY
from ._store import IMAGE_BUDGET_ENV, image_budget_bytes, prune_images

__all__ = [
    "DEFAULT_USR_EXCLUDES",
    "ETC_COPY",
    "IMAGE_BUDGET_ENV",
    "PROJECT_EXCLUDE_NAMES",
    "PROJECT_EXCLUDE_TOP",
    "Layer",
    "image_budget_bytes",
    "imaged_venv",
    "images_dir",
    "project_layer",
    "prune_images",
    "resolve_root_layers",
]
