"""Tree walks shared by the processes of one run.

Fingerprinting the Python prefix and the venv (one ``lstat`` per entry, see
:mod:`._fingerprint`) costs ~0.3 s of CPU per process here, almost all of it
in the kernel: a C ``find -printf`` over the same 60k entries takes 0.2 s. An
xdist run pays it in every worker at the same moment, on the cores the
workers' imports and VMs need. A walk is only as fresh as the moment it
started, so any walk that started after the run did is as good as the one a
worker would make itself: the run's processes share it through a record per
tree in the cache directory (``walks/``), written under a lock that also makes
a latecomer wait for a walk in progress instead of starting its own.

Off unless a caller says since when walks count as fresh
(:func:`~.._walk_sharing.share_walks_since`): the plugin passes the start of the run (the xdist
controller's, in its workers). Two pytest runs never share a walk: each run
starts after the last run's walks did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .._exceptions import LockTimeoutError
from .._locks import cache_lock, cache_lock_timeout
from .._walk_sharing import walks_fresh_since
from ..paths import cache_dir as default_cache_dir

__all__ = ["WALKS_DIR", "FirstWalkShared", "shared_fingerprint"]

#: The cache subdirectory of the walk records.
WALKS_DIR = "walks"
#: Records kept (one per tree and exclusion set ever fingerprinted; the oldest go).
_RECORDS_MAX = 64
#: Longest wait for another process's walk of the same tree before walking too.
_LOCK_WAIT_S = 60.0
#: Age after which a temporary record file is a killed writer's leftover.
_TMP_STALE_S = 600.0
#: A walk record is a few hundred bytes; anything longer is not one of ours.
_RECORD_MAX_BYTES = 4096


def _record_name(identity: Iterable[str]) -> str:
    return hashlib.sha256("\0".join(identity).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _read(record: Path) -> tuple[float, str] | None:
    """The record's walk start and fingerprint; None if missing or not a record."""
    try:
        with record.open("rb") as f:
            raw = f.read(_RECORD_MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= _RECORD_MAX_BYTES else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    started, fingerprint = data.get("started"), data.get("fingerprint")
    if not isinstance(started, (int, float)) or not isinstance(fingerprint, str):
        return None
    return float(started), fingerprint


def _write(record: Path, started: float, fingerprint: str) -> None:
    text = json.dumps({"started": started, "fingerprint": fingerprint})
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, record)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _forget_oldest(directory: Path) -> None:
    """Keep the newest records; drop temporary files a killed writer left."""
    with contextlib.suppress(OSError):
        files = list(directory.glob("*.json"))
        for tmp in (f for f in files if f.name.startswith(".tmp-")):
            if time.time() - tmp.stat().st_mtime > _TMP_STALE_S:
                tmp.unlink(missing_ok=True)
        records = sorted(
            (f for f in files if not f.name.startswith(".tmp-")), key=lambda f: f.stat().st_mtime
        )
        for old in records[: max(0, len(records) - _RECORDS_MAX)]:
            old.unlink(missing_ok=True)


def shared_fingerprint(
    cache: Path | None, identity: Iterable[str], compute: Callable[[], str]
) -> str:
    """``compute()`` (a tree's fingerprint), or the one another process of this run
    recorded for the same ``identity`` (the tree and what its walk skips) from a
    walk that started after the run did. With sharing off, just ``compute()``.

    Sharing only saves work: a cache directory it cannot write or lock in, a
    walk lock held past ``$MICROSANDBOX_CACHE_LOCK_TIMEOUT`` (default 60 s here)
    or a record it cannot write, and this process walks on its own. Errors of
    ``compute()`` itself (an unreadable tree) propagate.
    """
    since = walks_fresh_since()
    if since is None:
        return compute()
    directory = default_cache_dir(cache) / WALKS_DIR
    name = _record_name(identity)
    record = directory / f"{name}.json"
    lock = cache_lock(directory / f"{name}.lock", f"the fingerprint walk {name}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.acquire(cache_lock_timeout(_LOCK_WAIT_S))
    except (OSError, LockTimeoutError):
        return compute()
    try:
        found = _read(record)
        if found is not None and found[0] >= since:
            return found[1]
        started = time.time()
        fingerprint = compute()
        with contextlib.suppress(OSError):  # a full disk: the others walk too
            _write(record, started, fingerprint)
    finally:
        lock.release(delete=True)
    _forget_oldest(directory)
    return fingerprint


class FirstWalkShared:
    """A layer's fingerprint callable whose first call goes through
    :func:`shared_fingerprint` and every later one walks: the image build
    fingerprints the tree again after imaging it, to catch a change made
    meanwhile, and that check must see the tree, not the record.
    """

    def __init__(
        self, cache: Path | None, identity: tuple[str, ...], compute: Callable[[], str]
    ) -> None:
        self._cache = cache
        self._identity = identity
        self._compute = compute
        self._shared = False

    def __call__(self) -> str:
        if self._shared:
            return self._compute()
        self._shared = True
        return shared_fingerprint(self._cache, self._identity, self._compute)
