"""Root filesystems for the guest: read-only erofs layers, cached by fingerprint
(host trees, directories) or by chain id (OCI image layers).

The guest agent mounts each :class:`Layer` (a virtio-blk disk whose serial is
``Layer.serial``) and stacks them in one overlay, top layer first, under a
tmpfs upper dir (docs/protocol.md, "Boot"). :func:`resolve_root_layers` turns
an image name into that stack, building only the images whose tree changed.
"""

from __future__ import annotations

from ._auth import ProgressCallback, RegistryAuth
from ._catalog import RemovedImage, StoredImage, find_image, list_images, remove_image
from ._host import (
    DEFAULT_USR_EXCLUDES,
    PROJECT_EXCLUDE_NAMES,
    PROJECT_EXCLUDE_TOP,
    imaged_venv,
)
from ._hostlib import (
    HOST_FSCK_EROFS_ARGV,
    HOST_LOADER_ARGV,
    HOST_PYTHON_WRAPPER,
    HOST_SETSID_ARGV,
    host_python_roots,
)
from ._model import Layer
from ._oci import ImageConfig, PulledImage, PullPolicy, local_image, log_pull_progress, pull_image
from ._patches import SCRIPTS_DIR, Patch
from ._prune import (
    OCI_BUDGET_ENV,
    VOLUME_BUDGET_ENV,
    PruneSummary,
    prune_oci_store,
    prune_volumes,
)
from ._reference import ImageReference, is_oci_reference, parse_reference
from ._resolve import (
    image_config_for,
    images_dir,
    prewalk_host_trees,
    project_exclusions,
    project_layer,
    resolve_root_layers,
)
from ._staging import ETC_COPY
from ._store import IMAGE_BUDGET_ENV, image_budget_bytes, prune_images

__all__ = [
    "DEFAULT_USR_EXCLUDES",
    "ETC_COPY",
    "HOST_FSCK_EROFS_ARGV",
    "HOST_LOADER_ARGV",
    "HOST_PYTHON_WRAPPER",
    "HOST_SETSID_ARGV",
    "IMAGE_BUDGET_ENV",
    "OCI_BUDGET_ENV",
    "PROJECT_EXCLUDE_NAMES",
    "PROJECT_EXCLUDE_TOP",
    "SCRIPTS_DIR",
    "VOLUME_BUDGET_ENV",
    "ImageConfig",
    "ImageReference",
    "Layer",
    "Patch",
    "ProgressCallback",
    "PruneSummary",
    "PullPolicy",
    "PulledImage",
    "RegistryAuth",
    "RemovedImage",
    "StoredImage",
    "find_image",
    "host_python_roots",
    "image_budget_bytes",
    "image_config_for",
    "imaged_venv",
    "images_dir",
    "is_oci_reference",
    "list_images",
    "local_image",
    "log_pull_progress",
    "parse_reference",
    "prewalk_host_trees",
    "project_exclusions",
    "project_layer",
    "prune_images",
    "prune_oci_store",
    "prune_volumes",
    "pull_image",
    "remove_image",
    "resolve_root_layers",
]
