"""Peak host memory of collecting a command's output (issue #19, item 5).

Boots one sandbox and runs ``head -c 500M /dev/zero`` in it, in the mode named
on the command line, then prints the host process's RSS before and its peak
(VmHWM, reset just before the exec) after:

    .venv/bin/python scripts/measure_output_memory.py default   # 64 MiB cap, raise
    .venv/bin/python scripts/measure_output_memory.py truncate  # 64 MiB cap, truncate
    .venv/bin/python scripts/measure_output_memory.py all       # collect all 500 MiB

Linux only (/proc/self/status, /proc/self/clear_refs). Not a test: it takes
20 s or so under TCG and its numbers depend on the host.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio

from pytest_microsandbox.runtime import Sandbox, SandboxConfig, SandboxError


def _status_mib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


async def main(mode: str) -> None:
    options: dict[str, Any] = {
        "default": {},
        "truncate": {"on_output_limit": "truncate"},
        "all": {"max_output": 600 << 20},
    }[mode]
    async with await Sandbox.create(SandboxConfig(name="measure-output")) as sb:
        await sb.exec("true")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = _status_mib("VmRSS:")
        start = time.monotonic()
        try:
            out = await sb.exec("sh", ["-c", "head -c 500M /dev/zero"], **options)
            what = f"collected {len(out.stdout) >> 20} MiB, truncated={out.truncated}"
        except SandboxError as exc:
            kept = len(getattr(exc, "stdout", b"")) >> 20
            what = f"{type(exc).__name__}, kept {kept} MiB"
        peak = _status_mib("VmHWM:")
        print(
            f"{mode}: RSS {base} MiB before, peak {peak} MiB (+{peak - base}); "
            f"{what}; {time.monotonic() - start:.1f} s"
        )


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "default")
