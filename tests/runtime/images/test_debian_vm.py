"""A real distribution userspace as an OCI image: Debian 12 packages (libc,
dash, coreutils, Python 3.11) merged into a layer, pushed, pulled, booted.
"""

from __future__ import annotations

import pytest
from oci_helpers import Registry, debian_layer, image_config

from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox
from pytest_microsandbox.runtime.paths import cache_dir

pytestmark = pytest.mark.vm


def test_debian_image(registry: Registry) -> None:
    layer = debian_layer(cache_dir())
    cfg = image_config(
        env=["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"], workdir="/tmp", cmd=["/bin/sh"]
    )
    registry.push_image("test/debian:12", [layer], cfg)
    with SyncSandbox.create(
        SandboxConfig(name="debian", image=registry.ref("test/debian:12"))
    ) as sb:
        release = sb.exec("cat", ["/etc/os-release"]).stdout_text
        assert 'VERSION_ID="12"' in release and "Debian" in release
        out = sb.exec("sh", ["-c", "pwd; ls --version | head -1"]).stdout_text.splitlines()
        assert out[0] == "/tmp" and "coreutils" in out[1]
        py = sb.exec("python3", ["-c", "import sys, zlib; print(sys.version_info[:2])"])
        assert py.stdout_text == "(3, 11)\n", py.stderr_text
