"""Cheap fingerprints of directory trees (stat data, never file contents).

A fingerprint decides whether a cached image is still current, so it must
change whenever the imaged content would change, and be cheap enough to take
on every resolve: walking the 1 GB pyenv prefix here (60k entries) with one
``lstat`` per entry takes ~0.3 s warm.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .._exceptions import ImageError
from .._keys import KeyHasher, digest_parts, sha256_file

__all__ = ["content_fingerprint", "file_fingerprint", "tree_fingerprint"]


def tree_fingerprint(
    root: Path,
    *,
    skip_paths: Iterable[Path] = (),
    skip_names: Iterable[str] = (),
    unhashed_names: Iterable[str] = (),
    dirs_only: bool = False,
) -> str:
    """Hash names, types, modes, owners, sizes and mtimes of every entry under ``root``.

    ``skip_paths`` (absolute) and ``skip_names`` (at any depth) are left out
    entirely; the image build excludes the same entries, so they cannot make
    a cached image stale. ``unhashed_names`` are imaged but not hashed:
    ``__pycache__`` is rewritten by every host test run and Python validates
    each ``.pyc`` against its source anyway, so hashing it would only cause
    rebuilds that change nothing.

    Directory mtimes are not hashed (creating an unhashed ``__pycache__``
    bumps its parent's mtime; the sorted child list already records adds and
    removes), except with ``dirs_only``, which hashes only directories and
    their mtimes: a coarser, faster check for trees too big to stat fully.
    """
    skip_abs = {os.fspath(p) for p in skip_paths}
    skip = frozenset(skip_names)
    unhashed = frozenset(unhashed_names)
    h = KeyHasher()
    root_s = os.fspath(root)
    try:
        st = os.lstat(root_s)
    except OSError as exc:
        raise ImageError(f"cannot fingerprint {root}: {exc}; check that it exists") from exc
    h.add(f"{st.st_mode:o}:{st.st_uid}:{st.st_gid}")
    stack = [root_s]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            # Removed while we walked: the post-build re-check catches the change.
            continue
        except OSError as exc:
            raise ImageError(
                f"cannot read {directory} while fingerprinting {root}: {exc}; "
                "make it readable or exclude it"
            ) from exc
        rel_dir = os.path.relpath(directory, root_s)
        h.add("D", rel_dir)
        for entry in entries:
            if entry.name in skip or entry.name in unhashed or entry.path in skip_abs:
                continue
            try:
                if dirs_only:
                    # d_type answers is_dir without a stat: only directories cost one.
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        h.add(entry.name, str(mtime))
                    continue
                est = entry.stat(follow_symlinks=False)
                target = os.readlink(entry.path) if stat.S_ISLNK(est.st_mode) else ""
            except FileNotFoundError:
                continue  # removed while we walked: the post-build re-check catches it
            if stat.S_ISDIR(est.st_mode):
                stack.append(entry.path)
            # The name, then its attributes: a name may hold any byte but "/" and NUL.
            line = f"{est.st_mode:o}:{est.st_uid}:{est.st_gid}"
            if target:
                h.add(entry.name, line, target)
            elif stat.S_ISDIR(est.st_mode):
                h.add(entry.name, line)
            else:
                h.add(entry.name, f"{line}:{est.st_size}:{est.st_mtime_ns}")
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    """Hash a (small) file's size, mtime and content; ``"absent"`` if it does not exist."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc}") from exc
    return f"{st.st_size}:{st.st_mtime_ns}:{digest_parts(data)}"


def content_fingerprint(root: Path) -> str:
    """Hash a small tree by content (used for generated staging trees).

    Generated files get fresh mtimes on every run, so only names, modes,
    symlink targets and bytes count here.
    """
    h = KeyHasher()
    root_s = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root_s):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root_s)
        h.add("D", rel, f"{os.lstat(dirpath).st_mode:o}")
        # os.walk lists symlinks to directories among dirnames (without following).
        links_to_dirs = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames + links_to_dirs):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                h.add("L", name, os.readlink(full))
            else:
                h.add("F", name, f"{st.st_mode:o}", sha256_file(Path(full)))
    return h.hexdigest()
