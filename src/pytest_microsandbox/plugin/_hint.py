"""Whether a run should start a VM before its collection (``HostRunner.prestart``).

A run cannot know, before it collects, whether it has ``process``-isolated
marked tests. A project whose last run served one from a live VM (the inner
loop: edit, run, edit, run) leaves a hint in the cache, a file named by a digest
of its root; a run of that project then restores the base VM and copies the
project in while pytest starts and collects. A run that finds no such test
drops the hint, so a project that stopped having them pays this at most once.
The hint holds the name of the base zygote that run used: its restore starts
at once, beside the digests that name the base (it is kept only if they name
the same one).

A second hint names the project's zygote the last run used and a digest of
its test files and arguments (:func:`write_zygote_hint`): when those are
unchanged and that zygote is in the store, the run restores it instead
(:func:`zygote_hint`), the VM its first test would restore after the
collection, so the first test starts at once and no project is copied in
and collected for nothing (the steady state of reruns under xdist).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "HINTS_MAX",
    "LIVE_ENV",
    "drop_live_hint",
    "has_live_hint",
    "has_zygote_hint",
    "live_cost",
    "live_enabled",
    "live_hint",
    "write_live_cost",
    "write_live_hint",
    "write_zygote_hint",
    "zygote_hint",
]

#: ``0``: snapshot a project's zygote before its first test even under process
#: isolation (the design before #16; kept to measure against).
LIVE_ENV = "MICROSANDBOX_LIVE_ZYGOTE"


def live_enabled() -> bool:
    """Whether ``_zygote.start_live`` may serve a project without snapshotting it."""
    return os.environ.get(LIVE_ENV, "1").strip() != "0"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_MAX = 128
#: Hints kept, newest first.
HINTS_MAX = 256


def _hint_path(root: Path | None, cache: Path | None, kind: str = "live") -> Path | None:
    if root is None:
        return None
    from ..runtime.paths import cache_dir

    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir(cache) / "hints" / f"{kind}-{digest}"


#: Longest zygote hint read (a few hundred test files' paths).
_ZYGOTE_HINT_MAX = 256 * 1024


def _files_digest(watched: Iterable[str], args: Iterable[str]) -> str:
    """What a zygote's name depends on that can change without a rebuild of the
    layers: its test files, conftests and ini file (by content) and the guest's
    pytest arguments.
    """
    from ..runtime._keys import KeyHasher

    h = KeyHasher()
    h.add(*args)
    for name in sorted(set(watched)):
        try:
            h.add(name, "file", Path(name).read_bytes())
        except OSError:
            h.add(name, "missing")
    return h.hexdigest()


def write_zygote_hint(
    root: Path | None,
    cache: Path | None,
    zygote: str,
    files: Iterable[str],
    watched: Iterable[Path],
    args: Iterable[str],
) -> None:
    """Record that a run of the project at ``root`` used zygote ``zygote``: its
    marked test ``files``, the ``watched`` files its name depends on and the
    guest's pytest ``args``.
    """
    path = _hint_path(root, cache, "zygote")
    if path is None:
        return
    names = [str(f) for f in watched]
    digest = _files_digest(names, args)
    text = json.dumps({"zygote": zygote, "files": list(files), "watched": names, "digest": digest})
    _write_hint(path, text, "zygote-*")


def zygote_hint(
    root: Path | None, cache: Path | None, args_for: Callable[[list[str]], list[str]]
) -> str | None:
    """The zygote the last run of the project at ``root`` used, if its files are
    unchanged and ``args_for`` (the guest's arguments for a list of marked
    files, in this run) gives the same arguments for its files; else None.
    (Whether the zygote is still in the store is the caller's question.)
    """
    path = _hint_path(root, cache, "zygote")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as src:
            data = json.loads(src.read(_ZYGOTE_HINT_MAX))
        zygote, files, watched, digest = (
            data["zygote"],
            data["files"],
            data["watched"],
            data["digest"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(zygote, str) and len(zygote) <= _NAME_MAX and _NAME.fullmatch(zygote)):
        return None
    for names in (files, watched):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
    return zygote if digest == _files_digest(watched, args_for(files)) else None


def has_live_hint(root: Path | None, cache: Path | None) -> bool:
    """Whether the last run of the project at ``root`` served a test from a live VM."""
    path = _hint_path(root, cache)
    return path is not None and path.exists()


def has_zygote_hint(root: Path | None, cache: Path | None) -> bool:
    """Whether the last run of the project at ``root`` named its zygote (it ran
    marked tests from one), whatever changed since.
    """
    path = _hint_path(root, cache, "zygote")
    return path is not None and path.exists()


def live_hint(root: Path | None, cache: Path | None) -> str | None:
    """The base zygote's name the last run of the project at ``root`` used ("" if
    it did not say), or None without a hint.
    """
    path = _hint_path(root, cache)
    if path is None:
        return None
    try:
        text = path.read_text(errors="replace")[:_NAME_MAX]
    except OSError:
        return None
    return text if _NAME.fullmatch(text) else ""


def write_live_hint(root: Path | None, cache: Path | None, base: str = "") -> None:
    """Record that a run of the project at ``root`` served a test from a live VM
    restored from base zygote ``base``.
    """
    path = _hint_path(root, cache)
    if path is None:
        return
    _write_hint(path, base, "live-*")


def _write_hint(path: Path, text: str, pattern: str) -> None:
    """Write a hint whole (aside, then renamed) unless it already says ``text``;
    then keep the newest :data:`HINTS_MAX` of its kind (``pattern``). A hint is
    advice: a failed write is no error.
    """
    with contextlib.suppress(OSError):
        if path.exists() and path.read_text(errors="replace") == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_text(text)
        partial.replace(path)
    _forget_oldest(path.parent, pattern)


def _forget_oldest(directory: Path, pattern: str) -> None:
    """Keep the :data:`HINTS_MAX` newest hints (one per project root ever run: temporary
    test projects would otherwise pile up).
    """
    with contextlib.suppress(OSError):
        hints = list(directory.glob(pattern))
        if len(hints) <= HINTS_MAX:
            return
        for old in sorted(hints, key=_mtime)[: len(hints) - HINTS_MAX]:
            old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_live_cost(root: Path | None, cache: Path | None, zygote: str, seconds: float) -> None:
    """Record that serving zygote ``zygote`` of the project at ``root`` live (a
    collection in a fresh clone) took ``seconds``.
    """
    path = _hint_path(root, cache, "livecost")
    if path is None:
        return
    _write_hint(path, json.dumps({"zygote": zygote, "seconds": round(seconds, 3)}), "livecost-*")


def live_cost(root: Path | None, cache: Path | None, zygote: str) -> float | None:
    """Seconds the last live start of ``zygote`` for the project at ``root`` took,
    or None if the project's last live start was of another zygote (an edit) or
    the record is missing or unreadable.
    """
    path = _hint_path(root, cache, "livecost")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as src:
            data = json.loads(src.read(1024))
        seconds = data["seconds"]
        same = data["zygote"] == zygote
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not same or not isinstance(seconds, (int, float)) or not 0 <= seconds < 86400:
        return None
    return float(seconds)


def drop_live_hint(root: Path | None, cache: Path | None) -> None:
    """Forget the hint: a run of the project at ``root`` had no test to start for."""
    path = _hint_path(root, cache)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
