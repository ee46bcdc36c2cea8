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


def _marked_project(root: Path) -> Path:
    project = root / "proj"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_dir.py").write_text(
        "import pytest\n\n@pytest.mark.sandbox\ndef test_x():\n    pass\n"
    )
    return project


def test_a_directory_image_runs_a_marked_test_on_the_hosts_python(tmp_path: Path):
    """A busybox root: the host's Python, venv and project are stacked over it
    (docs/images.md). Before, the runner's `cd <project>` failed there silently
    and the host polled for its ready file until a 600 s timeout; then it was
    refused.
    """
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox is not None, "scripts/setup installs busybox-static"
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    project = _marked_project(tmp_path)
    result = run(project, f"--sandbox-image={rootfs}", "--sandbox-isolation=vm", timeout=300)
    result.assert_outcomes(passed=1)


def test_a_root_without_a_shell_fails_at_once_with_the_cause(tmp_path: Path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("no-shell\n")
    project = _marked_project(tmp_path)
    result = run(project, f"--sandbox-image={rootfs}", "--sandbox-isolation=vm", timeout=300)
    result.assert_outcomes(failed=1)
    # Before: the start's error left restore_base inside an ExceptionGroup, which
    # nothing caught: an INTERNALERROR instead of a failed test.
    result.stdout.fnmatch_lines(
        ["*could not start the test's sandbox*", "*the image has no /bin/sh*busybox*"]
    )


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
    # The runner's log shown is this run's: not the base's warm-up ("no tests
    # collected" from its run on an empty directory) ahead of it.
    assert "no tests collected" not in out, out
    # One build attempt in the whole run (two workers): the other tests reused its failure.
    # (in the failure sections: the short summary repeats them when not truncated)
    sections = out.split("short test summary info")[0]
    attempts = re.findall(r"zygote build failed earlier in this run", sections)
    assert len(attempts) == 3, out


def test_a_conftest_that_hangs_in_the_guest_fails_with_its_stack(tmp_path: Path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "import os, time\n"
        "def hang_in_the_guest():\n"
        "    time.sleep(3600)\n"
        "if os.environ.get('MICROSANDBOX_GUEST'):\n"
        "    hang_in_the_guest()\n"
    )
    (tmp_path / "test_hangs.py").write_text(
        "import pytest\n\n@pytest.mark.sandbox(timeout=60)\ndef test_x():\n    pass\n"
    )
    # Before: no output for the 600 s ready timeout, then "did not collect" with
    # the base runner's stale log; the timeout had no setting.
    result = run(tmp_path, "--sandbox-isolation=process", MICROSANDBOX_COLLECT_TIMEOUT="15")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the guest runner did not collect the tests within 15 s*MICROSANDBOX_COLLECT_TIMEOUT*",
            "stacks of the guest runner:",
            "*conftest.py*line 3 in hang_in_the_guest",
        ]
    )
