"""The pool's depth rule (snapshots/_demand.py): pure logic, no VM, no sleeping."""

from __future__ import annotations

import pytest

from pytest_microsandbox.snapshots._demand import CreateForecast, PoolDemand, pool_cap


def test_spaced_out_creates_keep_the_base_depth() -> None:
    demand = PoolDemand(base=1, cap=8, idle_s=5.0)
    assert demand.target(0.0) == 1
    for t in (0.0, 6.0, 12.0, 18.0):  # each gap longer than the idle window
        demand.note_take(t)
        assert demand.target(t) == 1


def test_back_to_back_creates_deepen_the_pool_by_littles_law() -> None:
    demand = PoolDemand(base=1, cap=16, idle_s=5.0)
    demand.note_prestart(0.3)
    demand.note_prestart(0.3)
    t = 0.0
    for _ in range(6):
        demand.note_take(t)
        t += 0.05
    # ~0.3 s to make a clone, one taken every 0.05 s: 6 in use while one is made, +1.
    assert demand.target(t) == 7


def test_the_depth_never_passes_the_cap() -> None:
    demand = PoolDemand(base=1, cap=3, idle_s=5.0)
    for i in range(10):
        demand.note_take(i * 0.001)
    assert demand.target(0.01) == 3


def test_the_pool_shrinks_back_once_creates_stop() -> None:
    demand = PoolDemand(base=2, cap=8, idle_s=5.0)
    for i in range(5):
        demand.note_take(i * 0.02)
    assert demand.target(0.1) > 2
    assert not demand.idle(0.1)
    assert demand.idle(5.1)
    assert demand.target(5.1) == 2


def test_a_new_burst_does_not_inherit_the_old_rate() -> None:
    demand = PoolDemand(base=1, cap=8, idle_s=5.0)
    for i in range(5):
        demand.note_take(i * 0.01)
    demand.note_take(100.0)  # first take after a long pause
    assert demand.target(100.0) == 1


def test_slower_prestarts_ask_for_a_deeper_pool() -> None:
    fast, slow = PoolDemand(1, 16, 5.0), PoolDemand(1, 16, 5.0)
    for _ in range(4):
        fast.note_prestart(0.1)
        slow.note_prestart(0.6)
    for i in range(4):
        fast.note_take(i * 0.1)
        slow.note_take(i * 0.1)
    assert fast.target(0.3) < slow.target(0.3)


@pytest.mark.parametrize(("base", "cap", "idle_s"), [(-1, 4, 1.0), (3, 2, 1.0), (1, 4, 0.0)])
def test_bad_bounds_are_refused(base: int, cap: int, idle_s: float) -> None:
    with pytest.raises(ValueError, match="base <= cap"):
        PoolDemand(base, cap, idle_s)


def test_a_forecast_fills_the_pool_from_the_first_take() -> None:
    forecast = CreateForecast()
    forecast.expect(20)
    demand = PoolDemand(base=1, cap=8, idle_s=5.0, forecast=forecast)
    demand.note_take(0.0)
    assert forecast.left == 19
    assert demand.target(0.0) == 8  # the cap, not the 19 still expected


def test_a_forecast_shrinks_with_the_creates_left() -> None:
    forecast = CreateForecast()
    forecast.expect(3)
    demand = PoolDemand(base=1, cap=8, idle_s=5.0, forecast=forecast)
    demand.note_take(0.0)
    assert demand.target(0.0) == 2
    demand.note_take(0.01)
    demand.note_take(0.02)
    assert forecast.left == 0
    assert demand.target(5.1) == 1  # idle: the base depth


def test_a_forecast_is_ignored_when_creates_are_slower_than_prestarts() -> None:
    forecast = CreateForecast()
    forecast.expect(50)
    demand = PoolDemand(base=1, cap=8, idle_s=5.0, forecast=forecast)
    demand.note_take(0.0)
    demand.note_take(2.0)  # a test of 2 s: one clone made meanwhile is enough
    assert demand.target(2.0) == 2  # Little's law on the rate only
    assert demand.idle(7.5)
    assert demand.target(7.5) == 1


def test_a_negative_forecast_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        CreateForecast().expect(-1)


def test_a_prefill_fills_to_the_forecast_before_any_take() -> None:
    forecast = CreateForecast()
    forecast.expect(5)
    demand = PoolDemand(base=1, cap=8, idle_s=5.0, forecast=forecast)
    assert demand.target(0.0) == 1
    demand.note_prefill(0.0)
    assert demand.target(0.0) == 5
    assert forecast.left == 5  # announced, none taken yet
    demand.note_take(3.0)  # the first create, 3 s later: no rate from that gap
    assert forecast.left == 4
    assert demand.target(3.0) == 4


def test_a_prefill_nobody_uses_shrinks_back() -> None:
    forecast = CreateForecast()
    forecast.expect(5)
    demand = PoolDemand(base=1, cap=8, idle_s=5.0, forecast=forecast)
    demand.note_prefill(0.0)
    assert demand.target(5.0) == 1


def test_the_cap_is_the_count_asked_for_when_memory_allows() -> None:
    assert pool_cap(1, most=24, budget_mib=1024, clone_mib=30, available_mib=64_000) == 24


def test_the_memory_budget_bounds_the_cap() -> None:
    # 100 MiB at 30 MiB a clone: 3 clones, not the 24 asked for.
    assert pool_cap(1, most=24, budget_mib=100, clone_mib=30, available_mib=64_000) == 3


def test_an_eighth_of_the_available_memory_bounds_the_cap() -> None:
    # 2400 MiB available: 300 MiB for waiting clones, 10 of 30 MiB.
    assert pool_cap(1, most=24, budget_mib=1024, clone_mib=30, available_mib=2400) == 10


def test_the_available_share_is_split_across_xdist_workers() -> None:
    # 300 MiB split across 4 workers: 75 MiB each, 2 clones per worker's pool.
    assert pool_cap(1, 24, 1024, 30, available_mib=2400, workers=4) == 2


def test_an_unknown_available_memory_leaves_the_budget_alone() -> None:
    assert pool_cap(1, 24, 1024, 30, available_mib=None, workers=8) == 24


@pytest.mark.parametrize("available", [0.0, -5.0, 10.0])
def test_the_cap_never_falls_below_the_base_depth(available: float) -> None:
    assert pool_cap(2, 24, 1024, 30, available_mib=available) == 2
    assert pool_cap(2, 24, budget_mib=0, clone_mib=30) == 2
    assert pool_cap(2, most=0, budget_mib=1024, clone_mib=30) == 2


@pytest.mark.parametrize(
    ("base", "most", "budget", "clone"), [(1, 24, 1024, 0), (-1, 24, 1024, 30), (1, -1, 1024, 30)]
)
def test_bad_cap_inputs_are_refused(base: int, most: int, budget: float, clone: float) -> None:
    with pytest.raises(ValueError, match="clone_mib > 0"):
        pool_cap(base, most, budget, clone)
