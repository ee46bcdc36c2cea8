"""What the cache holds, by kind, and what each project adds on top of what all
projects share (``pytest --sandbox-cache`` prints it).

Sizes are blocks on disk (``st_blocks``): memory files are sparse, so their
apparent size (the guest's RAM) says nothing about the disk they take.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime._exceptions import SandboxError
from ..runtime.paths import cache_dir
from ._model import SnapshotMeta

__all__ = ["CacheUsage", "KindUsage", "cache_usage"]

#: Root-layer families every project on the machine shares (one per source tree
#: of the host's userspace: /usr, the Python prefix, a venv, the generated /etc).
_SHARED_LAYERS = ("usr", "python", "venv", "base", "skel")
#: Families of one project's own files (its tree, editable installs inside it).
_PROJECT_LAYERS = ("project",)


@dataclass
class KindUsage:
    """One kind of cache entry: how many and how many bytes on disk."""

    kind: str
    note: str
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class CacheUsage:
    """The cache at ``root`` by kind, and the bytes each project adds alone
    (its own layers and the zygotes and templates that boot or copy in only it),
    keyed by the project's layer family or its path when recorded.
    """

    root: Path
    kinds: list[KindUsage] = field(default_factory=list)
    projects: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(k.bytes for k in self.kinds)


def _disk(path: Path) -> int:
    """Bytes allocated under ``path`` (a file or a tree), links not followed."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    total = st.st_blocks * 512
    if path.is_dir() and not path.is_symlink():
        for base, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    total += os.lstat(os.path.join(base, name)).st_blocks * 512
                except OSError:
                    continue
    return total


def _family(image: str) -> str:
    """``project-<hash>`` of ``<cache>/images/project-<hash>-<digest>.erofs``."""
    return "-".join(Path(image).name.split("-")[:2])


@functools.lru_cache(maxsize=256)
def _family_of_root(root: str, cache: Path) -> str | None:
    """The layer family of project directory ``root`` (None: it is gone)."""
    from ..runtime.images._host import PROJECT_SERIAL, plan_host_trees

    try:
        specs = plan_host_trees(project_root=Path(root), cache_dir=cache)
    except SandboxError:
        return None
    return next((s.family() for s in specs if s.serial == PROJECT_SERIAL), None)


def _project_of(meta: SnapshotMeta, cache: Path, copied_in: bool) -> str | None:
    """The project an entry holds, as its layer family: the project layer it boots
    from, or (``copied_in``: a zygote, which may have copied the project into its
    RAM) its config's project root; None: no project (a shared entry). A
    template's config is whoever built it first: its key leaves the project out.
    """
    project_disks = [
        _family(d.path) for d in meta.disks if Path(d.path).name.startswith(_PROJECT_LAYERS)
    ]
    if project_disks:
        return project_disks[0]
    if not copied_in:
        return None
    try:
        config = json.loads(meta.config)
    except ValueError:
        return None
    root = config.get("project_root") if isinstance(config, dict) else None
    if not isinstance(root, str):
        return None
    return _family_of_root(root, cache) or root


def _entries(root: Path) -> Iterable[tuple[Path, SnapshotMeta | None]]:
    try:
        children = sorted(root.iterdir())
    except OSError:
        return
    for child in children:
        if not child.is_dir() or child.name.startswith("."):
            continue
        try:
            meta = SnapshotMeta.model_validate_json((child / "meta.json").read_bytes())
        except (OSError, ValueError):
            meta = None
        yield child, meta


def cache_usage(cache: Path | None = None) -> CacheUsage:
    """Walk the cache (``cache`` or the default) and sum it up; reads only."""
    root = cache_dir(cache)
    usage = CacheUsage(root)
    shared = KindUsage("root layers, shared", "/usr, Python prefix, venvs, /etc: every project")
    own = KindUsage("root layers, per project", "each project's own files")
    other_layers = KindUsage("root layers, other", "directory and OCI images, patches")
    templates = KindUsage("templates", "booted VMs saved, one per configuration")
    bases = KindUsage("base zygotes", "Python and pytest started, no project: shared")
    zygotes = KindUsage("zygotes", "a project's tests collected, per project and edit")
    named = KindUsage("named snapshots", "Sandbox.snapshot and --sandbox-keep-failed")
    rest = KindUsage("kernel, initramfs, agent", "built once per host")
    usage.kinds = [shared, own, other_layers, templates, bases, zygotes, named, rest]

    images = root / "images"
    for image in sorted(images.glob("*.erofs")) if images.is_dir() else ():
        size = _disk(image) + _disk(image.with_name(image.name + ".digest"))
        label = image.name.split("-")[0]
        if label in _SHARED_LAYERS:
            shared.add(size)
        elif label in _PROJECT_LAYERS or label.startswith("edit"):
            own.add(size)
            if label in _PROJECT_LAYERS:
                key = _family(str(image))
                usage.projects[key] = usage.projects.get(key, 0) + size
        else:
            other_layers.add(size)
    snapshots = root / "snapshots"
    for kind, where in ((templates, snapshots / "templates"), (None, snapshots / "named")):
        for path, meta in _entries(where):
            size = _disk(path)
            if kind is not None:
                target = kind
            elif path.name.startswith("zygote-base-"):
                target = bases
            elif path.name.startswith("zygote-"):
                target = zygotes
            else:
                target = named
            target.add(size)
            project = None
            if meta is not None and target is not bases:
                project = _project_of(meta, root, copied_in=target is zygotes)
            if project is not None and target is not named:
                usage.projects[project] = usage.projects.get(project, 0) + size
    for name in ("kernel", "initramfs", "agent", "bin"):
        if (root / name).exists():
            rest.add(_disk(root / name))
    return usage
