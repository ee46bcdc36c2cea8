"""The ``host`` image: the host's own userspace, as layered erofs images."""

from __future__ import annotations

import glob
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from .._exceptions import ImageError
from .._keys import KeyHasher
from ._fingerprint import file_fingerprint, tree_fingerprint
from ._layers import LayerSpec
from ._staging import MERGED_USR_DIRS
from ._store import logger

__all__ = [
    "DEFAULT_USR_EXCLUDES",
    "PACKAGE_DATABASES",
    "PROJECT_EXCLUDE_NAMES",
    "PROJECT_EXCLUDE_TOP",
    "PROJECT_SERIAL",
    "UNHASHED_NAMES",
    "USR_WATCHED",
    "imaged_venv",
    "plan_host_trees",
    "plan_usr",
]

#: Trees under /usr left out of the ``host`` image by default (globs). Measured
#: here (5.4 GB /usr, warm page cache): all of /usr took 14.8 s (48.9 s cold)
#: and 5.4 GB; without these 6.7 s and 1.9 GB. Documentation, translations and
#: debug symbols serve no test; the SDKs/toolchains are big and rarely needed
#: by a Python test suite. Pass ``usr_excludes`` to change the list.
DEFAULT_USR_EXCLUDES: tuple[str, ...] = (
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/gtk-doc",
    "/usr/lib/debug",
    "/usr/lib/google-cloud-sdk",
    "/usr/lib/jvm",
    "/usr/lib/llvm-*",
    "/usr/local/cuda*",
)

#: Package databases whose change means /usr changed (paths under the host root).
PACKAGE_DATABASES: tuple[str, ...] = (
    "var/lib/dpkg/status",  # Debian, Ubuntu
    "var/lib/rpm",  # Fedora, RHEL (older)
    "usr/lib/sysimage/rpm",  # Fedora, openSUSE
    "var/lib/pacman/local",  # Arch
    "lib/apk/db/installed",  # Alpine
)

#: Parts of /usr that change behind the package manager's back (make install,
#: pip --break-system-packages): fully stat-walked, they are small.
USR_WATCHED: tuple[str, ...] = ("usr/local", "usr/lib/python3*")

#: The serial (guest disk name) of the project's layer.
PROJECT_SERIAL = "l-project"

#: Dropped from the project layer at any depth: VCS data, caches that every
#: host test run rewrites (they would force a rebuild per run), JS deps.
PROJECT_EXCLUDE_NAMES: tuple[str, ...] = (
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    ".tox",
    ".nox",
)

#: Dropped from the project layer at its top level only (a package may well
#: contain a ``build`` module deeper down).
PROJECT_EXCLUDE_TOP: tuple[str, ...] = (".venv", "venv", "build", "dist", ".eggs")

#: Imaged but not fingerprinted: Python checks each .pyc against its source,
#: and host test runs keep writing them.
UNHASHED_NAMES: tuple[str, ...] = ("__pycache__",)


def _under(path: Path, tree: Path) -> bool:
    return path == tree or path.is_relative_to(tree)


def _refuse_wholesale(path: Path, what: str) -> None:
    home = Path.home().resolve()
    if path == Path("/") or _under(home, path):
        raise ImageError(
            f"refusing to image {path} as the {what}: it is / or contains your home "
            f"directory ({home}); point it at the project's own directory"
        )


def _usr_fingerprint(host_root: Path, excludes: Sequence[Path], real_dirs: Sequence[Path]) -> str:
    h = KeyHasher()
    found = False
    for rel in PACKAGE_DATABASES:
        db = host_root / rel
        if db.is_file():
            h.add("db", rel, file_fingerprint(db))
            found = True
        elif db.is_dir():
            h.add("db", rel, tree_fingerprint(db))
            found = True
    for pattern in USR_WATCHED:
        for tree in sorted(host_root.glob(pattern)):
            if tree.is_dir() and not tree.is_symlink():
                fp = tree_fingerprint(tree, skip_paths=excludes, unhashed_names=UNHASHED_NAMES)
                h.add("tree", str(tree), fp)
    for d in real_dirs:
        h.add("dir", str(d))
    if not found:
        # No package database we know: fall back to the directory mtimes of
        # all of /usr (catches added and removed files, not in-place edits).
        logger.warning("no package database found; fingerprinting /usr by directory mtimes")
        for tree in (host_root / "usr", *real_dirs):
            h.add(tree_fingerprint(tree, skip_paths=excludes, dirs_only=True))
    return h.hexdigest()


def _expand(patterns: Sequence[str]) -> tuple[Path, ...]:
    out: set[Path] = set()
    for pattern in patterns:
        if not pattern.startswith("/"):
            raise ImageError(
                f"usr exclude {pattern!r} is not an absolute path; write it like '/usr/share/doc'"
            )
        out.update(Path(p) for p in glob.glob(pattern))
    return tuple(sorted(out))


def plan_usr(*, usr_excludes: Sequence[str], host_root: Path = Path("/")) -> LayerSpec:
    """The /usr layer (plus /bin, /lib, ... on a host without merged /usr)."""
    real_dirs = [
        host_root / n
        for n in MERGED_USR_DIRS
        if (host_root / n).is_dir() and not (host_root / n).is_symlink()
    ]
    keep = (host_root / "usr", *real_dirs)
    excludes = _expand(usr_excludes)
    return LayerSpec(
        serial="l-usr",
        label="usr",
        description="/usr (host)",
        source=host_root,
        keep=keep,
        exclude_paths=excludes,
        fingerprint=lambda: _usr_fingerprint(host_root, excludes, real_dirs),
    )


