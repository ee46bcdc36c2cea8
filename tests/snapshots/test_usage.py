"""What ``cache_usage`` (snapshots/_usage.py) and ``pytest --sandbox-cache`` report, on
a cache laid out by hand (no VM).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_microsandbox.snapshots import cache_usage

pytest_plugins = ["pytester"]


def _fake_cache(root: Path) -> None:
    images = root / "images"
    images.mkdir(parents=True)
    for name, size in (("usr-aaaaaaaaaaaa-1", 3 << 20), ("venv-bbbbbbbbbbbb-2", 1 << 20),
                       ("project-cccccccccccc-3", 1 << 16)):  # fmt: skip
        (images / f"{name}.erofs").write_bytes(b"x" * size)
    zygote = root / "snapshots" / "named" / "zygote-base-0123"
    zygote.mkdir(parents=True)
    (zygote / "memory").write_bytes(b"m" * (2 << 20))
    (root / "kernel").mkdir()
    (root / "kernel" / "vmlinux").write_bytes(b"k" * 4096)


def test_usage_by_kind(tmp_path: Path):
    _fake_cache(tmp_path)
    usage = {k.kind: k for k in cache_usage(tmp_path).kinds}
    shared = usage["root layers, shared"]
    assert shared.count == 2 and shared.bytes >= 4 << 20
    assert usage["root layers, per project"].count == 1
    assert usage["base zygotes"].count == 1 and usage["base zygotes"].bytes >= 2 << 20
    assert usage["kernel, initramfs, agent"].count == 1
    assert cache_usage(tmp_path).projects == {"project-cccccccccccc": pytest.approx(1 << 16, rel=1)}


def test_sandbox_cache_option_prints_and_exits(pytester: pytest.Pytester, tmp_path: Path):
    _fake_cache(tmp_path / "cache")
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError\n")
    result = pytester.runpytest("--sandbox-cache", f"--sandbox-cache-dir={tmp_path / 'cache'}")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            f"microsandbox cache: {tmp_path / 'cache'} (* on disk)",
            "budgets: root layers 4.0 GiB, templates 2.0 GiB, zygotes 2.0 GiB*",
            "*root layers, shared * 2 * MiB*every project",
            "*base zygotes * 1 *",
        ]
    )
    assert "test_never_runs" not in result.stdout.str()
