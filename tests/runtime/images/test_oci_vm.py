"""An OCI image end to end: pushed to a local registry, pulled, booted, exec'd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from oci_helpers import Registry, busybox_entries, file, image_config

from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox

pytestmark = pytest.mark.vm


def test_busybox_image_runs_with_its_config(registry: Registry) -> None:
    base = busybox_entries()
    base["etc/motd"] = file("base motd\n")
    base["srv/old/a"] = file("a")
    top = {
        "etc/.wh.motd": file(""),
        "srv/old/.wh..wh..opq": file(""),
        "srv/old/b": file("b"),
        "hello.txt": file("hi from the top layer\n"),
    }
    cfg = image_config(env=["PATH=/bin", "GREETING=hello"], workdir="/home/app", user="app")
    registry.push_image("test/busybox:1", [base, top], cfg)
    config = SandboxConfig(name="oci-busybox", image=registry.ref("test/busybox:1"))
    with SyncSandbox.create(config) as sb:
        out = sb.exec("sh", ["-c", 'echo "$GREETING"; pwd; id -u; cat /hello.txt'])
        assert out.stdout_text.split("\n")[:4] == [
            "hello",
            "/home/app",
            "1234",
            "hi from the top layer",
        ]
        # Whiteout and opaque directory of the top layer hide the base's files.
        gone = sb.exec(
            "sh", ["-c", "test -e /etc/motd && echo present || echo absent; ls /srv/old"]
        )
        assert gone.stdout_text.split() == ["absent", "b"]
        # A clone of the image's template (as for image="host"), keyed by the layers.
        assert sb.async_sandbox.session.origin is not None
        assert sb.async_sandbox.plan is not None and [
            layer.serial for layer in sb.async_sandbox.plan.layers
        ] == [
            "l-oci1",
            "l-oci0",
            "l-skel",
        ]
        # The guest can still write over the read-only layers (tmpfs upper).
        assert (
            sb.exec("sh", ["-c", "echo x > /tmp/f && cat /tmp/f"], user="root").stdout_text == "x\n"
        )


def test_distroless_static_binary(registry: Registry, tmp_path: Path) -> None:
    """No shell, no libc, no /etc: the agent (static, in the initramfs) still runs
    the image's one static binary, with the image's entrypoint at hand.
    """
    source = tmp_path / "hello.c"
    source.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n"
        'int main(int c, char **v) { printf("static %s %s\\n", v[1], getenv("MODE")); return 0; }\n'
    )
    compiler = shutil.which("musl-gcc") or "cc"
    binary = tmp_path / "hello"
    subprocess.run([compiler, "-static", "-O2", "-o", str(binary), str(source)], check=True)
    layer = {"app/hello": file(binary.read_bytes(), 0o755)}
    cfg = image_config(env=["MODE=distroless"], entrypoint=["/app/hello"], cmd=["world"])
    registry.push_image("test/distroless:1", [layer], cfg)
    config = SandboxConfig(name="oci-distroless", image=registry.ref("test/distroless:1"))
    with SyncSandbox.create(config) as sb:
        image = sb.image_config
        assert image is not None and image.entrypoint == ("/app/hello",)
        argv = sb.entrypoint_argv()
        assert argv == ["/app/hello", "world"]
        assert sb.exec(argv[0], argv[1:]).stdout_text == "static world distroless\n"
        argv = sb.entrypoint_argv(["there"])
        assert sb.exec(argv[0], argv[1:]).stdout_text == "static there distroless\n"
