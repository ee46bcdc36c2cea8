"""The README's main job, ``pytest examples``, passes on real VMs.

The examples are what a newcomer runs first, and they exercise the whole
path (templates, zygotes, both fixtures and the marker) from the repository
root, so CI runs them exactly as the README does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[1]


def test_examples_all_pass() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "examples", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    # Only passes: a skip (no backend) or an xfail would hide a broken example.
    summary = [line for line in proc.stdout.splitlines() if " in " in line and "passed" in line]
    assert summary and re.fullmatch(r"=* ?\d+ passed in [0-9.]+s.*", summary[-1]), output[-5000:]
