"""Counters and latency samples per function and per tier, and the global `stats()` view.

Counters are plain integer attributes bumped on the hot path (no locks: one event loop thread mutates them,
and a lost increment under free threading would only blur a statistic). Latencies are kept in fixed-size
rings and summarised on demand.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from cachelayers.errors import redact_urls

T = TypeVar("T")

__all__ = ["CacheInfo", "FunctionStats", "LatencyRing", "StateLog", "TierStats", "live_sources",
           "register_stats_source", "stable_list", "stats"]

logger = logging.getLogger("cachelayers")


class LatencyRing:
    """The last ``size`` latency samples, in seconds."""

    __slots__ = ("_samples", "add")

    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.add: Callable[[float], None] = self._samples.append
        """Record one sample (in seconds). The deque's own ``append``: every miss calls it."""

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float) -> float | None:
        """Return the ``q``-th percentile (0-100, nearest rank) or ``None`` without samples."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank]

    def mean(self) -> float | None:
        """Return the mean of the samples or ``None`` without samples."""
        return sum(self._samples) / len(self._samples) if self._samples else None


class TierStats:
    """Counters of one tier, shared by every function that uses it."""

    __slots__ = ("corrupt", "errors", "evictions", "hits", "misses", "name", "skipped", "timeouts", "writes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.errors = 0
        self.timeouts = 0
        self.skipped = 0  # calls not made: breaker open, tier congested (writes), or it failed during the call
        self.corrupt = 0
        self.evictions = 0

    def snapshot(self) -> dict[str, int]:
        """Return the counters as a dict."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "name"}


class CacheInfo(NamedTuple):
    """What `cache_info()` tells about one cached function.

    Latencies are in seconds, ``None`` until measured. ``cost_saved`` is in the unit of the declared cost.

    Attributes:
        hits: Calls answered without running the function (from a tier or by joining an in-flight call).
        misses: Calls that ran the function.
        hit_rate: ``hits / (hits + misses)``, 0.0 before the first call.
        hits_by_tier: Hits per tier name; ``"in-flight"`` counts callers that joined a running computation.
        errors: Failures of the function's own cache machinery, such as a failing ``tags=`` function.
        unstorable: Results returned but not cached because the codec could not encode them.
        cached_p50: Median latency of hits served by a tier below memory (memory hits are not timed).
        cached_p95: 95th percentile of the same.
        computed_p50: Median latency of calls that ran the function.
        computed_p95: 95th percentile of the same.
        time_saved: Estimated seconds saved: hits times (mean computed - mean cached latency).
        cost_saved: Sum of the declared ``cost=`` over hits served from a tier.
    """

    hits: int
    misses: int
    hit_rate: float
    hits_by_tier: Mapping[str, int]
    errors: int
    unstorable: int
    cached_p50: float | None
    cached_p95: float | None
    computed_p50: float | None
    computed_p95: float | None
    time_saved: float
    cost_saved: float


def _no_hits() -> int:
    return 0


class FunctionStats:
    """Counters of one cached function."""

    __slots__ = ("_counted_hits", "_more_hits", "cached_latency", "computed_latency", "cost_saved", "errors",
                 "hits_by_tier", "misses", "sample_tick", "unstorable")

    def __init__(self) -> None:
        self._counted_hits = 0
        self._more_hits: Callable[[], int] = _no_hits
        self.misses = 0
        self.errors = 0
        self.unstorable = 0
        self.cost_saved = 0.0
        self.hits_by_tier: dict[str, int] = {}
        self.cached_latency = LatencyRing()
        self.computed_latency = LatencyRing()
        self.sample_tick = 0

    @property
    def hits(self) -> int:
        """Calls answered from the cache (including those a compiled hit path counts on its own)."""
        return self._counted_hits + self._more_hits()

    @hits.setter
    def hits(self, value: int) -> None:
        self._counted_hits = value - self._more_hits()

    def count_hits_with(self, counter: Callable[[], int]) -> None:
        """Also count the hits ``counter()`` reports (a hit path that keeps its count in a closure cell)."""
        self._counted_hits += self._more_hits()
        self._more_hits = counter

    @property
    def memory_hits(self) -> int:
        """Hits served by the memory tier: those not attributed to another source in ``hits_by_tier``."""
        return self.hits - sum(self.hits_by_tier.values())

    def info(self) -> CacheInfo:
        """Return a snapshot."""
        total = self.hits + self.misses
        mean_computed = self.computed_latency.mean()
        mean_cached = self.cached_latency.mean() or 0.0
        saved = max(0.0, (mean_computed - mean_cached) * self.hits) if mean_computed is not None else 0.0
        return CacheInfo(
            hits=self.hits,
            misses=self.misses,
            hit_rate=self.hits / total if total else 0.0,
            hits_by_tier=dict(self.hits_by_tier),
            errors=self.errors,
            unstorable=self.unstorable,
            cached_p50=self.cached_latency.percentile(50),
            cached_p95=self.cached_latency.percentile(95),
            computed_p50=self.computed_latency.percentile(50),
            computed_p95=self.computed_latency.percentile(95),
            time_saved=saved,
            cost_saved=self.cost_saved,
        )


class StateLog:
    """Logs a condition once when it starts and once when it ends, not on every occurrence."""

    __slots__ = ("_failing",)

    def __init__(self) -> None:
        self._failing: set[str] = set()

    def failure(self, what: str, exc: BaseException | str) -> None:
        """Note that ``what`` failed; logs a warning only if it was not failing already."""
        if what not in self._failing:
            self._failing.add(what)
            logger.warning("cachelayers: %s failing: %s", what, redact_urls(str(exc)))

    def recovered(self, what: str) -> None:
        """Note that ``what`` works; logs only if it was failing."""
        if what in self._failing:
            self._failing.discard(what)
            logger.warning("cachelayers: %s recovered", what)


class _StatsSource(Protocol):
    def stats_snapshot(self) -> dict[str, Any]: ...


_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def register_stats_source(source: _StatsSource) -> None:
    """Include ``source`` (a cached function or an engine) in `stats()` while it is alive."""
    _sources.add(source)


_STABLE_LIST_TRIES: Final = 100


def stable_list(items: Callable[[], Iterable[T]]) -> list[T]:
    """A list of what ``items()`` yields, where ``items`` reads a weak collection that another thread may change
    meanwhile (a scrape runs on the exporter's thread while functions are decorated on others). Listing one
    raises when its size changes: ``items`` is called again (a generator cannot be restarted), a bounded
    number of times."""
    for _ in range(_STABLE_LIST_TRIES - 1):
        try:
            return list(items())
        except RuntimeError:  # "changed size during iteration"
            continue
    return list(items())


def live_sources() -> list[Any]:
    """The stats sources alive now: cached functions, engines, batchers, rate limiters."""
    return stable_list(lambda: _sources)


def stats(sources: Iterable[_StatsSource] | None = None) -> dict[str, Any]:
    """Return the statistics of every live cached function and engine, keyed by their names."""
    merged: dict[str, Any] = {}
    for source in live_sources() if sources is None else sources:
        merged.update(source.stats_snapshot())
    return dict(sorted(merged.items()))
