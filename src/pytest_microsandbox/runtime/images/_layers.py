"""Turn a layer specification into a cached erofs image and its :class:`Layer`."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._exceptions import ImageError
from .._keys import digest_parts
from ._mkfs import build_erofs, open_dir_modes
from ._model import Layer
from ._store import ensure_image, logger

__all__ = ["BUILDER_VERSION", "LayerSpec", "build_layer"]

#: Bumped whenever the way images are built changes, so old images are not reused.
BUILDER_VERSION = 1

#: How often a build is redone because its tree changed while it was imaged.
_ATTEMPTS = 3


class _TreeChangedError(Exception):
    """The tree changed during the build: its image may mix old and new content."""


@dataclass(frozen=True)
class LayerSpec:
    """How to build one layer.

    ``source``'s contents become the image's ``/``. With ``keep``, only those
    absolute trees (with their ancestors) are imaged out of ``source`` (the
    host's ``/``): that is how a host tree lands at its own path without
    copying it anywhere.
    """

    serial: str
    label: str
    description: str
    source: Path
    fingerprint: Callable[[], str]
    keep: tuple[Path, ...] = ()
    exclude_paths: tuple[Path, ...] = ()
    exclude_names: tuple[str, ...] = ()
    all_root: bool = False
    #: Stable identity of the source (names the image family for pruning).
    identity: tuple[str, ...] = field(default=())

    def _identity(self) -> list[str]:
        # A staged layer's source is a random temporary dir: it names itself.
        return list(self.identity or (os.fspath(self.source), *map(os.fspath, self.keep)))

    def family(self) -> str:
        return f"{self.label}-{_sha(json.dumps(self._identity()))[:12]}"

    def digest(self, fingerprint: str) -> str:
        return _sha(
            json.dumps(
                {
                    "builder": BUILDER_VERSION,
                    "label": self.label,
                    "identity": self._identity(),
                    "exclude_paths": sorted(os.fspath(p) for p in self.exclude_paths),
                    "exclude_names": sorted(self.exclude_names),
                    "all_root": self.all_root,
                    "fingerprint": fingerprint,
                },
                sort_keys=True,
            )
        )


def _sha(text: str) -> str:
    return digest_parts(text)


def _ancestors(source: Path, path: Path) -> list[Path]:
    """Directories strictly between ``source`` (included) and ``path`` (excluded)."""
    rel = path.relative_to(source)
    out = [source]
    for part in rel.parts[:-1]:
        out.append(out[-1] / part)
    return out


def _chain(spec: LayerSpec) -> dict[Path, set[str]]:
    """For every ancestor of a kept tree: the child names that lead to kept trees."""
    allowed: dict[Path, set[str]] = {}
    for kept in spec.keep:
        for anc in _ancestors(spec.source, kept) if kept != spec.source else []:
            if any(anc == k or anc.is_relative_to(k) for k in spec.keep):
                continue  # inside a kept tree: imaged whole
            allowed.setdefault(anc, set()).add(kept.relative_to(anc).parts[0])
    return allowed


def _listing(dirs: dict[Path, set[str]]) -> dict[Path, frozenset[str]]:
    out: dict[Path, frozenset[str]] = {}
    for directory in dirs:
        try:
            out[directory] = frozenset(os.listdir(directory))
        except OSError as exc:
            raise ImageError(f"cannot list {directory}: {exc}; check its permissions") from exc
    return out


def _relative(source: Path, path: Path) -> str | None:
    try:
        rel = path.relative_to(source)
    except ValueError:
        return None  # outside the imaged tree: nothing to exclude
    return os.fspath(rel)


def _build_once(spec: LayerSpec, fingerprint: str, tmp: Path) -> None:
    chain = _chain(spec) if spec.keep else {}
    before = _listing(chain)
    excludes = [
        rel
        for p in spec.exclude_paths
        if (rel := _relative(spec.source, p)) is not None and rel != "."
    ]
    for directory, names in before.items():
        allowed = chain[directory]
        excludes += [
            os.fspath((directory / n).relative_to(spec.source)) for n in names if n not in allowed
        ]
    build_erofs(
        spec.source,
        tmp,
        exclude_paths=excludes,
        exclude_names=spec.exclude_names,
        all_root=spec.all_root,
    )
    # mkfs lists each directory once, some time after we did: an entry created
    # in between would have been imaged (think of a new file in /root), and an
    # edit during the build makes the image disagree with its digest.
    if _listing(chain) != before or spec.fingerprint() != fingerprint:
        raise _TreeChangedError
    if chain:
        # Ancestors keep their host modes in the image; open them so a
        # non-root guest user can reach the kept trees (/root is 0700).
        guest_dirs = [
            "/" + os.fspath(d.relative_to(spec.source)) for d in chain if d != spec.source
        ]
        failed = open_dir_modes(tmp, guest_dirs)
        if failed:
            logger.warning(
                "could not open directory modes %s in %s (is dump.erofs installed?); "
                "a non-root guest user may not reach %s",
                failed,
                spec.description,
                [os.fspath(k) for k in spec.keep],
            )


def build_layer(spec: LayerSpec, images_dir: Path) -> Layer:
    """Return the layer for ``spec``, building its image unless a current one is cached."""
    for _attempt in range(_ATTEMPTS):
        fingerprint = spec.fingerprint()
        digest = spec.digest(fingerprint)
        try:
            path = ensure_image(
                images_dir,
                spec.family(),
                digest,
                functools.partial(_build_once, spec, fingerprint),
                description=spec.description,
            )
        except _TreeChangedError:
            logger.info("%s changed while it was imaged; building again", spec.description)
            continue
        return Layer(serial=spec.serial, path=path, digest=digest, description=spec.description)
    raise ImageError(
        f"{spec.description} kept changing while it was imaged ({_ATTEMPTS} attempts); "
        "stop whatever writes to it (a running install or build) and try again"
    )
