"""Patches and scripts: changes to the guest root applied before boot, in a layer
of their own on top of the image (the image's own layers are never modified).

The patch layer is an erofs image staged from the patches, cached by its
content: a template's key covers it like any other layer.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .._exceptions import ConfigError, ImageError

__all__ = ["SCRIPTS_DIR", "Patch", "stage_patches"]

#: Where ``scripts={name: body}`` land in the guest (on every exec's PATH).
SCRIPTS_DIR = "/.msb/scripts"


def _guest_path(value: str) -> str:
    if "\0" in value or not value.startswith("/"):
        raise ValueError(f"guest path {value!r} must be absolute and free of NUL bytes")
    path = posixpath.normpath(value)
    if path in ("/", "//") or path.split("/")[1] in ("proc", "sys", "dev"):
        raise ValueError(f"guest path {value!r} is / or under /proc, /sys or /dev: not patchable")
    return path


class Patch(BaseModel):
    """One change to the guest root before boot. Build with the class methods::

        Patch.text("/etc/app.conf", "x=1")          # write a file
        Patch.append("/etc/hosts", "10.0.0.1 db")   # the image's file plus a line
        Patch.copy_dir("./fixtures", "/srv")        # a host tree into the guest
        Patch.symlink("/usr/bin/python3", "/usr/bin/py")  # ln -s TARGET LINK
        Patch.mkdir("/data", mode=0o777)

    Paths are absolute guest paths; patches apply in order, later ones win.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["text", "append", "copy_dir", "symlink", "mkdir"]
    path: str = Field(description="guest path the patch creates or changes")
    content: str = ""
    source: Path | None = Field(None, description="host directory of copy_dir")
    target: str = Field("", description="what a symlink points to")
    mode: int = Field(0o644, ge=0, le=0o7777)

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return _guest_path(value)

    @classmethod
    def _make(cls, **fields: object) -> Patch:
        try:
            return cls.model_validate(fields)
        except ValueError as exc:
            raise ConfigError(f"invalid Patch: {exc}") from None

    @classmethod
    def text(cls, path: str, content: str, *, mode: int = 0o644) -> Patch:
        """Write ``content`` to the guest file ``path`` (created or replaced)."""
        return cls._make(kind="text", path=path, content=content, mode=mode)

    @classmethod
    def append(cls, path: str, content: str) -> Patch:
        """Append ``content`` to the image's file ``path`` (created if absent)."""
        return cls._make(kind="append", path=path, content=content)

    @classmethod
    def copy_dir(cls, source: str | os.PathLike[str], path: str) -> Patch:
        """Copy the host directory ``source`` to the guest directory ``path``."""
        src = Path(source).expanduser().resolve()
        if not src.is_dir():
            raise ConfigError(f"Patch.copy_dir: {str(source)!r} is not a host directory")
        return cls._make(kind="copy_dir", path=path, source=src)

    @classmethod
    def symlink(cls, target: str, link: str) -> Patch:
        """Make ``link`` a symbolic link to ``target`` (the order of ``ln -s``)."""
        return cls._make(kind="symlink", path=link, target=target)

    @classmethod
    def mkdir(cls, path: str, *, mode: int = 0o755) -> Patch:
        """Create the guest directory ``path`` (and its parents)."""
        return cls._make(kind="mkdir", path=path, mode=mode)


def _dest(root: Path, guest: str) -> Path:
    dest = root / guest.lstrip("/")
    # Staged parents are plain directories we made: nothing can lead outside.
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    return dest


def stage_patches(
    root: Path,
    patches: Sequence[Patch],
    scripts: Mapping[str, str],
    read_base: Callable[[str], bytes | None],
) -> None:
    """Stage ``patches`` and ``scripts`` under ``root`` (the patch layer's tree).

    ``read_base(guest_path)`` returns the image's own file for :meth:`Patch.append`
    (None if the image has none).

    :raises ImageError: a patch cannot be applied (the message names it).
    """
    root.chmod(0o755)
    for patch in patches:
        dest = _dest(root, patch.path)
        try:
            if patch.kind == "text":
                dest.write_text(patch.content)
                dest.chmod(patch.mode)
            elif patch.kind == "append":
                base = dest.read_bytes() if dest.exists() else read_base(patch.path) or b""
                dest.write_bytes(base + patch.content.encode())
                dest.chmod(0o644)
            elif patch.kind == "copy_dir":
                assert patch.source is not None
                shutil.copytree(patch.source, dest, symlinks=True, dirs_exist_ok=True)
            elif patch.kind == "symlink":
                if os.path.lexists(dest):
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                os.symlink(patch.target, dest)
            else:
                dest.mkdir(parents=True, exist_ok=True)
                dest.chmod(patch.mode)
        except OSError as exc:
            raise ImageError(f"applying {patch.kind} patch to {patch.path} failed: {exc}") from exc
    if scripts:
        folder = root / SCRIPTS_DIR.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for name, body in scripts.items():
            script = folder / name
            script.write_text(body)
            script.chmod(0o755)
