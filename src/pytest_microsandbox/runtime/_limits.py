"""Limits on what the host collects from a guest, and checks of caller-given numbers.

Every byte a guest sends is hostile input: a command's output or a file the
host collects in memory is capped, so a guest cannot make the host process
grow without bound.
"""

from __future__ import annotations

import math
from typing import Literal

from ._exceptions import ConfigError

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_READ_BYTES",
    "MAX_ARG_STRLEN",
    "OnOutputLimit",
    "check_limit",
    "check_timeout",
]

#: Output (stdout and stderr together) that ``Sandbox.exec`` collects by
#: default. Large enough for any log or report a test prints (a 64 MiB
#: assertion diff is already unreadable), small enough that a few parallel
#: sandboxes flooding their output cannot push a CI runner into swap.
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: Bytes ``Sandbox.fs().read`` collects by default (same reasoning); bigger
#: files go through ``fs().copy_to_host``, which streams to disk.
DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
#: Linux's limit on one argument or environment string, NUL included
#: (MAX_ARG_STRLEN = 32 pages): execve fails with E2BIG above it.
MAX_ARG_STRLEN = 32 * 4096

#: What collecting output does at the limit: ``"raise"`` kills the command and
#: raises OutputLimitError; ``"truncate"`` keeps the first bytes, sets the
#: ``*_truncated`` flags and lets the command run to its end.
OnOutputLimit = Literal["raise", "truncate"]


def check_timeout(value: float | None, name: str) -> float | None:
    """Return ``value`` if it is None or a finite number of seconds > 0.

    :raises ConfigError: naming ``name`` for NaN, infinity, zero or a negative value.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a number of seconds or None, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ConfigError(
            f"{name}: must be a finite number of seconds > 0, got {value!r} "
            "(pass None for no timeout)"
        )
    return float(value)


def check_limit(value: int, name: str) -> int:
    """Return ``value`` if it is an integer >= 0 (a byte count).

    :raises ConfigError: naming ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}: must be a whole number of bytes >= 0, got {value!r}")
    return value
