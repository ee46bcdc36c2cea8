"""Compile the static guest agent (``agent.c``) into the cache directory.

The binary is named after a hash of the source and the compiler command
(:mod:`.._cbuild`), so editing ``agent.c`` or switching compilers builds a new
one while old ones stay valid.  ``python -m pytest_microsandbox.runtime.agent.build``
builds it and prints its path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_microsandbox.runtime import paths
from pytest_microsandbox.runtime._cbuild import compile_cached
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


def build_agent(cache_dir: Path | None = None, *, compiler: str | None = None) -> Path:
    """Return the path of the compiled agent, compiling it if it is not cached.

    ``cache_dir`` defaults to :func:`pytest_microsandbox.runtime.paths.cache_dir`;
    the binary lives in its ``agent/`` subdirectory.  ``compiler`` pins one
    compiler; by default musl-gcc is preferred, then cc/gcc.

    Raises :class:`AgentBuildError` (with the compiler output) if no compiler works.
    """
    base = cache_dir if cache_dir is not None else paths.cache_dir()
    candidates = [compiler] if compiler else list(DEFAULT_COMPILERS)
    result = compile_cached(AGENT_SOURCE, "agent", base / "agent", candidates, CFLAGS)
    if result.binary is not None:
        return result.binary
    if not result.failures:
        raise AgentBuildError(
            f"no C compiler found (tried {', '.join(candidates)}) to build the guest agent; "
            + _FIX_HINT
        )
    raise AgentBuildError(
        "could not compile the guest agent:\n"
        + "\n\n".join(result.failures)
        + f"\nhint: {_FIX_HINT}"
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
