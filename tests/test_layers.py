"""No layer imports one above it (docs/architecture.md).

From the bottom up: ``runtime`` (the VM engine, usable without pytest),
``snapshots`` (templates, restore, fork), then the pytest plugin
(``plugin``, ``hookspec``, ``fixtures``). Every import statement counts, lazy
ones inside functions and ``TYPE_CHECKING`` blocks included: a lazy import
is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pytest_microsandbox

PACKAGE = Path(pytest_microsandbox.__file__).parent
NAME = "pytest_microsandbox"

#: Layer of each top-level part of the package; a module may import its own
#: layer and those below.
LAYERS = {"runtime": 0, "snapshots": 1, "fixtures": 2, "plugin": 2, "hookspec": 2}

#: Layers that must not import pytest.
NO_PYTEST = {"runtime", "snapshots"}

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
        if own not in LAYERS:
            continue
        for module in _imports(path, package_dir):
            if own in NO_PYTEST and module.split(".")[0] in ("pytest", "_pytest"):
                out.add((rel, "pytest"))
            part = _part(module)
            if part in LAYERS and LAYERS[part] > LAYERS[own]:
                out.add((rel, part))
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
        ("import pytest_microsandbox.fixtures", "fixtures"),
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
