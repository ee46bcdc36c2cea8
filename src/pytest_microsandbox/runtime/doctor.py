"""``microsandbox doctor`` (and its old name ``microsandbox-doctor``): say what was
found on this host and why.

Reports the QEMU version, the guest kernel, the agent build, the accelerator
decision (with its reason) and the cache directory; exits non-zero when a
sandbox could not boot here, with the fix for each missing piece.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ._exceptions import SandboxError
from ._integrity import VERIFY_ENV, always_full, record_path
from .accel import env_accel_choice, host_boot_id, kvm_usable
from .paths import cache_dir

__all__ = ["DoctorReport", "diagnose", "main"]


@dataclass
class DoctorReport:
    """What :func:`diagnose` found: ``(name, value)`` facts and blocking problems."""

    facts: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        width = max((len(k) for k, _ in self.facts), default=0)
        lines = [f"{k.ljust(width)}  {v}" for k, v in self.facts]
        for problem in self.problems:
            lines.append(f"PROBLEM: {problem}")
        lines.append("status: " + ("ready" if self.ok else "NOT READY"))
        return "\n".join(lines)


def diagnose(*, probe: bool = True, qemu_version_fact: bool = True) -> DoctorReport:
    """Inspect this host. ``probe=False`` skips booting the KVM probe VM;
    ``qemu_version_fact=False`` skips running ``qemu -version`` (~20 ms), for
    callers that only want :attr:`DoctorReport.ok` (the pytest header).
    """
    from .agent.build import build_agent
    from .kernel import find_kernel
    from .launcher import build_launcher
    from .qemu import find_qemu, qemu_version

    report = DoctorReport()
    cache = cache_dir()
    report.facts.append(("cache directory", str(cache)))
    report.facts.append(("cache integrity", _integrity_fact(cache)))
    try:
        qemu = find_qemu()
        report.facts.append(
            ("qemu", f"{qemu} ({qemu_version(qemu)})" if qemu_version_fact else qemu)
        )
    except SandboxError as exc:
        report.problems.append(exc.message)
    try:
        kernel = find_kernel(cache)
        report.facts.append(("guest kernel", f"{kernel.version} ({kernel.vmlinux})"))
    except SandboxError as exc:
        report.problems.append(exc.message)
    try:
        report.facts.append(("guest agent", str(build_agent(cache))))
    except SandboxError as exc:
        report.problems.append(exc.message)
    launcher, why_not = build_launcher(cache)
    report.facts.append(
        (
            "VM launcher",
            str(launcher)
            if launcher is not None
            else f"not built, {why_not.splitlines()[0]}: QEMU runs under setpriv and each "
            "VM uses ~2 MiB more (apt-get install gcc libc6-dev)",
        )
    )
    usable, why = kvm_usable()
    report.facts.append(("/dev/kvm", why))
    report.facts.append(("host boot id", host_boot_id()))
    try:
        choice = env_accel_choice()  # what a default SandboxConfig resolves to
    except SandboxError as exc:
        report.problems.append(exc.message)
        return report
    if report.ok and (probe or choice != "auto" or not usable):
        from .boot import resolve_accel
        from .config import SandboxConfig
        from .qemu import QemuBackend

        decision = anyio.run(resolve_accel, SandboxConfig(), QemuBackend())
        report.facts.append(("accelerator", f"{decision.accel}: {decision.reason}"))
    else:
        report.facts.append(("accelerator", f"{choice} (not probed)"))
    return report


def _integrity_fact(cache: Path) -> str:
    """How cached files are checked, and how many images lack a digest record
    (built by an older version: rebuilt on their next use). Hashes nothing.
    """
    images = [p for p in (cache / "images").glob("*.erofs") if not p.name.startswith(".")]
    unrecorded = sum(not record_path(p).exists() for p in images)
    mode = (
        f"every use hashes in full (${VERIFY_ENV} is set)"
        if always_full()
        else "sha256 recorded at build, stamp checked on use"
    )
    missing = f", {unrecorded} without a digest record (rebuilt on use)" if unrecorded else ""
    return (
        f"{mode}; {len(images)} images{missing}; hash all now: "
        "python -m pytest_microsandbox.runtime.images verify"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="microsandbox-doctor", description=__doc__)
    parser.add_argument("--no-probe", action="store_true", help="do not boot the KVM probe VM")
    args = parser.parse_args(argv)
    report = diagnose(probe=not args.no_probe)
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
