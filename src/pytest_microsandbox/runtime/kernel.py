"""Find or provision the guest kernel and its modules.

The guest runs Debian's generic ``linux-image-*-amd64`` kernel, extracted from
its .deb into the cache directory (never installed on the host). The bzImage
is decompressed once to its ELF ``vmlinux``, which QEMU boots through the PVH
entry: decompressing under TCG emulation costs ~2 s of every cold boot
(measured; docs/architecture.md). The ``cloud`` flavour lacks 9p, so it is not used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._exceptions import KernelNotFoundError
from ._locks import cache_lock, cache_lock_timeout
from .paths import cache_dir as default_cache_dir

__all__ = [
    "KERNEL_DIR_ENV",
    "KernelInfo",
    "extract_vmlinux",
    "find_kernel",
    "provision_kernel",
]

#: Environment variable naming a kernel directory laid out like the cache's
#: (``vmlinux``, ``modules/<version>/``, ``kernel.json``) to use instead.
KERNEL_DIR_ENV = "MICROSANDBOX_KERNEL_DIR"

_META = "kernel.json"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_PROVISION_HINT = (
    "run the set-up command from README.md, or: "
    "python -m pytest_microsandbox.runtime.kernel provision"
)


@dataclass(frozen=True)
class KernelInfo:
    """A provisioned guest kernel."""

    version: str
    vmlinux: Path
    modules_dir: Path  # .../lib/modules/<version>, with modules.dep
    digest: str  # identity of the kernel build, for snapshot keys

    @property
    def root(self) -> Path:
        return self.vmlinux.parent


def _kernel_root(cache: Path | None) -> Path:
    override = os.environ.get(KERNEL_DIR_ENV)
    if override:
        return Path(override)
    return default_cache_dir(cache) / "kernel"


def find_kernel(cache: Path | None = None) -> KernelInfo:
    """Return the provisioned kernel.

    :raises KernelNotFoundError: nothing was provisioned, or the files are incomplete.
    """
    root = _kernel_root(cache)
    meta_path = root / _META
    if not meta_path.is_file():
        raise KernelNotFoundError(f"no guest kernel in {root}: {_PROVISION_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
        version = str(meta["version"])
        digest = str(meta["digest"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KernelNotFoundError(
            f"guest kernel metadata {meta_path} is unreadable ({exc}): {_PROVISION_HINT}"
        ) from exc
    info = KernelInfo(
        version=version,
        vmlinux=root / "vmlinux",
        modules_dir=root / "modules" / version,
        digest=digest,
    )
    if not info.vmlinux.is_file() or not (info.modules_dir / "modules.dep").is_file():
        raise KernelNotFoundError(f"guest kernel in {root} is incomplete: {_PROVISION_HINT}")
    return info


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside a bzImage whose payload is xz-compressed.

    :raises KernelNotFoundError: no xz payload holding an ELF image was found.
    """
    start = bzimage.find(_XZ_MAGIC)
    while start != -1:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            out = b""
        if out.startswith(b"\x7fELF"):
            return out
        start = bzimage.find(_XZ_MAGIC, start + 1)
    raise KernelNotFoundError("the kernel image carries no xz-compressed ELF payload")


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise KernelNotFoundError(
            f"{cmd[0]} is not installed: apt-get install apt dpkg kmod"
        ) from exc
    if done.returncode != 0:
        raise KernelNotFoundError(
            f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def _kernel_package() -> str:
    """Resolve the ``linux-image-amd64`` meta package to the versioned image package."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-[0-9][^\s]*-amd64)\s*$", line)
        if match:
            return match.group(1)
    raise KernelNotFoundError(
        "apt knows no linux-image-amd64 package: run apt-get update (Debian bookworm or newer)"
    )


def provision_kernel(cache: Path | None = None, *, deb: Path | None = None) -> KernelInfo:
    """Download Debian's generic kernel package and extract it into the cache.

    Idempotent: returns the existing kernel when one is provisioned. Published
    atomically (extracted in a temporary directory, renamed into place).
    Blocking; concurrent callers provision once.

    :raises LockTimeoutError: another process provisioned for longer than
        ``$MICROSANDBOX_CACHE_LOCK_TIMEOUT`` (default 900 s).
    """
    root = _kernel_root(cache)
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_lock(Path(f"{root}.lock"), f"the kernel provisioned into {root}")
    lock.acquire(cache_lock_timeout(900))
    try:
        try:
            return find_kernel(cache)
        except KernelNotFoundError:
            pass
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".kernel-") as tmp_name:
            tmp = Path(tmp_name)
            if deb is None:
                _run(["apt-get", "download", _kernel_package()], cwd=tmp)
                debs = sorted(tmp.glob("linux-image-*.deb"))
                if not debs:
                    raise KernelNotFoundError("apt-get download produced no kernel package")
                deb = debs[0]
            tree = tmp / "deb"
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
            versions = sorted(p.name for p in (tree / "lib/modules").iterdir())
            if not versions:
                raise KernelNotFoundError(f"{deb} holds no kernel modules")
            version = versions[-1]
            bzimage = (tree / "boot" / f"vmlinuz-{version}").read_bytes()
            vmlinux = extract_vmlinux(bzimage)
            out = tmp / "out"
            (out / "modules").mkdir(parents=True)
            (out / "vmlinux").write_bytes(vmlinux)
            shutil.move(str(tree / "lib/modules" / version), str(out / "modules" / version))
            shutil.copy2(tree / "boot" / f"config-{version}", out / "config")
            # The .deb ships no modules.dep; depmod wants a lib/modules/<v> layout.
            staging = tmp / "depmod"
            (staging / "lib/modules").mkdir(parents=True)
            (staging / "lib/modules" / version).symlink_to(out / "modules" / version)
            _run(["depmod", "-b", str(staging), version])
            digest = hashlib.sha256(vmlinux).hexdigest()[:16]
            (out / _META).write_text(
                json.dumps({"version": version, "digest": digest, "package": deb.name})
            )
            if root.exists():
                shutil.rmtree(root)
            os.replace(out, root)
    finally:
        lock.release()
    return find_kernel(cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_microsandbox.runtime.kernel")
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="download and extract the guest kernel")
    prov.add_argument("--deb", type=Path, help="use this linux-image .deb instead of apt")
    sub.add_parser("show", help="print the provisioned kernel")
    args = parser.parse_args(argv)
    try:
        info = provision_kernel(deb=args.deb) if args.command == "provision" else find_kernel()
    except KernelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {info.version}: {info.vmlinux}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
