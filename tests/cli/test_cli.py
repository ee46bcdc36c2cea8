"""The ``microsandbox`` command without a VM, through subprocess: usage, exit
codes, output, and the snapshot store of a private cache (fake entries).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_microsandbox.cli._common import age, parse_bytes, parse_duration, table
from pytest_microsandbox.runtime._integrity import record_digest
from pytest_microsandbox.snapshots import SnapshotMeta, _store

BIN = Path(sys.executable).parent


def cli(*args: str, cache: Path, script: str = "microsandbox") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MICROSANDBOX_CACHE_DIR": str(cache)}
    return subprocess.run(
        [str(BIN / script), *args], capture_output=True, text=True, timeout=120, env=env
    )


def fake_entry(cache: Path, name: str, kind: str = "snapshot", mib: int = 1) -> Path:
    """A published store entry holding ``mib`` MiB (no VM behind it)."""
    tmp = cache / f".tmp-{name}-pid{os.getpid()}-x"
    tmp.mkdir(parents=True)
    kernel = cache / "kernel"
    kernel.write_bytes(b"k")
    record_digest(kernel)
    (tmp / _store.MEMORY).write_bytes(b"\1" * (mib << 20))
    (tmp / _store.STATE).write_bytes(b"state")
    meta = SnapshotMeta(
        kind=kind,  # type: ignore[arg-type]
        name=name, template="t", created=time.time(), qemu_version=_store.current_qemu_version(),
        accel="tcg", cpus=1, memory_mib=mib, kernel=str(kernel), kernel_size=1,
        initrd=str(kernel), initrd_size=1, cmdline="", disks=(), volume_slots=0, state_size=5,
        config="{}",
    )  # fmt: skip
    _store.write_meta(tmp, meta)
    root = _store.named_root(cache) if kind == "snapshot" else _store.templates_root(cache)
    _store.publish(tmp, root / name, None)
    return root / name


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_help_lists_every_command(tmp_path: Path):
    result = cli("--help", cache=tmp_path)
    assert result.returncode == 0
    for command in ("run", "exec", "shell", "snapshot", "prune", "doctor"):
        assert f"    {command} " in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("bogus",), "invalid choice: 'bogus'"),
        (("snapshot",), "required: ACTION"),
        (("prune", "--older-than", "soon"), "'soon' is not a duration"),
        (("prune", "--max-size", "big"), "'big' is not a size"),
        (("exec", "somevm"), "exec needs a command"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], needle: str):
    result = cli(*args, cache=tmp_path)
    assert result.returncode == 2, result
    assert needle in result.stderr


def test_snapshot_ls_empty_table_and_json(tmp_path: Path):
    result = cli("snapshot", "ls", cache=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, result.stdout.strip())
    assert "no snapshots" in result.stdout
    assert json.loads(cli("snapshot", "ls", "--json", cache=tmp_path).stdout) == []


def test_snapshot_ls_hides_the_plugins_own_unless_all(tmp_path: Path):
    fake_entry(tmp_path, "failed-t.py-test_x-0123abcd", mib=2)
    fake_entry(tmp_path, "zygote-0123")
    fake_entry(tmp_path, "tmpl-key", kind="template")
    result = cli("snapshot", "ls", cache=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "CREATED", "USED", "DISK", "MEMORY"]
    assert [line.split()[0] for line in lines[1:]] == ["failed-t.py-test_x-0123abcd"]
    assert lines[1].split()[-2:] == ["2", "MiB"]
    everything = json.loads(cli("snapshot", "ls", "--all", "--json", cache=tmp_path).stdout)
    assert {(e["name"], e["kind"]) for e in everything} == {
        ("failed-t.py-test_x-0123abcd", "snapshot"),
        ("zygote-0123", "snapshot"),
        ("tmpl-key", "template"),
    }
    # Aligned: every row's second column starts where the header's does.
    table_lines = cli("snapshot", "ls", "-a", cache=tmp_path).stdout.splitlines()
    assert len({line.index(" snapshot") if " snapshot" in line else line.index(" template")
                for line in table_lines[1:]}) == 1  # fmt: skip


def test_snapshot_rm_removes_and_names_what_is_missing(tmp_path: Path):
    fake_entry(tmp_path, "mine")
    result = cli("snapshot", "rm", "mine", "nope", cache=tmp_path)
    assert result.returncode == 1
    assert "removed mine" in result.stdout
    assert "no snapshot named 'nope'" in result.stderr
    assert "microsandbox snapshot ls" in result.stderr  # what to do
    assert json.loads(cli("snapshot", "ls", "--json", cache=tmp_path).stdout) == []
    bad = cli("snapshot", "rm", "../etc", cache=tmp_path)
    assert bad.returncode == 1 and "invalid snapshot name" in bad.stderr


def test_exec_and_shell_of_a_missing_snapshot_say_what_to_do(tmp_path: Path):
    for args in (("exec", "nope", "--", "true"), ("shell", "nope")):
        result = cli(*args, cache=tmp_path)
        assert result.returncode == 1
        assert "neither a running sandbox" in result.stderr
        assert "no snapshot at " in result.stderr and "/nope;" in result.stderr
        assert "microsandbox ls" in result.stderr
        assert "microsandbox snapshot ls" in result.stderr


def test_prune_removes_idle_templates_and_zygotes_not_kept_tests(tmp_path: Path):
    for name, kind in (("zygote-old", "snapshot"), ("tmpl-old", "template"),
                       ("failed-old-01234567", "snapshot"), ("mine-old", "snapshot")):  # fmt: skip
        _age(fake_entry(tmp_path, name, kind=kind), 3 * 86400)
    fake_entry(tmp_path, "zygote-fresh")  # used just now: spared
    result = cli("prune", "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(r["name"] for r in report["removed"]) == ["tmpl-old", "zygote-old"]
    assert report["freed_bytes"] >= 2 << 20
    left = {
        e["name"] for e in json.loads(cli("snapshot", "ls", "-a", "--json", cache=tmp_path).stdout)
    }
    assert left == {"failed-old-01234567", "mine-old", "zygote-fresh"}
    # --kept takes the failed tests' snapshots too; a user's own snapshot stays.
    result = cli("prune", "--kept", "--older-than", "1d", cache=tmp_path)
    assert result.returncode == 0
    assert "removed snapshot failed-old-01234567" in result.stdout
    assert "1 removed" in result.stdout


def test_doctor_and_its_old_name(tmp_path: Path):
    env_kernel = {"MICROSANDBOX_KERNEL_DIR": str(tmp_path / "no-kernel")}
    os.environ.update(env_kernel)
    try:
        new = cli("doctor", "--no-probe", "--json", cache=tmp_path)
        old = cli("--no-probe", cache=tmp_path, script="microsandbox-doctor")
    finally:
        del os.environ["MICROSANDBOX_KERNEL_DIR"]
    assert new.returncode == 1 and old.returncode == 1
    report = json.loads(new.stdout)
    assert not report["ok"] and any("kernel" in p for p in report["problems"])
    assert report["facts"]["cache directory"] == str(tmp_path)
    assert "NOT READY" in old.stdout and str(tmp_path) in old.stdout


def test_helpers():
    assert parse_bytes("10G") == 10 << 30 and parse_bytes("1.5MiB") == 3 << 19
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90
    assert age(time.time() - 7200) == "2h"
    assert table(["A", "BB"], [["xyz", "1"], ["q", "22"]], right=(1,)).splitlines() == [
        "A    BB",
        "xyz   1",
        "q    22",
    ]
