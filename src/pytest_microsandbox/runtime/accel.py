"""Choose the accelerator: KVM only when a probe boot really reaches the agent.

``/dev/kvm`` existing proves nothing: on PVM hosts standard guest kernels hang
or die under KVM (measured; docs/architecture.md). So the first sandbox on a host boots a
probe VM under KVM with a short timeout; if its agent answers, KVM is used,
otherwise TCG. The verdict is cached per host boot
(``/proc/sys/kernel/random/boot_id``) in the cache directory.

Concurrent first users (tasks of one process, other processes, xdist workers)
run one probe: the first takes the verdict's lock and probes while holding it;
the others wait for it without blocking their event loop (the probe's own boot
needs that loop) and read the verdict it wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from ._exceptions import ConfigError, SandboxError
from ._locks import cache_lock, cache_lock_timeout
from .backend import Accel

__all__ = [
    "ACCEL_ENV",
    "NOT_PROBED",
    "AccelChoice",
    "AccelDecision",
    "choose_accel",
    "env_accel_choice",
    "host_boot_id",
    "known_accel",
    "kvm_usable",
]

#: Environment variable choosing the accelerator when the config does not.
ACCEL_ENV = "MICROSANDBOX_ACCEL"

AccelChoice = Literal["auto", "kvm", "tcg"]

#: Seconds a KVM probe boot may take to reach the agent. Real KVM gets there
#: in well under a second; a broken one hangs.
PROBE_TIMEOUT = 8.0


@dataclass(frozen=True)
class AccelDecision:
    """Which accelerator is used and why (shown by ``doctor`` and the pytest header)."""

    accel: Accel
    reason: str


def host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_usable() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` can be opened read-write, with the reason if not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist (no hardware virtualization exposed)"
    except PermissionError:
        return False, "/dev/kvm is not writable (add the user to the kvm group)"
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return True, "/dev/kvm opens read-write"


def env_accel_choice() -> AccelChoice:
    """``$MICROSANDBOX_ACCEL`` (``auto`` when unset or empty).

    :raises ConfigError: it holds something other than auto, kvm or tcg.
    """
    raw = os.environ.get(ACCEL_ENV, "auto").strip().lower() or "auto"
    choices: dict[str, AccelChoice] = {"auto": "auto", "kvm": "kvm", "tcg": "tcg"}
    try:
        return choices[raw]
    except KeyError:
        raise ConfigError(f"${ACCEL_ENV}={raw!r} is not one of auto, kvm, tcg") from None


ProbeBoot = Callable[[float], Awaitable[None]]

_RECORD = "accel-probe.json"

#: Default seconds to wait for another process probing (``$MICROSANDBOX_CACHE_LOCK_TIMEOUT``).
#: A probe is bounded by ``PROBE_TIMEOUT`` plus what the probe function builds first.
PROBE_LOCK_TIMEOUT = 300.0

#: The verdict when a probe boot would be needed but none may run.
NOT_PROBED = AccelDecision("tcg", "KVM not probed; using TCG emulation")


def known_accel(choice: AccelChoice, cache: Path) -> AccelDecision | None:
    """The verdict for ``choice`` if it needs no probe boot (forced, no usable
    ``/dev/kvm``, or this host boot's probe result cached), else None. Cheap:
    no event loop, no lock.
    """
    if choice == "kvm":
        return AccelDecision("kvm", "forced (accel=kvm)")
    if choice == "tcg":
        return AccelDecision("tcg", "forced (accel=tcg)")
    usable, why = kvm_usable()
    if not usable:
        return AccelDecision("tcg", f"{why}; using TCG emulation")
    return _read_record(cache / _RECORD, host_boot_id())


async def choose_accel(choice: AccelChoice, cache: Path, probe: ProbeBoot | None) -> AccelDecision:
    """Resolve ``choice`` to a concrete accelerator.

    ``probe(timeout)`` boots a minimal VM under KVM and returns once its agent
    answers, raising :class:`SandboxError` (or timing out) otherwise. It runs
    at most once per host boot and cache: concurrent callers wait for the one
    that probes and share its verdict.

    :raises LockTimeoutError: another process or task held the probe's lock for
        longer than ``$MICROSANDBOX_CACHE_LOCK_TIMEOUT`` (default 300 s).
    """
    known = known_accel(choice, cache)
    if known is not None or probe is None:
        return known or NOT_PROBED
    boot_id = host_boot_id()
    record = cache / _RECORD
    lock = cache_lock(cache / f"{_RECORD}.lock", f"the KVM probe verdict {record}")
    await lock.acquire_async(cache_lock_timeout(PROBE_LOCK_TIMEOUT))
    try:
        cached = _read_record(record, boot_id)
        if cached is not None:
            return cached  # another process or task probed while we waited
        start = time.monotonic()
        try:
            with anyio.fail_after(PROBE_TIMEOUT + 2):
                await probe(PROBE_TIMEOUT)
        except (SandboxError, TimeoutError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            decision = AccelDecision("tcg", f"KVM probe boot failed ({first}); using TCG emulation")
        else:
            took = time.monotonic() - start
            decision = AccelDecision("kvm", f"KVM probe boot reached the agent in {took:.2f} s")
        _write_record(record, boot_id, decision)
        return decision
    finally:
        # The record now answers every caller without the lock: leave no lock file.
        lock.release(delete=True)


def _read_record(path: Path, boot_id: str) -> AccelDecision | None:
    try:
        data = json.loads(path.read_text())
        if data.get("boot_id") != boot_id or data.get("accel") not in ("kvm", "tcg"):
            return None
        return AccelDecision(data["accel"], f"{data['reason']} (cached for this host boot)")
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _write_record(path: Path, boot_id: str, decision: AccelDecision) -> None:
    data = {"boot_id": boot_id, "accel": decision.accel, "reason": decision.reason}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".accel-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
