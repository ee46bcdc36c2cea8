"""The host's loader and its Python's libraries staged for another image (_hostlib.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_microsandbox.runtime._exceptions import ImageError
from pytest_microsandbox.runtime.images import HOST_LOADER_ARGV, _hostlib

pytestmark = pytest.mark.skipif(
    Path(sys.base_prefix).resolve().is_relative_to("/usr"), reason="a system Python is refused"
)


def test_staged_loader_runs_the_host_python_with_its_libraries(tmp_path: Path) -> None:
    memo = tmp_path / "ldd.json"
    _hostlib.stage_host_libs(tmp_path / "a", memo)
    _hostlib.stage_host_libs(tmp_path / "b", memo)  # from ldd's remembered answers
    libs = tmp_path / "b" / _hostlib.HOSTLIB_DIR.lstrip("/")
    names = {p.name for p in libs.iterdir()}
    assert names == {p.name for p in (tmp_path / "a" / _hostlib.HOSTLIB_DIR.lstrip("/")).iterdir()}
    assert {"ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6"} <= names
    assert not any(n.startswith("libX11") for n in names)  # _tkinter's closure left out
    # Nothing inside the prefix or venv is copied: the guest has those trees.
    assert not any(n.startswith("libpython") for n in names)
    loader, flag, _ = HOST_LOADER_ARGV
    argv = [str(libs / Path(loader).name), flag, str(libs), sys.executable]
    # The host's own library directories are still on the loader's default path:
    # the maps show that nothing came from them.
    code = (
        "import sys, ssl, ctypes, sqlite3, lzma, pytest, pydantic_core\n"
        "print(sys.prefix)\n"
        "print(*sorted({l.split()[-1] for l in open('/proc/self/maps') if '.so' in l}))"
    )
    proc = subprocess.run([*argv, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    prefix, mapped = proc.stdout.splitlines()
    assert prefix == sys.prefix
    roots = (str(libs), str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve()))
    outside = [m for m in mapped.split() if not m.startswith(roots)]
    assert outside == [], outside


def test_a_python_under_usr_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    with pytest.raises(ImageError, match=r"hide the image's /usr.*image='host'"):
        _hostlib.host_python_roots()
