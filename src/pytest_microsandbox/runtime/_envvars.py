"""Non-negative numbers (sizes, counts) read from environment variables."""

from __future__ import annotations

import math
import os

from ._exceptions import SandboxError

__all__ = ["env_number"]


def env_number(
    name: str,
    default: float,
    error: type[SandboxError],
    *,
    what: str = "a number >= 0",
    below: float = math.inf,
) -> float:
    """``$name`` as a float, or ``default`` when it is unset or empty.

    :raises SandboxError: (``error``) the value is not a finite number in
        ``[0, below)``; the message names the variable and says it is not ``what``.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    # nan and inf would escape later as ValueError/OverflowError from int();
    # a negative size or budget would make no sense (or empty a store).
    if not (math.isfinite(value) and 0 <= value < below):
        raise error(f"${name}={raw!r} is not {what}")
    return value
