"""The pool's bookkeeping when its runtime refuses work (snapshots/_engine.py): no VM."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from pytest_microsandbox.snapshots._demand import PoolDemand
from pytest_microsandbox.snapshots._engine import _Pool


class _ClosedRuntime:
    def spawn(self, fn: Any, *args: Any) -> None:
        raise RuntimeError("the runtime is closed")


def test_a_refused_prestart_is_not_counted_so_closing_does_not_hang() -> None:
    pool = _Pool(_ClosedRuntime(), None, None, None, PoolDemand(1, 4, 5.0))  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(RuntimeError, match="closed"):
            pool.refill()
        assert pool.depth == 0
        with anyio.fail_after(5):  # a leaked count waited forever here
            await pool.aclose()

    anyio.run(main)
