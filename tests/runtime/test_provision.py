"""Boot plans reused by back-to-back creates (runtime/provision.py plan_for); no VM."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import SandboxConfig, provision
from pytest_microsandbox.runtime.boot import BootPlan
from pytest_microsandbox.runtime.qemu import QemuBackend


async def _plans(first: SandboxConfig, second: SandboxConfig) -> tuple[object, object]:
    backend = QemuBackend()
    return await provision.plan_for(first, backend), await provision.plan_for(second, backend)


def test_a_create_right_after_another_reuses_its_plan_whatever_its_name() -> None:
    a, b = anyio.run(
        _plans, SandboxConfig(name="one", accel="tcg"), SandboxConfig(name="two", accel="tcg")
    )
    assert a is b


def test_another_configuration_gets_its_own_plan() -> None:
    a, b = anyio.run(
        _plans,
        SandboxConfig(name="x", accel="tcg"),
        SandboxConfig(name="x", accel="tcg", memory=256),
    )
    assert a is not b


def test_a_plan_is_made_again_once_the_reuse_window_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision, "PLAN_REUSE_S", 0.0)
    a, b = anyio.run(
        _plans, SandboxConfig(name="x", accel="tcg"), SandboxConfig(name="x", accel="tcg")
    )
    assert a is not b


def test_a_file_of_the_plan_rewritten_since_is_noticed(tmp_path: Path) -> None:
    async def plan() -> BootPlan:
        return await provision.plan_for(SandboxConfig(name="x", accel="tcg"), QemuBackend())

    real = anyio.run(plan)
    initrd = tmp_path / "initrd"
    shutil.copy(real.initrd, initrd)
    os.utime(initrd, ns=(10**18, 10**18))  # so the write below surely moves the mtime
    mine = dataclasses.replace(real, initrd=initrd)
    before = provision._stamps(mine)
    assert before is not None and provision._stamps(mine) == before
    with initrd.open("r+b") as f:  # rewritten in place, same size
        f.write(b"\0" * 16)
    assert provision._stamps(mine) != before
    initrd.unlink()
    assert provision._stamps(mine) is None
