"""The base runner's metadata memo (guest/bootstrap.py, run by its path there)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import pytest_microsandbox.guest as guest_package


def _bootstrap() -> ModuleType:
    path = Path(guest_package.__file__).parent / "bootstrap.py"
    spec = importlib.util.spec_from_file_location("msb_bootstrap_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dist_info(site: Path, name: str, plugin: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pytest11]\n{plugin} = {name}_mod\n")
    (info / "RECORD").write_text(f"{name}_mod.py,,\n")


def test_the_memo_answers_as_importlib_and_sees_new_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, project = tmp_path / "site", tmp_path / "project"
    _dist_info(site, "alpha", "alpha_plugin")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module sets sys.path[0]
    memo = _bootstrap().MetadataMemo()
    sys.path[:] = [str(site), str(project)]
    memo.install()
    try:
        first = [(d.metadata["Name"], [e.name for e in d.entry_points]) for d in memo()]
        assert first == [("alpha", ["alpha_plugin"])]
        assert [str(f) for f in next(iter(memo())).files] == ["alpha_mod.py"]
        # Read once: the same objects, even after the files are gone.
        (site / "alpha-1.0.dist-info" / "entry_points.txt").unlink()
        again = next(iter(importlib.metadata.distributions()))
        assert [e.name for e in again.entry_points] == ["alpha_plugin"]
        # An entry that appears (the project copied in) is read anew.
        _dist_info(project, "beta", "beta_plugin")
        assert sorted(d.metadata["Name"] for d in importlib.metadata.distributions()) == [
            "alpha",
            "beta",
        ]
        # Arguments go to importlib's own function.
        assert [d.metadata["Name"] for d in memo(name="beta")] == ["beta"]
    finally:
        memo.uninstall()
    assert importlib.metadata.distributions is memo.original
