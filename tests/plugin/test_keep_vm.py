"""``--sandbox-keep-failed`` end to end: an ordinary failure (``assert False``)
under the default isolation is kept, two same-named tests of two files get two
snapshots, and the command the summary prints opens a shell, through a real
terminal, in the VM as the test left it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from pytest_microsandbox.plugin._backend import availability
from pytest_microsandbox.runtime.paths import cache_dir
from pytest_microsandbox.snapshots import Snapshot

sys.path.insert(0, str(Path(__file__).parent.parent / "cli"))
from terminal import Terminal

pytest_plugins = ["pytester"]
#: Before pytester moves $HOME: the inner run needs the real cache (kernel, images).
CACHE = cache_dir()
HOME = os.environ.get("HOME", "/root")
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not availability().ok, reason=availability().reason or "no backend"),
]

TEST = """
import pytest

pytestmark = pytest.mark.sandbox(timeout=300)


def test_same():
    with open("/tmp/evidence", "w") as f:
        f.write("left by {name}\\n")
    assert False, "an ordinary failure"
"""


def test_a_failed_test_is_kept_and_the_printed_command_opens_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MICROSANDBOX_CACHE_DIR", str(CACHE))
    # and a project that is not the home directory (it is imaged into the guest)
    monkeypatch.setenv("HOME", HOME)
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_a=TEST.format(name="test_a"), test_b=TEST.format(name="test_b"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-keep-failed")
    out = result.stdout.str()
    kept = dict(re.findall(r"kept: (test_[ab]\.py::test_same): .*microsandbox shell (\S+)", out))
    try:
        result.assert_outcomes(failed=2)
        assert set(kept) == {"test_a.py::test_same", "test_b.py::test_same"}, out
        assert len(set(kept.values())) == 2  # one per node id: neither overwrote the other
        names = {i.name for i in Snapshot.list(kind="snapshot")}
        assert set(kept.values()) <= names

        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        cli = str(Path(sys.executable).parent / "microsandbox")
        term = Terminal([cli, "shell", kept["test_b.py::test_same"]], env | {"TERM": "xterm"})
        try:
            term.type(b"cat /tmp/evidence; pwd\n")
            term.expect(b"left by test_b")
            term.expect(str(pytester.path).encode())  # it starts in the project
            term.type(b"exit 3\n")
            assert term.wait() == 3
        finally:
            term.close()
    finally:
        for name in kept.values():
            Snapshot.remove(name)
