"""How deep a pool of pre-started clones should be (pure logic, no VM).

A pre-start (QEMU start, state load, one warm-up command) takes a few hundred
milliseconds of CPU under TCG; back-to-back creates (the ``sandbox`` fixture
over a run of fast tests) come every few tens. One waiting clone is used up at
once and the next create pays a whole restore. By Little's law a pool must
hold about (time to make a clone) / (time between takes) clones to keep up,
so the depth follows that ratio, within a cap that bounds the memory idle
clones cost, and falls back to the base depth once creates stop.

The rate is only known after two takes, and a pool that starts deepening then
is already behind. A caller that knows a run of creates is coming (the
plugin, from the tests it collected that use the ``sandbox`` fixture) says so
through a :class:`CreateForecast`: while creates come at least as fast as
clones are made, the pool is filled to the creates still expected (within the
cap) instead of waiting for the rate to show.
"""

from __future__ import annotations

import math
import threading

__all__ = ["AVAILABLE_SHARE", "CreateForecast", "PoolDemand", "pool_cap"]

#: Weight of the newest sample in the moving averages (fast to follow a burst).
_ALPHA = 0.5
#: First guess of a pre-start's duration, before one is measured (TCG, loaded host).
_FIRST_PRESTART_S = 0.3
#: The fraction of the host's available memory the pools of one run may fill
#: with waiting clones, whatever the budget says: a deep pool is a convenience,
#: and a run that starts other memory-hungry work (its own sandboxes, builds)
#: must not find the host already full of clones it never took.
AVAILABLE_SHARE = 1 / 8


def pool_cap(
    base: int,
    most: int,
    budget_mib: float,
    clone_mib: float,
    available_mib: float | None = None,
    workers: int = 1,
) -> int:
    """The deepest one pool may grow: at most ``most`` clones, within
    ``budget_mib`` at ``clone_mib`` per clone, and within
    :data:`AVAILABLE_SHARE` of ``available_mib`` (the host's MemAvailable;
    None when unknown) split across the ``workers`` processes of the run (xdist
    workers each keep a pool of their own). Never below ``base``: the depth kept
    while creates are spaced out is asked for explicitly.

    :raises ValueError: ``clone_mib`` is not > 0, or a count is negative.
    """
    if clone_mib <= 0 or base < 0 or most < 0 or budget_mib < 0:
        raise ValueError(
            f"need clone_mib > 0 and counts >= 0, got base {base}, most {most}, "
            f"budget {budget_mib} MiB, {clone_mib} MiB per clone"
        )
    cap = min(most, math.floor(budget_mib / clone_mib))
    if available_mib is not None:
        share = max(0.0, available_mib) * AVAILABLE_SHARE / max(1, workers)
        cap = min(cap, math.floor(share / clone_mib))
    return max(base, cap)


class CreateForecast:
    """How many creates are still expected soon: a hint, shared by the pools of
    one process and fed from any thread (the plugin calls it from the test's
    thread, the pools count takes in the event loop's).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = 0

    def expect(self, count: int) -> None:
        """``count`` creates are coming (replaces the previous forecast; 0 clears it)."""
        if count < 0:
            raise ValueError(f"an expected number of creates is >= 0, got {count}")
        with self._lock:
            self._left = count

    def took(self) -> None:
        """One expected create happened."""
        with self._lock:
            self._left = max(0, self._left - 1)

    @property
    def left(self) -> int:
        with self._lock:
            return self._left


class PoolDemand:
    """Tracks the takes and pre-starts of one pool and says how deep it should be.

    ``base`` is the depth kept while nothing happens, ``cap`` the most clones
    (waiting plus being started) it may ever ask for, and ``idle_s`` how long
    after the last take the pool shrinks back to ``base``. Times are seconds
    on one monotonic clock, passed in (so tests need no sleeping). A
    ``forecast`` of the creates to come fills the pool ahead of the rate.
    """

    def __init__(
        self, base: int, cap: int, idle_s: float, forecast: CreateForecast | None = None
    ) -> None:
        if base < 0 or cap < base or idle_s <= 0:
            raise ValueError(f"need 0 <= base <= cap and idle_s > 0, got {base}, {cap}, {idle_s}")
        self.base = base
        self.cap = cap
        self.idle_s = idle_s
        self._last_take: float | None = None
        self._gap: float | None = None
        #: The gap before the latest take (None for the first), unsmoothed.
        self._last_gap: float | None = None
        self._prestart = _FIRST_PRESTART_S
        self._forecast = forecast
        #: Filled ahead by :meth:`note_prefill`, no take since.
        self._primed = False

    def note_prefill(self, now: float) -> None:
        """Creates are announced (the forecast) before the first: fill now, as
        for a first take, and count the next take as a first one too (its gap
        is the time the announcement gave, not a rate).
        """
        self._last_take = now
        self._last_gap = self._gap = None
        self._primed = True

    def note_take(self, now: float) -> None:
        """A create took (or asked for) a clone at ``now``."""
        if self._forecast is not None:
            self._forecast.took()
        self._last_gap = None
        if self._primed:
            self._primed = False
            self._last_take = now
            return
        if self._last_take is not None:
            gap = max(now - self._last_take, 1e-3)
            self._last_gap = gap
            if gap >= self.idle_s:
                self._gap = None  # a new burst: the old rate says nothing about it
            else:
                self._gap = gap if self._gap is None else _ALPHA * gap + (1 - _ALPHA) * self._gap
        self._last_take = now

    def note_prestart(self, seconds: float) -> None:
        """One pre-start took ``seconds`` from QEMU start to a warmed clone."""
        if seconds > 0:
            self._prestart = _ALPHA * seconds + (1 - _ALPHA) * self._prestart

    def idle(self, now: float) -> bool:
        """No take for ``idle_s``: surplus clones only cost memory."""
        return self._last_take is None or now - self._last_take >= self.idle_s

    def target(self, now: float) -> int:
        """Clones the pool should hold (waiting and being started) at ``now``."""
        if self.idle(now):
            return self.base
        want = self.base
        if self._gap is not None:
            # One more than the clones used up while one is being made.
            want = math.ceil(self._prestart / self._gap) + 1
        left = self._forecast.left if self._forecast is not None else 0
        # The forecast counts while creates outpace pre-starts (or on the first
        # take): tests that each run longer than a pre-start need no deep pool.
        if left and (self._last_gap is None or self._last_gap < self._prestart):
            want = max(want, left)
        return max(self.base, min(self.cap, want))
