"""Confined host writes of guest data (docs/host-writes.md).

Everything the host writes that came from the guest (``copy_to_host`` today)
goes through :class:`ConfinedDir`: the destination's parent is opened once as
a directory fd (the user's own path, resolved as given), and every later step
works relative to directory fds with ``O_NOFOLLOW``, so no name, symlink or
race planted by the guest (in a read-write volume, or through a forged agent
reply) can make the host write outside the destination:

* names are checked: not empty, not ``.`` or ``..``, no ``/`` or NUL;
* directories are created with ``mkdirat`` and entered with
  ``O_DIRECTORY | O_NOFOLLOW`` one component at a time; a symlink in the way
  is refused, never followed;
* files are written to a fresh temporary name (random, ``O_CREAT | O_EXCL |
  O_NOFOLLOW``), then renamed over the final name (``renameat`` replaces a
  link, it never follows one); the temporary is removed on any failure;
* guest symlinks are recreated as symlinks (same way: temporary, rename),
  never followed;
* :class:`CopyBudget` bounds the bytes and entries of one copy.

``O_NOFOLLOW`` per component is enough here: each component is opened
relative to the fd of its parent, so ``openat2(RESOLVE_BENEATH)`` would add
nothing but a kernel-version check.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ._exceptions import CopyLimitError, UnsafeHostPathError

__all__ = [
    "DEFAULT_COPY_MAX_BYTES",
    "DEFAULT_COPY_MAX_ENTRIES",
    "ConfinedDir",
    "CopyBudget",
    "PartialFile",
    "check_entry_name",
    "entry_name_problem",
]

#: Default byte budget of one ``copy_to_host`` (all files together): 4 GiB.
DEFAULT_COPY_MAX_BYTES = 4 * 1024**3
#: Default entry budget of one ``copy_to_host`` (files, directories, symlinks).
DEFAULT_COPY_MAX_ENTRIES = 100_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Permission bits kept from the guest: never setuid/setgid/sticky on the host.
_MODE_MASK = 0o777


def entry_name_problem(name: str | bytes) -> str | None:
    """Say what makes ``name`` unusable as one directory entry, or None if it is fine."""
    raw = os.fsencode(name)
    if not raw:
        return "it is empty"
    if raw in (b".", b".."):
        return f"it is {raw.decode()!r}"
    if b"/" in raw:
        return "it contains '/'"
    if b"\0" in raw:
        return "it contains a NUL byte"
    return None


def check_entry_name(name: str, where: str) -> str:
    """Return ``name`` if it is a plain entry name; raise UnsafeHostPathError if not.

    ``where`` names the directory the entry would be written into.
    """
    problem = entry_name_problem(name)
    if problem is not None:
        raise UnsafeHostPathError(
            f"refusing to write the entry {name!r} into {where}: {problem} "
            "(a guest-supplied name must be one plain path component)",
            path=where,
        )
    return name


def _temp_name() -> str:
    # Random and created with O_EXCL: nothing in the guest can plant it in advance.
    return f".msb-{secrets.token_hex(8)}.partial"


@dataclass
class CopyBudget:
    """Bytes and entries one copy may still write; None = unlimited.

    ``what`` describes the copy for error messages.
    """

    max_bytes: int | None = DEFAULT_COPY_MAX_BYTES
    max_entries: int | None = DEFAULT_COPY_MAX_ENTRIES
    what: str = "the copy"
    bytes_used: int = 0
    entries_used: int = 0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_entries"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")

    @property
    def entries_left(self) -> int | None:
        """Entries the copy may still write (None: no limit)."""
        return None if self.max_entries is None else max(0, self.max_entries - self.entries_used)

    def charge_entry(self, path: str) -> None:
        """Count one entry (``path``, for the message); raise CopyLimitError past the budget."""
        self.entries_used += 1
        if self.max_entries is not None and self.entries_used > self.max_entries:
            raise self.too_many_entries(f"{path} would be entry {self.entries_used}", path)

    def too_many_entries(self, detail: str, path: str) -> CopyLimitError:
        """The error for passing the entry budget (``detail`` says where)."""
        return CopyLimitError(
            f"{self.what}: {detail}, over the entry budget max_entries={self.max_entries}; "
            "pass a larger max_entries= (or None for no limit) if the guest tree is that big",
            path=path,
        )

    def check_bytes(self, size: int, path: str) -> None:
        """Raise CopyLimitError if ``size`` more bytes would pass the byte budget."""
        if self.max_bytes is not None and self.bytes_used + size > self.max_bytes:
            raise CopyLimitError(
                f"{self.what}: {path} takes the copy past its byte budget "
                f"max_bytes={self.max_bytes} ({self.bytes_used} bytes written before it); "
                "pass a larger max_bytes= (or None for no limit) if the data is that big",
                path=path,
            )

    def charge_bytes(self, size: int, path: str) -> None:
        """Count ``size`` bytes of ``path``; raise CopyLimitError past the budget."""
        self.check_bytes(size, path)
        self.bytes_used += size


class PartialFile:
    """A file being written under a temporary name; see :meth:`ConfinedDir.new_file`."""

    def __init__(self, file: BinaryIO, budget: CopyBudget | None, path: str) -> None:
        self._file = file
        self._budget = budget
        self._path = path
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append ``data``, charged to the budget first (nothing past it is written)."""
        if self._budget is not None:
            self._budget.charge_bytes(len(data), self._path)
        self._file.write(data)
        self.size += len(data)


