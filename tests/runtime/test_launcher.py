"""The VM launcher (``msb-launch``) without a VM: its seccomp filter, its
parent-death signal, its usage errors and the fallback when it cannot be built.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import launcher
from pytest_microsandbox.runtime.launcher import build_launcher, launch_prefix


@pytest.fixture(scope="module")
def msb_launch() -> Path:
    path, why = build_launcher()
    assert path is not None, why
    return path


MADVISE_PROBE = textwrap.dedent(
    """
    import mmap
    out = []
    for mib in (2, 4):
        m = mmap.mmap(-1, mib << 20)
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
            out.append(f"{mib}:ok")
        except OSError as exc:
            out.append(f"{mib}:errno{exc.errno}")
        m.madvise(mmap.MADV_DONTNEED)  # other advice is never refused
    seccomp = [l for l in open("/proc/self/status") if l.startswith("Seccomp:")]
    print(" ".join(out), seccomp[0].split()[1])
    """
)


def test_filter_refuses_huge_pages_for_small_ranges_only(msb_launch: Path) -> None:
    plain = subprocess.run(
        [sys.executable, "-c", MADVISE_PROBE], capture_output=True, text=True, check=True
    )
    if plain.stdout.split()[:2] != ["2:ok", "4:ok"]:
        pytest.skip(f"this kernel has no transparent huge pages: {plain.stdout.strip()}")
    argv = [str(msb_launch), str(os.getpid()), "--", sys.executable, "-c", MADVISE_PROBE]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    # 2 MiB (QEMU's ACPI table block) refused with EINVAL; 4 MiB and up keep THP.
    assert out.stdout.split() == ["2:errno22", "4:ok", "2"]  # Seccomp: 2 = filter mode


def test_refuses_bad_usage_and_a_parent_that_is_not_its_own(msb_launch: Path) -> None:
    for argv, message in (
        ([str(msb_launch), "true"], "usage:"),
        ([str(msb_launch), "x1", "--", "/bin/true"], "bad parent pid x1"),
        ([str(msb_launch), "1", "--", "/nonexistent/qemu"], ""),
        ([str(msb_launch), str(os.getpid()), "--", "/nonexistent/qemu"], "cannot exec"),
    ):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 127, argv
        assert message in out.stderr, (argv, out.stderr)


def test_child_dies_with_the_process_that_launched_it(msb_launch: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            f"p = subprocess.Popen([{str(msb_launch)!r}, str(os.getpid()), '--', "
            "'/bin/sleep', '60'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child)


def _gone(pid: int) -> bool:
    """Reaped, or a zombie waiting for init (or a subreaper) to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def test_without_a_compiler_qemu_runs_under_setpriv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(launcher, "_COMPILERS", ("no-such-cc",))
    path, why = build_launcher(tmp_path)
    assert path is None and "no C compiler found (tried no-such-cc)" in why
    prefix = launch_prefix(tmp_path)
    assert prefix[1:] == ["--pdeathsig", "KILL", "--"] or prefix == []
    # A failed build is not retried at every VM start.
    calls: list[Path | None] = []
    monkeypatch.setattr(launcher, "build_launcher", lambda base=None: calls.append(base))
    assert launch_prefix(tmp_path) == prefix and calls == []


def test_console_keeper_bounds_the_log_and_keeps_its_newest_bytes(
    msb_launch: Path, tmp_path: Path
) -> None:
    log = tmp_path / "console.log"
    # 200 KB of noise, then a last line: the file stays within 8 KiB and ends with it.
    script = "head -c 200000 /dev/zero | tr '\\0' x >&3; echo; echo LAST-LINE >&3"
    argv = [str(msb_launch), str(os.getpid()), "--console", str(log), "--console-max", "8192",
            "--", "/bin/sh", "-c", script]  # fmt: skip
    subprocess.run(argv, check=True, timeout=60)
    deadline = time.monotonic() + 10  # the keeper drains the pipe after the program exits
    while not log.read_bytes().endswith(b"LAST-LINE\n") and time.monotonic() < deadline:
        time.sleep(0.05)
    data = log.read_bytes()
    assert data.endswith(b"LAST-LINE\n")
    assert 0 < len(data) <= 8192
    assert log.stat().st_mode & 0o777 == 0o600


def test_console_keeper_refuses_a_tiny_bound(msb_launch: Path, tmp_path: Path) -> None:
    argv = [str(msb_launch), str(os.getpid()), "--console", str(tmp_path / "c"),
            "--console-max", "10", "--", "/bin/true"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 127 and "bad --console-max" in out.stderr


def test_launch_prefix_asks_for_the_console_keeper(tmp_path: Path) -> None:
    prefix = launch_prefix(console=tmp_path / "console.log")
    if "msb-launch" not in Path(prefix[0]).name:
        pytest.skip("no launcher here (no C compiler)")
    assert prefix[2:6] == ["--console", str(tmp_path / "console.log"), "--console-max",
                           str(launcher.CONSOLE_MAX_BYTES)]  # fmt: skip
