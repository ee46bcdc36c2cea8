"""Users and permissions, locale, time zones, the interpreter.

The guest runs tests as root by default, wherever the host run runs them:
these tests assert what holds for both.
"""

from __future__ import annotations

import datetime
import locale
import os
import pwd
import stat
import sys
import tempfile
import time
import zoneinfo
from pathlib import Path

import pytest

NOBODY = 65534


def test_uid_is_consistent() -> None:
    assert os.getuid() == os.geteuid()
    assert os.getgid() == os.getegid()
    assert pwd.getpwuid(os.getuid()).pw_uid == os.getuid()
    if os.getuid() == 0:
        assert pwd.getpwuid(0).pw_name == "root"


def _as_nobody(action) -> int:  # type: ignore[no-untyped-def]
    """Run ``action`` in a child as uid/gid 65534; its exit code (0: it passed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def shared_dir():  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_permissions_as_a_non_root_user(shared_dir: Path) -> None:
    secret = shared_dir / "secret"
    secret.write_text("s")
    secret.chmod(0o600)
    public = shared_dir / "public"
    public.write_text("p")
    public.chmod(0o644)
    readonly = shared_dir / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)

    def checks() -> None:
        assert public.read_text() == "p"
        for attempt in (secret.read_text, lambda: (readonly / "new").write_text("x")):
            try:
                attempt()
            except PermissionError:
                continue
            raise AssertionError(f"{attempt} was allowed")

    if os.getuid() == 0:
        assert _as_nobody(checks) == 0
    else:
        secret.chmod(0o000)  # our own file: only the mode stops us
        checks()


def test_file_modes_and_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = tmp_path / "f"
        path.touch()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    os.chmod(path, 0o4755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o4755


def test_locale() -> None:
    assert sys.getfilesystemencoding() == "utf-8"
    assert locale.setlocale(locale.LC_ALL, "C") == "C"
    try:
        assert time.strftime("%a %b", time.gmtime(0)) == "Thu Jan"
        assert locale.setlocale(locale.LC_ALL, "C.UTF-8") in ("C.UTF-8", "C.utf8")
        assert "é".encode(locale.getpreferredencoding(False)) == b"\xc3\xa9"
    finally:
        locale.setlocale(locale.LC_ALL, "")


def test_timezone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert time.localtime(0).tm_hour == 0
        monkeypatch.setenv("TZ", "Asia/Kolkata")
        time.tzset()
        assert (time.localtime(0).tm_hour, time.localtime(0).tm_min) == (5, 30)
    finally:
        monkeypatch.undo()
        time.tzset()
    paris = datetime.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    assert paris.utcoffset() == datetime.timedelta(hours=2)


def test_clock_is_sane() -> None:
    # The guest gets the host clock: not 1970, and it moves forward.
    assert datetime.datetime.now().year >= 2024
    first = time.monotonic()
    time.sleep(0.01)
    assert time.monotonic() > first


def test_interpreter_and_paths() -> None:
    assert os.path.exists(sys.executable)
    assert Path(pytest.__file__).exists()
    assert os.cpu_count() and os.cpu_count() >= 1  # type: ignore[operator]
    assert os.path.isdir(tempfile.gettempdir())
    assert os.path.isdir(os.path.expanduser("~")) or "HOME" not in os.environ
