"""The host's dynamic loader and the shared libraries its Python needs, staged
under ``/.msb/hostlib`` for a guest whose root is another image.

The guest runner of marked tests is the host's Python (its prefix, venv and
project are stacked over the image at their host paths). Its libraries (libc,
libm, libssl, libffi, ...) cannot go to their host paths: the image's own
programs would then load the host's libc through the image's loader, a
mismatch that crashes them. So they go to a directory of their own, and the
runner is started through the host's loader with that directory as its
library path (:data:`HOST_LOADER_ARGV`): it depends on nothing in the image
(any glibc version, musl, no libc at all), while whatever the test starts runs
on the image's own libc, as it would in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._exceptions import ImageError

__all__ = [
    "HOSTLIB_DIR",
    "HOST_FSCK_EROFS_ARGV",
    "HOST_LOADER_ARGV",
    "HOST_PYTHON_WRAPPER",
    "HOST_SETSID_ARGV",
    "host_python_roots",
    "stage_host_libs",
]

#: Where the libraries go in the guest.
HOSTLIB_DIR = "/.msb/hostlib"
_LOADER_NAME = "ld-linux-x86-64.so.2"
#: What starts a host program in such a guest: the host's loader, our libraries first.
HOST_LOADER_ARGV = (f"{HOSTLIB_DIR}/{_LOADER_NAME}", "--library-path", HOSTLIB_DIR)
#: A shell script starting the host's Python the same way: the guest runner's
#: ``sys.executable``, so ``subprocess.run([sys.executable, ...])`` works too.
HOST_PYTHON_WRAPPER = f"{HOSTLIB_DIR}/python"
#: Host programs the runner needs that an image may lack (setsid: util-linux;
#: fsck.erofs extracts the project copied in), run the same way.
_TOOLS = ("setsid", "fsck.erofs")
HOST_SETSID_ARGV = (*HOST_LOADER_ARGV, f"{HOSTLIB_DIR}/setsid")
HOST_FSCK_EROFS_ARGV = (*HOST_LOADER_ARGV, f"{HOSTLIB_DIR}/fsck.erofs")
#: Extension modules whose closure is a desktop (X11, Tk): left out.
_SKIP = ("_tkinter",)
_NEEDED = re.compile(r"^\s*(\S+) => (/\S+) \(0x[0-9a-f]+\)$")


def host_python_roots() -> tuple[Path, Path]:
    """The host Python's prefix and venv (resolved).

    :raises ImageError: the prefix is under ``/usr`` (a system Python): its
        layer would be ``/usr`` and hide the image's own.
    """
    base = Path(sys.base_prefix).resolve()
    if base == Path("/usr") or Path("/usr") in base.parents:
        raise ImageError(
            f"the host's Python lives in {base}: stacked over an image it would hide the "
            "image's /usr. Run pytest with a Python installed outside /usr (pyenv, "
            "uv python install, /opt, conda) to run marked tests in an image, or mark "
            "them with image='host'"
        )
    return base, Path(sys.prefix).resolve()


def _elf_files(base: Path, venv: Path) -> Iterator[Path]:
    """The interpreter and every shared object of the prefix and the venv."""
    yield Path(os.path.realpath(sys.executable))
    for tree in dict.fromkeys((base, venv)):
        for path in tree.rglob("*.so*"):
            if path.is_file() and not path.name.startswith(_SKIP):
                yield path


def _ldd(files: list[Path]) -> dict[Path, dict[str, str]]:
    """For each of ``files``: soname -> host path of the libraries it loads."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise ImageError("ldd not found: install libc-bin (Debian) to run marked tests in an image")
    out: dict[Path, dict[str, str]] = {f: {} for f in files}
    for start in range(0, len(files), 200):  # bounded command lines
        chunk = files[start : start + 200]
        proc = subprocess.run(
            [ldd, *map(os.fspath, chunk)], capture_output=True, text=True, errors="replace"
        )
        current = chunk[0]
        for line in proc.stdout.splitlines():
            if not line.startswith("\t") and line.endswith(":"):
                current = Path(line[:-1])  # ldd names each file when given several
            elif (match := _NEEDED.match(line)) and current in out:
                out[current][match.group(1)] = match.group(2)
    return out


def _needed(files: list[Path], memo: Path | None) -> dict[str, Path]:
    """soname -> host path of every library ``files`` load (transitively).

    ``ldd`` costs ~40 ms a file here and a venv holds hundreds of them, so its
    answers are kept in ``memo`` (a JSON file) per (path, size, mtime).
    """
    known: dict[str, Any] = {}
    if memo is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(memo.read_text())
            known = loaded if isinstance(loaded, dict) else {}
    stamps = {}
    for f in files:
        st = f.stat()
        stamps[os.fspath(f)] = [st.st_size, st.st_mtime_ns]
    todo = [f for f in files if (known.get(os.fspath(f)) or [None])[0] != stamps[os.fspath(f)]]
    for path, libs in _ldd(todo).items():
        known[os.fspath(path)] = [stamps[os.fspath(path)], libs]
    out: dict[str, Path] = {}
    for f in files:
        entry = known.get(os.fspath(f))
        libs = entry[1] if isinstance(entry, list) and len(entry) == 2 else {}
        for name, where in libs.items():
            out.setdefault(name, Path(where))
    if memo is not None and todo:
        fresh = {os.fspath(f): known[os.fspath(f)] for f in files if os.fspath(f) in known}
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, memo)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def stage_host_libs(root: Path, memo: Path | None = None) -> None:
    """Copy the host's loader and the libraries its Python needs into ``root`` +
    :data:`HOSTLIB_DIR`; libraries inside the Python prefix or venv stay out
    (the guest has those trees at their host paths, where RUNPATHs find them).
    ``memo``: where to keep ``ldd``'s answers between runs.
    """
    base, venv = host_python_roots()
    dest = root / HOSTLIB_DIR.lstrip("/")
    dest.mkdir(parents=True)
    for parent in (dest, *dest.parents):
        if parent == root:
            break
        parent.chmod(0o755)
    loader = Path(f"/lib64/{_LOADER_NAME}")
    if not loader.exists():
        raise ImageError(f"{loader} not found: marked tests in an image need an x86-64 glibc host")
    shutil.copyfile(os.path.realpath(loader), dest / _LOADER_NAME)
    (dest / _LOADER_NAME).chmod(0o755)
    files = list(dict.fromkeys(_elf_files(base, venv)))
    wrapper = dest / "python"
    # The venv's own path as argv[0]: Python finds its pyvenv.cfg from there.
    wrapper.write_text(
        "#!/bin/sh\nexec "
        + " ".join(shlex.quote(a) for a in (*HOST_LOADER_ARGV, sys.executable))
        + ' "$@"\n'
    )
    wrapper.chmod(0o755)
    for tool in _TOOLS:
        found = shutil.which(tool)
        if found is None:
            raise ImageError(
                f"{tool} not found on the host: install it (Debian: util-linux, erofs-utils) "
                "to run marked tests in an image"
            )
        shutil.copyfile(os.path.realpath(found), dest / tool)
        (dest / tool).chmod(0o755)
        files.append(Path(found))
    for name, path in sorted(_needed(files, memo).items()):
        real = Path(os.path.realpath(path))
        if real.is_relative_to(base) or real.is_relative_to(venv) or "/" in name:
            continue
        shutil.copyfile(real, dest / name)
        (dest / name).chmod(0o755)
