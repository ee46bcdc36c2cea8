"""Run ``mkfs.erofs`` (erofs-utils >= 1.5) and patch the few bytes it cannot set."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from .._exceptions import ImageError

__all__ = ["build_erofs", "ere_escape", "mkfs_binary", "open_dir_modes"]

_INSTALL_HINT = "install erofs-utils (Debian/Ubuntu: apt-get install erofs-utils)"

#: ``-x`` sets the xattr "tolerance". Any value >= 0 makes 1.5 run a
#: shared-xattr pre-pass over the WHOLE source directory that ignores the
#: exclude rules: with ``/`` as the source it walks /proc and fails (measured,
#: EOPNOTSUPP on /proc/fs/nfsd). INT_MAX skips that pass but still stores
#: each file's xattrs inline (measured with a user.* xattr), so file
#: capabilities survive.
_XATTR_INLINE_ONLY = "-x2147483647"

_EROFS_MAGIC = 0xE0F5E1E2
_SUPERBLOCK_OFFSET = 1024
_COMPAT_SB_CHKSUM = 0x1


def mkfs_binary() -> str:
    """Return the path of ``mkfs.erofs`` or raise :class:`ImageError` saying how to get it."""
    found = shutil.which("mkfs.erofs")
    if not found:
        raise ImageError(f"mkfs.erofs not found on PATH; {_INSTALL_HINT}")
    return found


def ere_escape(text: str) -> str:
    """Escape ``text`` for a POSIX extended regex (what ``--exclude-regex`` compiles)."""
    return re.sub(r"([.\[\]()*+?{}|^$\\])", r"\\\1", text)


def build_erofs(
    source: Path,
    output: Path,
    *,
    exclude_paths: Iterable[str] = (),
    exclude_names: Iterable[str] = (),
    all_root: bool = False,
) -> None:
    """Image ``source`` (its contents become the image's ``/``) into ``output``.

    ``exclude_paths`` are paths relative to ``source`` (that is how 1.5 matches
    ``--exclude-path``; absolute paths silently match nothing, measured).
    ``exclude_names`` drop every entry with that name at any depth. Not
    compressed: decompressing under TCG emulation is slow, and the page cache
    of an uncompressed image is shared copy-on-write between clones. Per-file
    mtimes are kept (the default): ``.pyc`` files are validated against their
    source's mtime, so losing mtimes would make the guest recompile.
    """
    argv = [mkfs_binary(), "--quiet", _XATTR_INLINE_ONLY]
    if all_root:
        argv.append("--all-root")
    argv += [f"--exclude-path={p}" for p in sorted(set(exclude_paths))]
    argv += [f"--exclude-regex=(^|/){ere_escape(n)}$" for n in sorted(set(exclude_names))]
    argv += [os.fspath(output), os.fspath(source)]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise ImageError(
            f"mkfs.erofs failed (exit {proc.returncode}) imaging {source}:\n{tail}\n"
            "Fix: make the tree readable by this user, free disk space in the cache "
            f"directory, or exclude the offending path; erofs-utils >= 1.5 is needed "
            f"({_INSTALL_HINT})."
        )
    check_image(output)


def check_image(path: Path) -> None:
    """Raise :class:`ImageError` unless ``path`` starts with an erofs superblock."""
    try:
        with open(path, "rb") as f:
            f.seek(_SUPERBLOCK_OFFSET)
            head = f.read(4)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc
    if len(head) != 4 or struct.unpack("<I", head)[0] != _EROFS_MAGIC:
        raise ImageError(f"{path} is not an erofs image (bad superblock magic); delete it")


def _lookup_nid(image: Path, guest_path: str) -> int | None:
    dump = shutil.which("dump.erofs")
    if dump is None:
        return None
    proc = subprocess.run(
        [dump, f"--path={guest_path}", os.fspath(image)],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    match = re.search(r"^NID:\s*(\d+)", proc.stdout, re.MULTILINE)
    return int(match.group(1)) if proc.returncode == 0 and match else None


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def _crc32c(seed: int, data: bytes) -> int:
    """CRC-32C as the kernel's ``crc32c()``: caller's seed, no final inversion."""
    c = seed
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c


def open_dir_modes(image: Path, guest_dirs: Sequence[str], *, bits: int = 0o555) -> list[str]:
    """Add permission ``bits`` to directories inside a built image.

    Why: a tree imaged at its own absolute path drags its host ancestors
    along with their host modes (``/root`` is 0700 here), which would hide
    ``/root/.pyenv/...`` from the guest's non-root user. mkfs.erofs 1.5 has no
    option for that, so patch ``i_mode`` in place: it sits at byte 4 of both
    the compact and the extended on-disk inode, at ``meta_blkaddr << blkszbits
    + nid * 32``. Inodes have no checksum, but small images keep inodes in
    block 0, which the superblock checksum (CRC-32C over the rest of block 0,
    feature_compat bit 0) covers, so it is recomputed (fsck.erofs checks it).
    Paths are located with ``dump.erofs``. Returns the paths not patched.
    """
    if not guest_dirs:
        return []
    failed: list[str] = []
    nids: list[int] = []
    for guest_path in guest_dirs:
        nid = _lookup_nid(image, guest_path)
        if nid is None:
            failed.append(guest_path)
        else:
            nids.append(nid)
    with open(image, "r+b") as f:
        f.seek(_SUPERBLOCK_OFFSET)
        sb = f.read(64)
        magic, _chk, compat, blkszbits = struct.unpack_from("<IIIB", sb, 0)
        if magic != _EROFS_MAGIC:
            raise ImageError(f"{image} is not an erofs image (bad superblock magic)")
        (meta_blkaddr,) = struct.unpack_from("<I", sb, 40)
        for nid in nids:
            offset = (meta_blkaddr << blkszbits) + nid * 32 + 4
            f.seek(offset)
            (mode,) = struct.unpack("<H", f.read(2))
            if mode & 0o170000 == 0o040000:  # directories only
                f.seek(offset)
                f.write(struct.pack("<H", mode | bits))
        if compat & _COMPAT_SB_CHKSUM:
            f.seek(_SUPERBLOCK_OFFSET)
            block = bytearray(f.read((1 << blkszbits) - _SUPERBLOCK_OFFSET))
            block[4:8] = b"\0\0\0\0"
            f.seek(_SUPERBLOCK_OFFSET + 4)
            f.write(struct.pack("<I", _crc32c(0xFFFFFFFF, bytes(block))))
    return failed
