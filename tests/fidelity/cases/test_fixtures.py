"""pytest's own fixtures: tmp_path, monkeypatch, capture, logging, warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_tmp_path_is_private_and_writable(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("written")
    assert (tmp_path / "sub" / "f.txt").read_text() == "written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_tmp_path_factory(tmp_path_factory: pytest.TempPathFactory) -> None:
    first, second = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("data")
    assert first != second and first.is_dir() and second.is_dir()


def test_data_file_beside_the_module() -> None:
    assert (HERE / "data.txt").read_text() == "data beside the test module\n"


def test_cwd_is_where_pytest_was_started(request: pytest.FixtureRequest) -> None:
    assert Path.cwd() == request.config.invocation_params.dir


def test_monkeypatch_env_chdir_attr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIDELITY_VAR", "set")
    monkeypatch.delenv("FIDELITY_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os.path, "sep", os.path.sep)
    monkeypatch.setattr(sys, "fidelity_marker", "patched", raising=False)
    assert os.environ["FIDELITY_VAR"] == "set"
    assert Path.cwd() == tmp_path
    assert sys.fidelity_marker == "patched"  # type: ignore[attr-defined]


def test_environment_was_restored() -> None:
    assert "FIDELITY_VAR" not in os.environ
    assert not hasattr(sys, "fidelity_marker")


def test_capsys(capsys: pytest.CaptureFixture[str]) -> None:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("to stdout\n", "to stderr\n")


def test_capfd_sees_a_child_process(capfd: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["sh", "-c", "echo from a child; echo child err >&2"], check=True)
    os.write(1, b"raw fd write\n")
    captured = capfd.readouterr()
    assert captured.out == "from a child\nraw fd write\n"
    assert captured.err == "child err\n"


def test_caplog(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("fidelity").info("an %s message", "info")
    logging.getLogger("fidelity").debug("not captured at INFO")
    assert caplog.messages == ["an info message"]
    assert caplog.records[0].levelname == "INFO"


def test_warns() -> None:
    with pytest.warns(DeprecationWarning, match="old"):
        warnings.warn("old api", DeprecationWarning, stacklevel=1)


def test_stdin_is_not_readable_under_capture() -> None:
    with pytest.raises(OSError):
        sys.stdin.read()


def test_expected_failure_is_reported_as_failed() -> None:
    # One failure on purpose: a failing test must fail the same way in a guest.
    assert {"a": 1} == {"a": 2}


@pytest.mark.xfail(reason="known", strict=True)
def test_xfail() -> None:
    raise ValueError("expected")


def test_skip() -> None:
    pytest.skip("skipped on purpose")
