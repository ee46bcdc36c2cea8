"""Where the layers above the runtime plug into it (see ``runtime/provision.py``).

A leaf module beside ``_lazy.py``, importing nothing at load, so that
``pytest_microsandbox/__init__.py`` can register its factory at import time
without loading the runtime (the package is imported inside guests too, under
emulation, and by pytest runs that never create a sandbox).

The registered factory and the extensions it built are the process's one
piece of wiring state, set once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime.provision import Extensions

__all__ = ["extensions", "install_extensions"]

_factory: Callable[[], Extensions] | None = None
_built: Extensions | None = None


def install_extensions(factory: Callable[[], Extensions]) -> None:
    """Register how to build the extensions; they are built on first use."""
    global _factory, _built
    _factory, _built = factory, None


def extensions() -> Extensions:
    """The installed extensions; none installed, a runtime that only cold-boots."""
    global _built
    if _built is None:
        if _factory is not None:
            _built = _factory()
        else:
            from .runtime.provision import Extensions

            _built = Extensions()
    return _built
