"""Kernel extraction and lookup, without a VM."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import KernelNotFoundError
from pytest_microsandbox.runtime.kernel import KERNEL_DIR_ENV, extract_vmlinux, find_kernel


def test_extracts_the_elf_behind_a_decoy() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    decoy = lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)
    bzimage = (
        b"MZ setup code" + decoy + b"pad" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    )
    assert extract_vmlinux(bzimage) == elf


def test_no_payload() -> None:
    with pytest.raises(KernelNotFoundError, match="no xz"):
        extract_vmlinux(b"MZ nothing here")


def test_missing_kernel_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(KernelNotFoundError, match="provision"):
        find_kernel()


def test_corrupt_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kernel.json").write_text("{not json")
    monkeypatch.setenv(KERNEL_DIR_ENV, str(tmp_path))
    with pytest.raises(KernelNotFoundError, match="unreadable"):
        find_kernel()
