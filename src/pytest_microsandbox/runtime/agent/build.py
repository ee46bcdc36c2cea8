"""Compile the static guest agent (``agent.c``) into the cache directory.

The binary is named after a hash of the source and the compiler command, so
editing ``agent.c`` or switching compilers builds a new one while old ones
stay valid.  ``python -m pytest_microsandbox.runtime.agent.build`` builds it
and prints its path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from pytest_microsandbox.runtime import paths
from pytest_microsandbox.runtime._exceptions import AgentBuildError

__all__ = ["AGENT_SOURCE", "CFLAGS", "build_agent", "main"]

#: The agent's single C source file.
AGENT_SOURCE: Path = Path(__file__).with_name("agent.c")

#: Flags for every compiler; ``-s`` strips symbols to keep the initramfs small.
CFLAGS: tuple[str, ...] = ("-std=c11", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s")

#: Tried in order when no compiler is given: musl makes a small binary without
#: glibc's static-linking caveats; the system compiler (glibc static) is the fallback.
DEFAULT_COMPILERS: tuple[str, ...] = ("musl-gcc", "cc", "gcc")

_FIX_HINT = "install musl-tools or libc6-dev: apt-get install musl-tools"


def _binary_name(source: bytes, compiler: str) -> str:
    digest = hashlib.sha256()
    digest.update(source)
    digest.update(b"\0" + os.path.basename(compiler).encode())
    for flag in CFLAGS:
        digest.update(b"\0" + flag.encode())
    return f"agent-{digest.hexdigest()[:16]}"


def build_agent(cache_dir: Path | None = None, *, compiler: str | None = None) -> Path:
    """Return the path of the compiled agent, compiling it if it is not cached.

    ``cache_dir`` defaults to :func:`pytest_microsandbox.runtime.paths.cache_dir`;
    the binary lives in its ``agent/`` subdirectory.  ``compiler`` pins one
    compiler; by default musl-gcc is preferred, then cc/gcc.

    Raises :class:`AgentBuildError` (with the compiler output) if no compiler works.
    """
    base = cache_dir if cache_dir is not None else paths.cache_dir()
    out_dir = base / "agent"
    out_dir.mkdir(parents=True, exist_ok=True)
    source = AGENT_SOURCE.read_bytes()

    candidates = [compiler] if compiler else list(DEFAULT_COMPILERS)
    available = [c for c in candidates if shutil.which(c)]
    if not available:
        raise AgentBuildError(
            f"no C compiler found (tried {', '.join(candidates)}) to build the guest agent; "
            + _FIX_HINT
        )

    def cached() -> Path | None:
        for cc in available:
            target = out_dir / _binary_name(source, cc)
            if target.is_file():
                return target
        return None

    hit = cached()
    if hit is not None:
        return hit
    failures: list[str] = []
    with FileLock(str(out_dir / ".build.lock")):
        hit = cached()  # another process may have built it while we waited
        if hit is not None:
            return hit
        for cc in available:
            target = out_dir / _binary_name(source, cc)
            tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
            cmd = [cc, *CFLAGS, "-o", str(tmp), str(AGENT_SOURCE)]
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
            return target
    raise AgentBuildError(
        "could not compile the guest agent:\n" + "\n\n".join(failures) + f"\nhint: {_FIX_HINT}"
    )


def main() -> int:
    """Build the agent and print the path of the binary."""
    try:
        path = build_agent()
    except AgentBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
