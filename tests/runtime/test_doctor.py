"""microsandbox-doctor names what is missing and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_microsandbox.runtime import doctor
from pytest_microsandbox.runtime.paths import CACHE_DIR_ENV


def test_missing_kernel_is_a_problem_with_a_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("MICROSANDBOX_KERNEL_DIR", raising=False)
    assert doctor.main(["--no-probe"]) == 1
    out = capsys.readouterr().out
    assert "no guest kernel" in out and "kernel provision" in out
    assert "NOT READY" in out and str(tmp_path) in out


def test_missing_qemu_is_a_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-x86_64 on PATH
    report = doctor.diagnose(probe=False)
    assert not report.ok
    assert any("apt-get install qemu-system-x86" in p for p in report.problems)
