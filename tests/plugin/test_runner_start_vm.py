"""Starting the guest runner, with real VMs: pytest starts in the guest as a
local run does (``filterwarnings = error`` and ``-W error`` behave as locally),
a directory image is refused at once, and a failed zygote build is attempted
once per run, every test failing with its real cause.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_marker_vm import run

from pytest_microsandbox.plugin._backend import availability

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

STRICT_SUITE = """
import warnings
import pytest

pytestmark = pytest.mark.sandbox(timeout=60)


def test_passes(answer):
    assert answer == 42


def test_fails():
    assert 1 == 2


def test_a_warning_is_an_error():
    with pytest.raises(UserWarning):
        warnings.warn("careful", UserWarning)
"""


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("strict")
    (root / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    error\n")
    (root / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef answer():\n    return 42\n"
    )
    (root / "test_strict.py").write_text(STRICT_SUITE)
    return root


@pytest.mark.parametrize("extra", [(), ("-W", "error")], ids=["ini", "ini-and-W"])
def test_filterwarnings_error_gives_the_local_outcomes(strict: Path, extra: tuple[str, ...]):
    # Before: the runner, started as `python -m pytest_microsandbox.guest`,
    # imported the plugin package before pytest.main; pytest's "Module already
    # imported so cannot be rewritten" warning became an error and every test
    # failed with "collected no tests".
    local = run(strict, "--no-sandbox", *extra)
    local.assert_outcomes(passed=2, failed=1)
    guest = run(strict, "--sandbox-isolation=process", *extra)
    assert "PytestAssertRewriteWarning" not in guest.stdout.str() + guest.stderr.str()
    guest.assert_outcomes(passed=2, failed=1)
    guest.stdout.fnmatch_lines(["*FAILED test_strict.py::test_fails - assert 1 == 2*"])


def test_a_directory_image_is_refused_at_once(tmp_path: Path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox is not None, "scripts/setup installs busybox-static"
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_dir.py").write_text(
        "import pytest\n\n@pytest.mark.sandbox\ndef test_x():\n    pass\n"
    )
    # Before: the runner's `cd <project>` failed in that root, silently, and the
    # host polled for its ready file until a 600 s timeout.
    result = run(project, f"--sandbox-image={rootfs}", "--sandbox-isolation=vm", timeout=180)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*a marked test runs on the host's Python*image='host'*"])


def test_a_failed_build_is_attempted_once_and_its_cause_shown(tmp_path: Path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "import os\n"
        "if os.environ.get('MICROSANDBOX_GUEST'):\n"
        "    raise RuntimeError('the conftest broke in the guest')\n"
    )
    (tmp_path / "test_broken.py").write_text(
        "import pytest\n\npytestmark = pytest.mark.sandbox(timeout=60)\n\n"
        + "".join(f"def test_{i}():\n    pass\n\n" for i in range(4))
    )
    result = run(tmp_path, "-n", "2", "--sandbox-isolation=process")
    result.assert_outcomes(failed=4)
    out = result.stdout.str()
    # Every failure carries the real cause, not "collected no tests".
    assert out.count("RuntimeError: the conftest broke in the guest") >= 4, out
    assert "collected no tests" not in out
    # One build attempt in the whole run (two workers): the other tests reused its failure.
    # (in the failure sections: the short summary repeats them when not truncated)
    sections = out.split("short test summary info")[0]
    attempts = re.findall(r"zygote build failed earlier in this run", sections)
    assert len(attempts) == 3, out
