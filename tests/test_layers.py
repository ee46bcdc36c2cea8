"""No layer imports one above it (docs/architecture.md).

From the bottom up: ``runtime`` (the VM engine, usable without pytest),
``snapshots`` (templates, restore, fork), then, side by side, the pytest
plugin (``plugin``, ``hookspec``) and the ``microsandbox`` command (``cli``),
which never import each other and of which only the plugin imports pytest.
Beside them, ``guest`` (the runner started inside the VM and its messages)
imports only the standard library, pytest and itself: it starts under
emulation, and the plugin imports its messages. Every import
statement counts, lazy ones inside functions and ``TYPE_CHECKING`` blocks
included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import pytest_microsandbox

PACKAGE = Path(pytest_microsandbox.__file__).parent
NAME = "pytest_microsandbox"

#: Layer of each top-level part of the package; a module may import its own
#: layer and those below.
LAYERS = {"runtime": 0, "snapshots": 1, "plugin": 2, "hookspec": 2, "cli": 2}

#: Parts of one layer that must not import each other.
APART = {"cli": {"plugin", "hookspec"}, "plugin": {"cli"}, "hookspec": {"cli"}}

#: Parts that may import nothing of the package but themselves, and no
#: third-party module but pytest's own (the guest's bootstrap memoizes what
#: _pytest and pluggy read of the plugins).
SELF_CONTAINED = {"guest"}
PYTEST_PACKAGES = ("pytest", "_pytest", "pluggy")

#: Layers that must not import pytest.
NO_PYTEST = {"runtime", "snapshots", "cli"}

#: Upward imports that exist today, to be removed; none may be added.
KNOWN_DEBT: set[tuple[str, str]] = set()


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != NAME:
        return None
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, package_dir: Path) -> set[str]:
    """Absolute names of every module ``path`` imports."""
    package = list(path.relative_to(package_dir.parent).parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _violations(package_dir: Path = PACKAGE) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).as_posix()
        own = rel.split("/")[0].removesuffix(".py")
        if own in SELF_CONTAINED:
            out.update((rel, target) for target in _foreign(path, package_dir, own))
            continue
        if own not in LAYERS:
            continue
        for module in _imports(path, package_dir):
            if own in NO_PYTEST and module.split(".")[0] in ("pytest", "_pytest"):
                out.add((rel, "pytest"))
            part = _part(module)
            if part in LAYERS and LAYERS[part] > LAYERS[own]:
                out.add((rel, part))
            if part in APART.get(own, ()):
                out.add((rel, part))
    return out


def _foreign(path: Path, package_dir: Path, own: str) -> set[str]:
    """What a self-contained part's module imports from outside it."""
    out: set[str] = set()
    for module in _imports(path, package_dir):
        top = module.split(".")[0]
        if top == NAME:
            # The package itself (its light __init__, loaded anyway) is fine:
            # ``from .. import x`` is checked as ``pytest_microsandbox.x``.
            part = _part(module)
            if module != NAME and part != own:
                out.add(str(part))
        elif top not in sys.stdlib_module_names and top not in ("__future__", *PYTEST_PACKAGES):
            out.add(top)
    return out


def test_no_layer_imports_a_layer_above_it():
    new = _violations() - KNOWN_DEBT
    assert not new, "upward imports (see docs/architecture.md): " + ", ".join(
        f"{module} imports {target}" for module, target in sorted(new)
    )


def test_known_debt_is_still_debt():
    gone = KNOWN_DEBT - _violations()
    assert not gone, f"paid off, remove from KNOWN_DEBT: {sorted(gone)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..snapshots import x", "snapshots"),
        ("from ..snapshots._engine import y", "snapshots"),
        ("import pytest_microsandbox.plugin", "plugin"),
        ("from .. import plugin", "plugin"),
        ("import pytest", "pytest"),
    ],
)
def test_the_checker_sees_lazy_relative_and_absolute_upward_imports(tmp_path, source, expected):
    package = tmp_path / NAME
    (package / "runtime").mkdir(parents=True)
    (package / "runtime" / "probe.py").write_text(f"def f():\n    {source}\n")
    (package / "runtime" / "fine.py").write_text("from . import probe\nfrom .. import runtime\n")
    assert _violations(package) == {("runtime/probe.py", expected)}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..runtime import x", "runtime"),
        ("from ..plugin._zygote import y", "plugin"),
        ("import pytest_microsandbox.snapshots", "snapshots"),
        ("from .. import hookspec", "hookspec"),
        ("import anyio", "anyio"),
        ("import pydantic.main", "pydantic"),
    ],
)
def test_the_guest_imports_only_the_stdlib_pytest_and_itself(tmp_path, source, expected):
    package = tmp_path / NAME
    (package / "guest").mkdir(parents=True)
    (package / "guest" / "probe.py").write_text(f"def f():\n    {source}\n")
    (package / "guest" / "fine.py").write_text(
        "from __future__ import annotations\nimport json, os\nimport pytest\n"
        "import pluggy._manager\nfrom _pytest.fixtures import FixtureManager\n"
        "from . import probe\nfrom .probe import f\nimport pytest_microsandbox.guest.probe\n"
    )
    assert _violations(package) == {("guest/probe.py", expected)}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..plugin import _keep", "plugin"),
        ("import pytest_microsandbox.hookspec", "hookspec"),
        ("import pytest", "pytest"),
        ("from _pytest import nodes", "pytest"),
    ],
)
def test_the_cli_imports_neither_the_plugin_nor_pytest(tmp_path, source, expected):
    package = tmp_path / NAME
    (package / "cli").mkdir(parents=True)
    (package / "cli" / "probe.py").write_text(f"def f():\n    {source}\n")
    (package / "cli" / "fine.py").write_text(
        "from ..runtime import Sandbox\nfrom ..snapshots import Snapshot\nfrom . import probe\n"
    )
    (package / "plugin").mkdir()
    (package / "plugin" / "bad.py").write_text("from ..cli import main\n")
    assert _violations(package) == {("cli/probe.py", expected), ("plugin/bad.py", "cli")}
