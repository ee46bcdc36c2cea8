"""The VM launcher (``launcher.c``, ``msb-launch``): QEMU is exec'd through it.

It gives QEMU a parent-death signal (QEMU dies with the Python process that
started it) and a seccomp filter that turns down transparent huge pages for
ranges of at most 2 MiB: QEMU asks for them on every RAM block, and its 2 MiB
ACPI table block, which holds ~4 KiB, would cost each clone a whole huge
page. Python cannot set either on a child without an unsafe ``preexec_fn``.

It also keeps the guest's serial console log bounded (:data:`CONSOLE_MAX_BYTES`):
the console is guest data written on the host, and guest root can write to it
forever. QEMU writes it into a pipe (fd 3); a keeper process the launcher
forks copies the pipe into ``console.log`` and keeps only the newest half of
it whenever it would pass the bound.

It is compiled once into the cache directory, like the guest agent. Without
a C compiler QEMU runs under ``setpriv --pdeathsig KILL`` (util-linux), each
VM uses 2 MiB more and its console log is unbounded;
``python -m pytest_microsandbox.runtime.launcher`` builds it and prints its path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from . import paths
from ._cbuild import compile_cached

__all__ = [
    "CONSOLE_FD",
    "CONSOLE_MAX_BYTES",
    "LAUNCHER_SOURCE",
    "build_launcher",
    "launch_prefix",
    "main",
]

#: The launcher's single C source file.
LAUNCHER_SOURCE: Path = Path(__file__).with_name("launcher.c")

#: It includes the kernel's uapi headers (linux-libc-dev), which musl-gcc does not see.
_COMPILERS: tuple[str, ...] = ("cc", "gcc")
_CFLAGS: tuple[str, ...] = ("-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-s")

#: Largest size of a VM's console log; past it the oldest half goes. Ample for
#: a boot log (~10 KiB with ``quiet``) and the panic trace of a crash.
CONSOLE_MAX_BYTES = 1 << 20
#: The descriptor QEMU writes the console to under the launcher.
CONSOLE_FD = 3

_built: dict[Path, Path | None] = {}


def build_launcher(cache_dir: Path | None = None) -> tuple[Path | None, str]:
    """Return the launcher binary, compiling it if needed, or ``None`` and why not."""
    base = cache_dir if cache_dir is not None else paths.cache_dir()
    result = compile_cached(LAUNCHER_SOURCE, "msb-launch", base / "bin", _COMPILERS, _CFLAGS)
    if result.binary is not None:
        return result.binary, ""
    if not result.failures:
        return None, f"no C compiler found (tried {', '.join(_COMPILERS)})"
    return None, "compiling it failed:\n" + "\n\n".join(result.failures)


def launch_prefix(cache_dir: Path | None = None, *, console: Path | None = None) -> list[str]:
    """The argv prefix QEMU is started under: the launcher, else ``setpriv``, else none.

    With ``console``, the launcher keeps that file as the bounded copy of what
    QEMU writes to fd :data:`CONSOLE_FD` (``"--console"`` is then in the prefix).
    """
    base = cache_dir if cache_dir is not None else paths.cache_dir()
    launcher = _built.get(base)
    # Built once per process; again only if the binary was deleted since (a
    # failed build is not retried at every VM start).
    if base not in _built or (launcher is not None and not launcher.is_file()):
        launcher = _built[base] = build_launcher(base)[0]
    if launcher is not None:
        keeper = (
            ["--console", str(console), "--console-max", str(CONSOLE_MAX_BYTES)]
            if console is not None
            else []
        )
        return [str(launcher), str(os.getpid()), *keeper, "--"]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def main() -> int:
    """Build the launcher and print the path of the binary."""
    path, why = build_launcher()
    if path is None:
        print(f"cannot build the VM launcher: {why}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
