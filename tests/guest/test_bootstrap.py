"""``bootstrap.py``'s own parts that need no VM: the runner's log started over."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from pytest_microsandbox.guest.bootstrap import fresh_log
print("the base's warm-up: no tests collected")
print("and its stderr", file=sys.stderr)
fresh_log()
print("the run's own output")
print("the run's error", file=sys.stderr)
"""


def test_a_go_request_starts_the_log_over(tmp_path: Path):
    log = tmp_path / "log"
    with open(log, "w") as out:  # as the runner's command does: >log 2>&1
        subprocess.run(
            [sys.executable, "-c", SCRIPT], stdout=out, stderr=subprocess.STDOUT, check=True
        )
    # No trace of what came before, and no hole of zeros where it was (the
    # two streams' order is their buffering's).
    text = log.read_text()
    assert "\0" not in text
    assert sorted(text.splitlines()) == ["the run's error", "the run's own output"]


def test_a_log_that_is_not_a_file_is_left_alone():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    )
    assert "no tests collected" in proc.stdout and "the run's own output" in proc.stdout
