"""runtime.boot_identity: the public digest of what a configuration boots from.

No VM is started: the accelerator is forced or its verdict cached, the kernel,
initramfs and images come from the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import SandboxConfig, accel, boot_identity
from pytest_microsandbox.runtime.boot import prepare_boot, resolve_accel
from pytest_microsandbox.runtime.qemu import QemuBackend


def test_boot_identity_is_the_boot_plans_identity() -> None:
    config = SandboxConfig(name="ident", memory=256, accel="tcg")
    digest = anyio.run(boot_identity, config)
    assert digest == prepare_boot(config, "tcg").identity(config)
    # The sandbox's name does not shape guest memory; its RAM size does.
    assert anyio.run(boot_identity, config.model_copy(update={"name": "other"})) == digest
    assert anyio.run(boot_identity, config.model_copy(update={"memory": 512})) != digest


def test_resolve_accel_reads_the_configured_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe verdict lives in ``config.cache_dir``, like everything else it
    boots from (it used to go to the default cache whatever the config said)."""
    monkeypatch.setattr(accel, "kvm_usable", lambda: (True, "ok"))
    record = {"boot_id": accel.host_boot_id(), "accel": "tcg", "reason": "from this cache"}
    (tmp_path / "accel-probe.json").write_text(json.dumps(record))
    config = SandboxConfig(name="cached", accel="auto", cache_dir=tmp_path)
    decision = anyio.run(resolve_accel, config, QemuBackend())  # no probe: the record answers
    assert decision.reason.startswith("from this cache")
