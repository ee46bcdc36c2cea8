"""Sandbox logic that needs no VM: the exec environment, diagnostics."""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_microsandbox.runtime.images import imaged_venv
from pytest_microsandbox.runtime.sandbox import DEFAULT_PATH, _venv_env


def test_the_host_image_activates_the_venv_it_carries() -> None:
    venv = imaged_venv()
    assert venv == Path(sys.prefix).resolve()
    env = _venv_env("host")
    assert env == {"PATH": f"{venv}/bin:{DEFAULT_PATH}", "VIRTUAL_ENV": str(venv)}


def test_directory_images_get_no_venv(tmp_path: Path) -> None:
    assert _venv_env(str(tmp_path)) == {}


def test_outside_a_venv_nothing_is_activated(tmp_path: Path) -> None:
    assert imaged_venv(prefix=tmp_path, base_prefix=tmp_path) is None
    assert imaged_venv(prefix=tmp_path / "venv", base_prefix=tmp_path) == tmp_path / "venv"
