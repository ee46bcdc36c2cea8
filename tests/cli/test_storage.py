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


def test_image_ls_and_rm_after_pulls(tmp_path: Path) -> None:
    try:
        registry_cm = run_registry()
        registry = registry_cm.__enter__()
    except Exception as exc:  # docker-registry missing: scripts/setup installs it
        pytest.skip(f"no docker-registry: {exc}")
    try:
        shared = {"base": file("b" * 4000)}
        one = registry.push_image("cli/one:1", [shared, {"one": file("1")}])
        two = registry.push_image("cli/two:1", [shared])
        for repo in ("cli/one:1", "cli/two:1"):
            assert _cli(tmp_path, "image", "pull", registry.ref(repo)).returncode == 0
        empty = _cli(tmp_path / "empty", "image", "ls")
        assert empty.stdout.split() == ["REFERENCE", "DIGEST", "SIZE", "LAST", "USED", "USED", "BY"]

        listed = _cli(tmp_path, "image", "ls")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()
        assert header.split()[:3] == ["REFERENCE", "DIGEST", "SIZE"]
        assert header.index("DIGEST") == rows[0].index("sha256:")  # aligned columns
        assert {r.split()[0] for r in rows} == {
            registry.ref("cli/one:1"),
            registry.ref("cli/two:1"),
        }
        as_json = json.loads(_cli(tmp_path, "image", "ls", "--json").stdout)
        by_ref = {i["reference"]: i for i in as_json}
        assert by_ref[registry.ref("cli/one:1")]["digest"] == one
        assert by_ref[registry.ref("cli/two:1")]["digest"] == two
        assert by_ref[registry.ref("cli/one:1")]["size_bytes"] > 0

        removed = _cli(tmp_path, "image", "rm", registry.ref("cli/one:1"))
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.startswith(f"{registry.ref('cli/one:1')}: removed (")
        left = json.loads(_cli(tmp_path, "image", "ls", "--json").stdout)
        assert [i["reference"] for i in left] == [registry.ref("cli/two:1")]
        # The shared layer stayed: the other image needs no registry.
        registry_cm.__exit__(None, None, None)
        registry_cm = None
        code = (
            "from pytest_microsandbox.runtime.images import pull_image; "
            f"pull_image({registry.ref('cli/two:1')!r}, pull_policy='never')"
        )
        env = {**os.environ, "MICROSANDBOX_CACHE_DIR": str(tmp_path)}
        offline = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
        assert offline.returncode == 0, offline.stderr
        again = _cli(tmp_path, "image", "rm", registry.ref("cli/one:1"))
        assert again.returncode == 1 and "microsandbox image ls" in again.stderr
    finally:
        if registry_cm is not None:
            registry_cm.__exit__(None, None, None)
