"""Build the guest initramfs: a pure-Python newc cpio writer plus module selection.

The initramfs holds the static agent as ``/init`` (PID 1), the kernel modules
it loads (``/modules/*.ko``) and ``/modules/order``, their load order with
dependencies first, read from the kernel's ``modules.dep``.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._cache import GRACE_S, CacheStore, snapshot_refs
from ._exceptions import KernelNotFoundError
from ._keys import digest_parts, sha256_file
from ._locks import cache_lock_timeout

__all__ = [
    "GUEST_MODULES",
    "INITRAMFS_GRACE_S",
    "KEEP_INITRAMFS",
    "CpioWriter",
    "InitramfsSpec",
    "build_initramfs",
    "parse_modules_dep",
    "prune_initramfs",
    "resolve_modules",
]

logger = logging.getLogger("pytest_microsandbox.initramfs")

#: Archives kept, the most recently used; every agent or kernel change builds
#: a new one, and older ones are pruned after each build.
KEEP_INITRAMFS = 3

#: Seconds after its last use during which an archive is never pruned (a
#: process may be about to boot, or start a clone, from it): the cache-wide
#: grace period, :data:`._cache.GRACE_S`.
INITRAMFS_GRACE_S = GRACE_S

#: Modules the guest needs, by name. ``crc32c_generic`` is a soft dependency
#: of ``libcrc32c`` (needed by erofs) that modules.dep does not list.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtio_net",
    "wireguard",
    "crc32c_generic",
    # The stream path's redirect (network/_streams.py): nftables NAT + redirect.
    # After crc32c_generic: their libcrc32c needs it loaded.
    "nft_chain_nat",
    "nft_redir",
    "erofs",
    "overlay",
    "9pnet_virtio",
    "9p",
    "ext4",
    "loop",
)

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks."""

    def __init__(self, out: io.BufferedIOBase | io.BytesIO) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_bytes = name.encode() + b"\0"
        fields = (
            self._ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: fixed, so the archive is reproducible
            len(data),
            0,  # devmajor
            0,  # devminor
            0,  # rdevmajor
            0,  # rdevminor
            len(name_bytes),
            0,  # check
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header)
        self._out.write(name_bytes)
        self._out.write(b"\0" * (-(len(header) + len(name_bytes)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        parent = name.rpartition("/")[0]
        if parent:
            self.add_dir(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        parent = name.rpartition("/")[0]
        if parent:
            self.add_dir(parent)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> None:
        self._entry(_TRAILER, 0, nlink=1)
        # The kernel reads the archive in 512-byte blocks.
        pad = -self._out.tell() % 512 if hasattr(self._out, "tell") else 0
        self._out.write(b"\0" * pad)


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse modules.dep into ``{module path: [dependency paths]}``."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def resolve_modules(deps: Mapping[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Return module paths for ``wanted`` names plus dependencies, dependencies first.

    :raises KernelNotFoundError: a wanted module is not in modules.dep.
    """
    by_name = {_module_name(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise KernelNotFoundError(
                f"kernel module {name!r} is not in modules.dep: the kernel build lacks it "
                "(use Debian's generic linux-image-amd64, not the cloud flavour)"
            )
        visit(path)
    return order


@dataclass(frozen=True)
class InitramfsSpec:
    """What goes into an initramfs; its digest names the cached archive."""

    agent: Path
    modules_dir: Path
    modules: tuple[str, ...] = GUEST_MODULES

    def digest(self) -> str:
        return digest_parts(
            sha256_file(self.agent),
            str(self.modules_dir.resolve()),
            (self.modules_dir / "modules.dep").read_bytes(),
            *self.modules,
            length=16,
        )


def _store(out_dir: Path) -> CacheStore:
    return CacheStore(out_dir, "initramfs-*.cpio", "cached initramfs", logger=logger)


def build_initramfs(spec: InitramfsSpec, out_dir: Path) -> Path:
    """Write the initramfs for ``spec`` into ``out_dir`` (cached by digest); return its path.

    Handing out a cached archive marks it used (its digest record's mtime); a
    build prunes old ones (:func:`prune_initramfs`) and leaves no lock file
    behind. A cached archive is checked against the SHA-256 recorded at its
    build (one ``stat`` while its verified stamp holds); a corrupt or
    unrecorded one is rebuilt, once, under the lock.

    :raises LockTimeoutError: another process has been building it for 300 s
        (or ``$MICROSANDBOX_CACHE_LOCK_TIMEOUT``, which the message names).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    store = _store(out_dir)
    target = out_dir / f"initramfs-{spec.digest()}.cpio"
    if store.usable(target):
        return target
    lock = store.lock(target.name, f"the initramfs {target}")
    lock.acquire(timeout=cache_lock_timeout(300))
    try:
        if store.usable(target, log=True):
            return target
        store.remove(target)
        deps = parse_modules_dep((spec.modules_dir / "modules.dep").read_text())
        order = resolve_modules(deps, spec.modules)
        buf = io.BytesIO()
        cpio = CpioWriter(buf)
        for d in ("dev", "proc", "sys", "newroot", "layers", "rw", "modules"):
            cpio.add_dir(d)
        cpio.add_file("init", spec.agent.read_bytes(), mode=0o755)
        names = []
        for path in order:
            name = f"modules/{os.path.basename(path)}"
            cpio.add_file(name, (spec.modules_dir / path).read_bytes())
            names.append("/" + name)
        cpio.add_file("modules/order", ("\n".join(names) + "\n").encode())
        cpio.finish()
        tmp = store.temp_path(target.name)
        try:
            tmp.write_bytes(buf.getvalue())
            store.publish_file(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        lock.release(delete=True)
    prune_initramfs(out_dir, keep=target)
    return target


def _initrd_path(meta: dict[str, Any]) -> list[str]:
    initrd = meta.get("initrd")
    return [initrd] if isinstance(initrd, str) else []


def prune_initramfs(
    out_dir: Path, *, keep: Path | None = None, now: float | None = None
) -> list[Path]:
    """Delete archives beyond the :data:`KEEP_INITRAMFS` most recently used; return them.

    Never deleted: ``keep``, archives used in the last :data:`INITRAMFS_GRACE_S`
    seconds, and those named user snapshots boot from (``<cache>`` is
    ``out_dir``'s parent; they neither go nor count among the most recent).
    Stale temporary files, idle lock files and digest records whose archive is
    gone go too.
    """
    store = _store(out_dir)
    # Only pins: a snapshot restore does not count as a use of its archive here.
    pinned = snapshot_refs(out_dir.parent, _initrd_path).pinned
    result = store.prune(
        entries=store.scan(pins=pinned),
        keep_recent=KEEP_INITRAMFS,
        keep=() if keep is None else [keep],
        now=now,
    )
    store.sweep(now=now, legacy_temps=["initramfs-*.tmp*"])
    if result.removed:
        logger.info("pruned %d old initramfs archives", len(result.removed))
    return [e.path for e in result.removed]
