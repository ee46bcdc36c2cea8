"""``microsandbox ls/stop/rm`` (cli/_sandboxes.py) through ``subprocess``, no VM:
the sandboxes are the real agent as a host process (HostProcessBackend),
registered in a private cache directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from pytest_microsandbox.cli._sandboxes import format_table

_OWNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox
    from pytest_microsandbox.runtime.hostproc import HostProcessBackend
    boxes = [
        SyncSandbox.create(
            SandboxConfig(name=name, cache_dir=Path(sys.argv[1])),
            backend=HostProcessBackend(), register=True,
        )
        for name in ("alpha", "a-much-longer-name")
    ]
    print("up", flush=True)
    sys.stdin.readline()
    print(*(sb.status.value for sb in boxes), flush=True)
    for sb in boxes:
        sb.stop()
    """
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_microsandbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_format_table_aligns_columns() -> None:
    text = format_table(["NAME", "STATUS"], [["a", "running"], ["longer-name", "paused"]])
    assert text.splitlines() == [
        "NAME         STATUS",
        "a            running",
        "longer-name  paused",
    ]


def test_ls_stop_rm_and_their_exit_codes(tmp_path: Path) -> None:
    cache = str(tmp_path)
    empty = _cli("ls", "--cache-dir", cache)
    assert (empty.returncode, empty.stdout.split()) == (
        0,
        ["NAME", "STATUS", "CREATED", "MODE", "OWNER", "VM", "PID", "IMAGE"],
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, cache],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        listed = _cli("ls", "--json", "--cache-dir", cache)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [r["name"] for r in rows] == ["alpha", "a-much-longer-name"]
        assert {r["status"] for r in rows} == {"running"}
        assert {r["owner_pid"] for r in rows} == {owner.pid}
        table = _cli("ls", "--cache-dir", cache).stdout.splitlines()
        assert len(table) == 3
        # Aligned: every row's second column starts where the header's does.
        column = table[0].index("STATUS")
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in table)

        stopped = _cli("stop", "alpha", "--cache-dir", cache)
        assert (stopped.returncode, stopped.stdout.strip()) == (0, "alpha")
        missing = _cli("rm", "alpha", "a-much-longer-name", "--cache-dir", cache)
        assert missing.returncode == 1
        assert "no live sandbox is named 'alpha'" in missing.stderr
        assert "microsandbox ls" in missing.stderr
        assert missing.stdout.strip() == "a-much-longer-name"  # the others still go
        assert _cli("rm", "-f", "alpha", "--cache-dir", cache).returncode == 0
        assert json.loads(_cli("ls", "--json", "--cache-dir", cache).stdout) == []
        out, _ = owner.communicate("go\n", timeout=60)
        assert out.split() == ["crashed", "crashed"]  # their VMs were killed from outside
    finally:
        owner.kill()
        owner.wait()


def test_bad_usage_exits_2() -> None:
    assert _cli().returncode == 2
    assert _cli("rm").returncode == 2
    assert _cli("frobnicate").returncode == 2
