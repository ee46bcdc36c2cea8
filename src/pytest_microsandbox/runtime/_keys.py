"""Cache keys: one SHA-256 encoding of a sequence of parts, and file hashing.

Every cache key (a template's, a boot's identity, an initramfs's, a compiled
helper's, a root image's fingerprint) is the digest of a sequence of parts.
Writing the parts one after another is ambiguous (``"ab" + "c"`` and ``"a" +
"bc"``; a separator that may occur inside a part, such as a newline in a file
name, is no better), so each part is *length-prefixed*: its length in bytes as
8 bytes big-endian, then the bytes. A ``str`` part is its UTF-8 encoding
(``surrogateescape``: file names that are not valid UTF-8 keep their bytes).
The encoding of a sequence is then prefix-free: two different sequences, of
the same length or not, never encode to the same bytes.

:class:`KeyHasher` adds parts one at a time (a walk over a directory tree);
:func:`digest_parts` hashes a known list. :func:`sha256_file` hashes a file's
contents, in chunks, with the GIL released (integrity records use it too).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["KeyHasher", "digest_parts", "sha256_file"]

_CHUNK = 1 << 20  # hashlib releases the GIL for updates this large


def _encode(part: str | bytes) -> bytes:
    return part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part


class KeyHasher:
    """An incremental :func:`digest_parts`: ``add`` parts, then ``hexdigest``."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, *parts: str | bytes) -> KeyHasher:
        """Append ``parts`` (each length-prefixed); returns ``self``."""
        update = self._hash.update
        for part in parts:
            data = _encode(part)
            update(len(data).to_bytes(8, "big") + data)
        return self

    def hexdigest(self, length: int | None = None) -> str:
        """The digest so far, hex, cut to ``length`` characters (all 64 if None)."""
        return self._hash.hexdigest()[:length]


def digest_parts(*parts: str | bytes, length: int | None = None) -> str:
    """SHA-256 of ``parts``, each length-prefixed (see the module docstring), hex,
    cut to ``length`` characters (all 64 if None).
    """
    return KeyHasher().add(*parts).hexdigest(length)


def sha256_file(path: Path) -> str:
    """SHA-256 of ``path``'s contents (hex), read in 1 MiB chunks (the GIL is released)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        # A small file (a state file, ~100 KB) is read in one call into a
        # buffer its size: allocating 1 MiB would cost a third of its hash.
        buf = bytearray(min(os.fstat(f.fileno()).st_size + 1, _CHUNK))
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