class ConfinedDir:
    """An open host directory (a dir fd) under which guest data is written.

    Use as a context manager (closes the fd). Every method works relative to
    the fd and never follows a symlink it did not make.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        #: The directory's host path, for messages only (never opened again).
        self.path = path

    @classmethod
    @contextmanager
    def parent_of(cls, destination: str | os.PathLike[str]) -> Iterator[tuple[ConfinedDir, str]]:
        """Open the parent of the user's ``destination`` and yield it with the final name.

        The parent is the user's own choice: it is created if missing and
        resolved as given (links included). The final name is then handled
        like every guest entry (never followed).
        """
        path = Path(os.path.abspath(os.fspath(destination)))
        if not path.name:
            raise UnsafeHostPathError(
                f"{os.fspath(destination)!r} names no file or directory to write", path=str(path)
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with cls(fd, str(path.parent)) as parent:
            yield parent, path.name

    def __enter__(self) -> ConfinedDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _child(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _not_a_directory(self, name: str) -> UnsafeHostPathError:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            what = "is not a directory"
        else:
            what = "is a symlink" if stat.S_ISLNK(st.st_mode) else "exists and is not a directory"
        return UnsafeHostPathError(
            f"refusing to write into {self._child(name)}: it {what}, and guest data is only "
            "written through directories the copy can enter without following a link; "
            "remove it, or copy to another destination",
            path=self._child(name),
        )

    def subdir(self, name: str, *, create: bool = True) -> ConfinedDir:
        """Open (creating it if ``create`` and missing) the directory ``name`` in here.

        Raises UnsafeHostPathError if ``name`` is not a plain name, or is a
        symlink or anything else but a directory.
        """
        check_entry_name(name, self.path)
        if create:
            with suppress(FileExistsError):
                os.mkdir(name, 0o777, dir_fd=self.fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise self._not_a_directory(name) from None
            raise
        return ConfinedDir(fd, self._child(name))

    def descend(self, names: Sequence[str]) -> ConfinedDir:
        """Open the existing directory ``names[0]/names[1]/...`` below this one,
        one component at a time (each with ``O_NOFOLLOW``).

        The result is a new ConfinedDir (a fresh fd, also for an empty ``names``).
        """
        current = ConfinedDir(os.dup(self.fd), self.path)
        try:
            for name in names:
                child = current.subdir(name, create=False)
                current.close()
                current = child
        except BaseException:
            current.close()
            raise
        return current

    @contextmanager
    def new_file(
        self, name: str, mode: int, *, budget: CopyBudget | None = None
    ) -> Iterator[PartialFile]:
        """Write the file ``name`` in here: yields a :class:`PartialFile` to write to.

        The data goes to a fresh temporary file (mode 0600 while written);
        when the block ends normally it gets ``mode & 0o777`` and replaces
        ``name`` (a file or symlink there is replaced, not followed; a
        directory there is an error). On any exception the temporary is removed.
        """
        check_entry_name(name, self.path)
        tmp = _temp_name()
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as raw:
                partial = PartialFile(raw, budget, self._child(name))
                yield partial
                raw.flush()
                os.fchmod(raw.fileno(), mode & _MODE_MASK)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self._remove_temp(tmp)
            raise

    def symlink(self, name: str, target: str) -> None:
        """Create the symlink ``name`` -> ``target`` in here (replacing a file or
        link of that name); the target is stored as text and never followed."""
        check_entry_name(name, self.path)
        if not target or "\0" in target:
            raise UnsafeHostPathError(
                f"refusing to create the symlink {self._child(name)}: its target "
                f"{target!r} is empty or contains NUL",
                path=self._child(name),
            )
        tmp = _temp_name()
        os.symlink(target, tmp, dir_fd=self.fd)
        try:
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self._remove_temp(tmp)
            raise

    def _remove_temp(self, tmp: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.fd)
