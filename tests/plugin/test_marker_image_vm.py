"""``@pytest.mark.sandbox(image=REF)`` end to end: a marked test runs in a Debian 12
OCI image and in a busybox image without any libc (both pulled from a real
docker-registry on 127.0.0.1), on the host's Python started through the host's
loader (runtime/images/_hostlib.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.runtime.paths import cache_dir

sys.path.insert(0, str(Path(__file__).parent.parent / "runtime" / "images"))
from oci_helpers import Registry, busybox_entries, debian_layer, image_config, run_registry

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

SUITE = """
import os, subprocess, sys
import pytest

pytestmark = pytest.mark.sandbox(image={ref!r}, timeout=120)


def test_runs_in_the_image_on_the_host_python():
    if "MICROSANDBOX_GUEST" not in os.environ:
        pytest.skip("only in a guest")
    release = open("/etc/os-release").read()
    assert 'VERSION_ID="12"' in release and "Debian" in release
    assert sys.prefix == {prefix!r}
    # What the test starts runs on the image's own libc and programs.
    out = subprocess.run(["sh", "-c", "ls --version | head -1"], capture_output=True, text=True)
    assert "coreutils" in out.stdout, out.stderr
"""


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    try:
        cm = run_registry()
        reg = cm.__enter__()
    except Exception as exc:  # docker-registry missing: scripts/setup installs it
        pytest.skip(f"no docker-registry: {exc}")
    try:
        yield reg
    finally:
        cm.__exit__(None, None, None)


BUSYBOX_SUITE = """
import os, subprocess, sys
import pytest

pytestmark = pytest.mark.sandbox(image={ref!r}, timeout=120)


def test_runs_in_an_image_without_libc():
    if "MICROSANDBOX_GUEST" not in os.environ:
        pytest.skip("only in a guest")
    assert os.path.realpath("/bin/ls") == "/bin/busybox"
    assert not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6")  # none in the image
    assert sys.prefix == {prefix!r}
    assert subprocess.run(["ls", "/"], capture_output=True, text=True).returncode == 0
    # The image has no loader at all: sys.executable goes through the host's.
    child = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    )
    assert child.stdout.strip() == sys.prefix, child.stderr
"""


def _skip_system_python() -> None:
    if Path(sys.base_prefix).resolve().is_relative_to("/usr"):
        pytest.skip("the host's Python lives under /usr: refused by design")


def test_a_marked_test_runs_in_a_busybox_image(registry: Registry, tmp_path: Path) -> None:
    _skip_system_python()
    entries = busybox_entries(extra_applets=("mv", "cp", "head"))
    registry.push_image("marker/busybox:1", [entries], image_config(env=["PATH=/bin"]))
    suite = BUSYBOX_SUITE.format(ref=registry.ref("marker/busybox:1"), prefix=sys.prefix)
    _run_suite(tmp_path, suite)


def test_a_marked_test_runs_in_a_debian_image(registry: Registry, tmp_path: Path) -> None:
    _skip_system_python()
    cfg = image_config(env=["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"])
    registry.push_image("marker/debian:12", [debian_layer(cache_dir())], cfg)
    ref = registry.ref("marker/debian:12")
    _run_suite(tmp_path, SUITE.format(ref=ref, prefix=sys.prefix))


def _run_suite(tmp_path: Path, suite: str) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_in_image.py").write_text(suite)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--sandbox-require"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "1 passed" in output, output
