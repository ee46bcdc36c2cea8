"""``microsandbox volume ls|rm`` and ``microsandbox image pull`` (cli/_storage.py)
through ``subprocess`` against a private cache; the pull from a real
``docker-registry`` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "runtime" / "images"))
from oci_helpers import file, run_registry


def _cli(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MICROSANDBOX_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "pytest_microsandbox.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_volume_ls_and_rm_on_an_empty_cache(tmp_path: Path) -> None:
    listed = _cli(tmp_path, "volume", "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["NAME", "QUOTA", "ON", "DISK", "UNUSED", "FOR"]
    as_json = _cli(tmp_path, "volume", "ls", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == []
    removed = _cli(tmp_path, "volume", "rm", "nothing-here")
    assert removed.returncode == 1
    assert "no named volume 'nothing-here'" in removed.stderr
    assert "microsandbox volume ls" in removed.stderr
    assert _cli(tmp_path, "volume").returncode == 2  # a subcommand is required


def test_image_pull_pins_the_image_and_a_missing_one_fails(tmp_path: Path) -> None:
    try:
        registry_cm = run_registry()
        registry = registry_cm.__enter__()
    except Exception as exc:  # docker-registry missing: scripts/setup installs it
        pytest.skip(f"no docker-registry: {exc}")
    try:
        digest = registry.push_image("cli/pull:1", [{"hello": file("world")}])
        pulled = _cli(tmp_path, "image", "pull", registry.ref("cli/pull:1"))
        assert pulled.returncode == 0, pulled.stderr
        assert digest in pulled.stdout and "1 layers" in pulled.stdout
        missing = _cli(tmp_path, "image", "pull", registry.ref("cli/absent:1"))
        assert missing.returncode == 1
        assert "microsandbox: error:" in missing.stderr
    finally:
        registry_cm.__exit__(None, None, None)
