"""Hooks pytest-microsandbox adds to pytest.

Implement them in a ``conftest.py`` or a plugin, like any pytest hook::

    def pytest_microsandbox_zygote_key(config):
        return hashlib.sha256(Path("data/fixtures.json").read_bytes()).hexdigest()

The plugin registers them from ``pytest_addhooks``; pytest rejects a misspelt
``pytest_microsandbox_*`` implementation as an unknown hook.
"""

from __future__ import annotations

import json

import pytest

__all__ = ["pytest_microsandbox_zygote_key", "zygote_extra_key"]


@pytest.hookspec(firstresult=False)
def pytest_microsandbox_zygote_key(config: pytest.Config) -> str | None:
    """Return extra material for the key of the zygote of ``@pytest.mark.sandbox`` tests.

    A zygote is a snapshot of a VM whose Python has already imported pytest,
    the conftests and the test modules. It is rebuilt when its key changes, and
    the key covers the project image, the test files, their conftests, the ini
    file, the guest's pytest arguments and environment; not what a test module
    reads at import time from elsewhere (a data file, a generated schema, the
    output of a command). Return something that changes when such an input
    changes, typically a digest of the files, and the next run builds a new
    zygote instead of running the tests against state captured from the old
    input.

    Every implementation is called (``firstresult=False``); the strings they
    return are all part of the key, ``None`` adds nothing. Called on the host
    once per sandbox configuration in each pytest process: under xdist every
    worker must return the same string, or workers build separate zygotes.

    :param config: the pytest config object.
    :return: a string to add to the zygote key, or ``None``.
    """
    return None


def zygote_extra_key(config: pytest.Config) -> str:
    """The results of :func:`pytest_microsandbox_zygote_key` as one string
    (``""`` when no implementation returns anything, leaving the key as it was).

    :raises pytest.UsageError: an implementation returned something that is not a
        string or ``None``.
    """
    results = config.hook.pytest_microsandbox_zygote_key(config=config)
    for result in results:
        if not isinstance(result, str):
            raise pytest.UsageError(
                "pytest_microsandbox_zygote_key must return a str or None, "
                f"got {type(result).__name__}: {result!r}"
            )
    return json.dumps(results) if results else ""
