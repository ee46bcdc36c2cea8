"""The pytest plugin the benchmarks that run pytest put in their generated
projects (as ``msb_bench_timing.py``, loaded with ``-p msb_bench_timing``): it
appends the host wall time of each test, between consecutive
``pytest_runtest_logfinish`` calls (the first from its ``logstart``), to the
file ``$MSB_BENCH_OUT`` names. Not in the guest, and not without that variable.
"""

from __future__ import annotations

__all__ = ["TIMING_PLUGIN"]

TIMING_PLUGIN = """
import os, time

_last = [None]


def pytest_runtest_logstart(nodeid, location):
    if _last[0] is None:
        _last[0] = time.monotonic()


def pytest_runtest_logfinish(nodeid, location):
    if os.environ.get("MICROSANDBOX_GUEST") or not os.environ.get("MSB_BENCH_OUT"):
        return
    now = time.monotonic()
    with open(os.environ["MSB_BENCH_OUT"], "a") as f:
        f.write(f"{now - _last[0]}\\n")
    _last[0] = now
"""