def _tree_spec(
    serial: str,
    label: str,
    tree: Path,
    description: str,
    *,
    exclude_paths: tuple[Path, ...] = (),
    exclude_names: tuple[str, ...] = (),
) -> LayerSpec:
    return LayerSpec(
        serial=serial,
        label=label,
        description=description,
        source=Path("/"),
        keep=(tree,),
        exclude_paths=exclude_paths,
        exclude_names=exclude_names,
        fingerprint=lambda: tree_fingerprint(
            tree,
            skip_paths=exclude_paths,
            skip_names=exclude_names,
            unhashed_names=UNHASHED_NAMES,
        ),
    )


#: At most this many editable-install source trees get layers of their own.
MAX_EDITABLE_LAYERS = 4


def editable_source_dirs(prefix: Path, covered: list[Path]) -> list[Path]:
    """Directories that ``.pth`` files of the environment at ``prefix`` put on
    ``sys.path`` (how editable installs point at their sources), minus those
    inside ``covered`` trees, the home directory itself and ``/``.
    """
    found: list[Path] = []
    home = Path.home().resolve()
    for pth in sorted(prefix.glob("lib/python3*/site-packages/*.pth")):
        try:
            lines = pth.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith(("#", "import ", "import\t")):
                continue
            path = Path(line)
            if not path.is_absolute() or not path.is_dir():
                continue
            path = path.resolve()
            if path == Path("/") or _under(home, path) or path in found:
                continue
            if any(_under(path, tree) for tree in covered):
                continue
            found.append(path)
    return found[:MAX_EDITABLE_LAYERS]


def _uses_system_site_packages(venv: Path) -> bool:
    """Whether the virtualenv at ``venv`` imports the base Python's site-packages
    too (its ``pyvenv.cfg`` says ``include-system-site-packages = true``); True
    when that cannot be read, so that nothing it may import is left out.
    """
    try:
        text = (venv / "pyvenv.cfg").read_text(errors="replace")
    except OSError:
        return True
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "include-system-site-packages":
            return value.strip().lower() != "false"
    return False  # venv and virtualenv write the key; without it they default to false


def imaged_venv(prefix: Path | None = None, base_prefix: Path | None = None) -> Path | None:
    """The virtualenv (``sys.prefix``) that the ``host`` image carries, at the
    same path in the guest, or None when Python runs outside one. The image
    holds it always: in a layer of its own, or inside /usr or the Python
    prefix, which are imaged too (:func:`plan_host_trees`).
    """
    base = Path(base_prefix or sys.base_prefix).resolve()
    venv = Path(prefix or sys.prefix).resolve()
    return None if venv == base else venv


def _own_output_files() -> list[Path]:
    """Regular files this process's stdout and stderr write to (``pytest > log``,
    pytester's captured output): one inside the project grows while the project
    is imaged, so it stays out of the project's layer.
    """
    files = []
    for fd in (1, 2):
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        if target.is_absolute() and target.exists():
            files.append(target.resolve())
    return files


def plan_host_trees(
    *,
    project_root: Path | None,
    cache_dir: Path,
    base_prefix: Path | None = None,
    prefix: Path | None = None,
) -> list[LayerSpec]:
    """Project, venv and Python prefix layers (top first), omitting the redundant ones."""
    base = Path(base_prefix or sys.base_prefix).resolve()
    venv = Path(prefix or sys.prefix).resolve()
    usr = Path("/usr")
    trees: list[tuple[str, str, Path, str]] = []
    if not _under(base, usr):
        _refuse_wholesale(base, "Python prefix")
        trees.append(("l-python", "python", base, f"{base} (Python prefix)"))
    if venv != base and not _under(venv, usr) and not _under(venv, base):
        _refuse_wholesale(venv, "virtualenv")
        trees.insert(0, ("l-venv", "venv", venv, f"{venv} (virtualenv)"))  # above the prefix
    unused: tuple[Path, ...] = ()
    if venv != base and not _under(venv, base) and not _uses_system_site_packages(venv):
        # The venv cannot import from them; here they were 51k of the prefix's
        # 60k entries, most of the walk that fingerprints it on every run.
        unused = tuple(sorted(base.glob("lib*/python3*/site-packages")))
    specs = [
        _tree_spec(serial, label, tree, desc, exclude_paths=unused if serial == "l-python" else ())
        for serial, label, tree, desc in trees
    ]
    if project_root is not None:
        root = Path(project_root).resolve()
        if not root.is_dir():
            raise ImageError(
                f"project root {project_root} is not a directory; pass the project's "
                "directory (pytest's rootdir)"
            )
        _refuse_wholesale(root, "project root")
        # Trees imaged by their own layers, and our cache, stay out of the project.
        inside = [t for _, _, t, _ in trees if t != root and _under(t, root)]
        cache = cache_dir.resolve()
        if _under(cache, root) and cache != root:
            inside.append(cache)
        inside += [root / n for n in PROJECT_EXCLUDE_TOP]
        inside += [f for f in _own_output_files() if _under(f, root) and f != root]
        specs.insert(
            0,
            _tree_spec(
                PROJECT_SERIAL,
                "project",
                root,
                f"{root} (project)",
                exclude_paths=tuple(sorted(set(inside))),
                exclude_names=PROJECT_EXCLUDE_NAMES,
            ),
        )
    # Editable installs whose sources live outside every tree imaged so far
    # (e.g. a package under development used by another project's tests).
    covered = [*(t for _, _, t, _ in trees), usr]
    if project_root is not None:
        covered.append(Path(project_root).resolve())
    for n, source in enumerate(editable_source_dirs(venv, covered)):
        specs.insert(
            0,
            _tree_spec(
                f"l-edit{n}",
                f"edit{n}",
                source,
                f"{source} (editable install)",
                exclude_names=PROJECT_EXCLUDE_NAMES,
            ),
        )
    return specs
