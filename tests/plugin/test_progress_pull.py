"""An image pull under pytest shows its progress on the terminal (plugin/_progress.py
rendering the runtime's ``pull`` stages), against a real docker-registry on 127.0.0.1.

The inner test resolves the image's root layers exactly as ``sandbox_factory(image=...)``
and a marked test do before their VM boots (``resolve_root_layers``), so no VM is needed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "runtime" / "images"))
from oci_helpers import Registry, file, run_registry

pytest_plugins = ["pytester"]

INNER = """
import os
from pathlib import Path
from pytest_microsandbox.runtime.images import resolve_root_layers

def test_pull():
    layers = resolve_root_layers(os.environ["MSB_REF"], cache_dir=Path(os.environ["MSB_CACHE"]))
    assert len(layers) == 3  # two image layers and the mount points below them
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


def _run(pytester: pytest.Pytester, registry: Registry, tag: str, *args: str) -> pytest.RunResult:
    layers = [{f"d/{i}.bin": file(os.urandom(2 << 20))} for i in range(2)]
    registry.push_image(f"plugin/progress:{tag}", layers)  # type: ignore[arg-type]
    pytester.makepyfile(test_inner=INNER)
    os.environ["MSB_REF"] = registry.ref(f"plugin/progress:{tag}")
    os.environ["MSB_CACHE"] = str(pytester.path / "cache")
    try:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    finally:
        del os.environ["MSB_REF"], os.environ["MSB_CACHE"]


def test_a_pull_prints_one_line_per_stage_off_a_terminal(
    pytester: pytest.Pytester, registry: Registry
) -> None:
    result = _run(pytester, registry, "plain")
    result.assert_outcomes(passed=1)
    ref = registry.ref("plugin/progress:plain")
    result.stdout.fnmatch_lines(
        [
            f"microsandbox: pulling image {ref} ...",
            f"microsandbox: pulling image {ref} (converting 2 layers to erofs) ...",
        ]
    )
    assert result.stdout.str().count("microsandbox: building root layer layer ") == 2


def test_a_pull_is_quiet_under_q(pytester: pytest.Pytester, registry: Registry) -> None:
    result = _run(pytester, registry, "quiet", "-q")
    result.assert_outcomes(passed=1)
    assert "microsandbox: pulling" not in result.stdout.str()
