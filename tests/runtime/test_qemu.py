"""QEMU command line (pure) and console tail reading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._exceptions import BootError
from pytest_microsandbox.runtime.backend import DiskSpec, VMSpec, read_console_tail
from pytest_microsandbox.runtime.qemu import (
    TCG_CPU,
    TCG_CPU_ENV,
    TCG_TB_SIZE_MIB,
    build_command,
    tcg_cpu,
)


def spec(tmp_path: Path, accel: str = "tcg") -> VMSpec:
    return VMSpec(
        name="t",
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        cmdline="console=ttyS0",
        cpus=2,
        memory_mib=512,
        accel=accel,  # type: ignore[arg-type]
        run_dir=tmp_path,
        disks=(DiskSpec("l-usr", tmp_path / "usr.erofs"),),
    )


def test_tcg_command_line(tmp_path: Path) -> None:
    argv = build_command(spec(tmp_path))
    joined = " ".join(argv)
    assert f"tcg,tb-size={TCG_TB_SIZE_MIB}" in joined
    assert argv[argv.index("-cpu") + 1] == TCG_CPU and "-no-reboot" in joined
    assert "serial=l-usr" in joined and "readonly=on" in joined
    assert f"path={tmp_path / 'agent.sock'},server=off" in joined


def test_tcg_cpu_drops_erms_and_smap_and_can_be_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ERMS makes the guest kernel clear and copy memory a byte per emulated
    # iteration, SMAP ends a translation block at each user access: the default
    # model leaves both out.
    assert TCG_CPU == "max,-erms,-smap" and tcg_cpu() == TCG_CPU
    monkeypatch.setenv(TCG_CPU_ENV, "max")
    argv = build_command(spec(tmp_path))
    assert argv[argv.index("-cpu") + 1] == "max"
    monkeypatch.setenv(TCG_CPU_ENV, "max -S")
    with pytest.raises(BootError, match=TCG_CPU_ENV):
        build_command(spec(tmp_path))


def test_a_clone_runs_on_its_templates_cpu_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TCG_CPU_ENV, "max,-erms,-smap")
    argv = build_command(dataclasses.replace(spec(tmp_path), cpu_model="max"))
    assert argv[argv.index("-cpu") + 1] == "max"


def test_kvm_uses_host_cpu(tmp_path: Path) -> None:
    argv = build_command(spec(tmp_path, "kvm"))
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"


def test_console_tail_is_printable_and_bounded(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(b"line %d\x1b\x07\n" % i for i in range(100)))
    tail = read_console_tail(log, lines=3)
    assert tail.splitlines() == ["line 97", "line 98", "line 99"]
    assert read_console_tail(tmp_path / "missing.log") == ""
