"""Accelerator choice: forced, no KVM, probe verdict cached per host boot."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import BootError
from pytest_microsandbox.runtime import accel as accel_mod
from pytest_microsandbox.runtime.accel import choose_accel


def run(choice: str, cache: Path, probe: object) -> accel_mod.AccelDecision:
    return anyio.run(choose_accel, choice, cache, probe)


def test_forced(tmp_path: Path) -> None:
    assert run("tcg", tmp_path, None).accel == "tcg"
    assert run("kvm", tmp_path, None).accel == "kvm"


def test_no_kvm_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: (False, "/dev/kvm does not exist"))
    decision = run("auto", tmp_path, None)
    assert decision.accel == "tcg" and "/dev/kvm does not exist" in decision.reason


def test_probe_result_is_cached_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: (True, "ok"))
    calls = []

    async def failing_probe(timeout: float) -> None:
        calls.append(timeout)
        raise BootError("hung after the real-mode stub")

    first = run("auto", tmp_path, failing_probe)
    assert first.accel == "tcg" and "hung" in first.reason
    second = run("auto", tmp_path, failing_probe)
    assert second.accel == "tcg" and "cached" in second.reason
    assert len(calls) == 1
    monkeypatch.setattr(accel_mod, "host_boot_id", lambda: "another-boot")

    async def good_probe(timeout: float) -> None:
        calls.append(timeout)

    assert run("auto", tmp_path, good_probe).accel == "kvm"
    assert len(calls) == 2
