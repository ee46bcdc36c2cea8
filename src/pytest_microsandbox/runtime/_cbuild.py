"""Compile one C source file into a cached binary (the guest agent, the VM launcher).

The binary is named after a hash of the source, the compiler and the flags, so
an edit or another compiler builds a new one while old ones stay valid. A file
lock (:func:`~._locks.cache_lock`) makes concurrent processes (xdist workers)
and threads compile it once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._keys import digest_parts
from ._locks import cache_lock, cache_lock_timeout

__all__ = ["CompileResult", "compile_cached"]


@dataclass(frozen=True)
class CompileResult:
    """The binary; else why each installed compiler failed (none installed: empty)."""

    binary: Path | None
    failures: tuple[str, ...] = ()


def _binary_name(stem: str, source: bytes, compiler: str, flags: Sequence[str]) -> str:
    return f"{stem}-{digest_parts(source, os.path.basename(compiler), *flags, length=16)}"


def compile_cached(
    source_path: Path,
    stem: str,
    out_dir: Path,
    compilers: Sequence[str],
    flags: Sequence[str],
) -> CompileResult:
    """Return ``out_dir/<stem>-<hash>``, compiling ``source_path`` with the first of
    ``compilers`` that is installed and succeeds, unless one of them built it before.
    Blocking (run it in a worker thread from async code).

    :raises LockTimeoutError: another process compiled into ``out_dir`` for longer
        than ``$MICROSANDBOX_CACHE_LOCK_TIMEOUT`` (default 300 s).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    source = source_path.read_bytes()
    available = [c for c in compilers if shutil.which(c)]

    def cached() -> Path | None:
        for cc in available:
            target = out_dir / _binary_name(stem, source, cc, flags)
            if target.is_file():
                return target
        return None

    hit = cached()
    if hit is not None or not available:
        return CompileResult(hit)
    failures: list[str] = []
    lock = cache_lock(out_dir / ".build.lock", f"the compile of {stem} into {out_dir}")
    lock.acquire(cache_lock_timeout(300))
    try:
        hit = cached()  # another process may have built it while we waited
        if hit is not None:
            return CompileResult(hit)
        for cc in available:
            target = out_dir / _binary_name(stem, source, cc, flags)
            tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
            cmd = [cc, *flags, "-o", str(tmp), str(source_path)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as exc:
                failures.append(f"$ {' '.join(cmd)}\n{exc}")
                continue
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                failures.append(f"$ {' '.join(cmd)}\n{proc.stderr.strip()}")
                continue
            tmp.chmod(0o755)
            os.replace(tmp, target)
            return CompileResult(target)
    finally:
        lock.release()
    return CompileResult(None, tuple(failures))
