"""Parse and validate OCI image references (``registry/repo[:tag][@sha256:...]``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._exceptions import ImageError

__all__ = ["DEFAULT_REGISTRY", "ImageReference", "is_oci_reference", "parse_reference"]

#: Where a reference without a registry part points (Docker's convention).
DEFAULT_REGISTRY = "registry-1.docker.io"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_REGISTRY_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class ImageReference:
    """One image reference, split; ``digest`` set when the reference pins one."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository`` (what a pin file and the blob URLs are keyed by)."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: str) -> ImageReference:
        return ImageReference(self.registry, self.repository, None, digest)

    @property
    def is_loopback(self) -> bool:
        """Whether the registry is on this host (spoken to over plain HTTP)."""
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else ""
        return host == "localhost" or host.startswith("127.") or self.registry.startswith("[::1]")


def is_oci_reference(text: str) -> bool:
    """Whether ``text`` is shaped like an image reference (not a path, not ``host``)."""
    if text == "host" or text.startswith(("/", ".", "~")):
        return False
    try:
        parse_reference(text)
    except ImageError:
        return False
    return True


def parse_reference(text: str) -> ImageReference:
    """Split ``text`` into registry, repository, tag and digest.

    A first component with a ``.`` or ``:`` (or ``localhost``) is the
    registry; without one the image is on Docker Hub (``library/`` added to
    one-component names). No tag and no digest means the tag ``latest``.

    :raises ImageError: the reference is malformed (the message says which part).
    """
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise ImageError(
                f"image reference {text!r}: {digest!r} is not a sha256 digest "
                "(expected sha256: and 64 lowercase hex digits)"
            )
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ImageError(f"image reference {text!r}: {tag!r} is not a valid tag")
    parts = rest.split("/")
    if len(parts) > 1 and (
        "." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")
    ):
        registry, repo_parts = parts[0], parts[1:]
        if not _REGISTRY_RE.match(registry):
            raise ImageError(f"image reference {text!r}: {registry!r} is not a registry host")
    else:
        registry, repo_parts = DEFAULT_REGISTRY, parts
        if len(repo_parts) == 1:
            repo_parts = ["library", *repo_parts]
    for part in repo_parts:
        if not _COMPONENT_RE.match(part):
            raise ImageError(
                f"image reference {text!r}: repository component {part!r} is not valid "
                "(lowercase letters, digits and single separators . _ -)"
            )
    if digest is None and tag is None:
        tag = "latest"
    return ImageReference(registry, "/".join(repo_parts), tag, digest)
