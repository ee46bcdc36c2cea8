"""runtime.boot_identity: the public digest of what a configuration boots from.

No VM is started: the accelerator is forced, the kernel, initramfs and images
come from the cache.
"""

from __future__ import annotations

import anyio

from pytest_microsandbox.runtime import SandboxConfig, boot_identity
from pytest_microsandbox.runtime.boot import prepare_boot


def test_boot_identity_is_the_boot_plans_identity() -> None:
    config = SandboxConfig(name="ident", memory=256, accel="tcg")
    digest = anyio.run(boot_identity, config)
    assert digest == prepare_boot(config, "tcg").identity(config)
    # The sandbox's name does not shape guest memory; its RAM size does.
    assert anyio.run(boot_identity, config.model_copy(update={"name": "other"})) == digest
    assert anyio.run(boot_identity, config.model_copy(update={"memory": 512})) != digest
