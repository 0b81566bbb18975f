"""Statistics for monitoring systems: a Prometheus collector and OpenTelemetry observable instruments.

Both read what `cachelayers.stats()` reads — the live cached functions, engines, batchers and rate limiters —
when the monitoring system asks, so exporting costs nothing on the hot path. Every figure becomes a metric
named ``cachelayers_<kind>_<field>``:

=============  ========================================  ==============================================
kind           source                                    labels
=============  ========================================  ==============================================
``function``   a ``@multilevel_cached`` function         ``function`` (and ``tier`` for ``hits_by_tier``)
``tier``       one tier of an engine                     ``engine``, ``tier``
``semantic``   a ``@semantic_cached`` function           ``function``
``batch``      a ``@batched`` function                   ``function``
``limiter``    a rate limiter                            ``limiter``
``audit``      records made on the ``cachelayers.audit``  ``event`` (``invalidate``, ``clear``, ``integrity``,
               logger (``cachelayers_audit_events``)      ``config``)
=============  ========================================  ==============================================

Counts that only grow (hits, misses, errors, evictions, cost saved, ...) are counters; the rest (hit rate,
latency percentiles, entries, bytes, pending items, ``breaker_open``) are gauges. Figures in seconds end in
``_seconds``. A figure not measured yet (a percentile without samples) is left out.

Prometheus (``pip install 'cachelayers[prometheus]'``)::

    from cachelayers.exporters import register_prometheus

    register_prometheus()  # the default registry: served by prometheus_client.start_http_server(...)

OpenTelemetry (``pip install 'cachelayers[opentelemetry]'``)::

    from cachelayers.exporters import instrument_opentelemetry

    instrument_opentelemetry()  # the global meter provider, or pass meter_provider=
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple

from cachelayers import audit
from cachelayers.engines.batcher import Batcher, BatchInfo
from cachelayers.engines.limiter import LimiterInfo, RateLimiter
from cachelayers.engines.semantic import SemanticCacheInfo, SemanticFunction
from cachelayers.engines.tiered import FunctionCache, TieredCache
from cachelayers.engines.tiered.events import EventStats
from cachelayers.metrics import CacheInfo, StateLog, TierStats, live_sources

__all__ = ["PrometheusCollector", "Sample", "catalogue", "instrument_opentelemetry", "register_prometheus",
           "samples"]

PREFIX: Final = "cachelayers"

# Figures that only grow while a process runs: exported as counters.
_COUNTERS: Final = frozenset({
    "hits", "misses", "errors", "unstorable", "cost_saved", "hits_by_tier",  # functions (time_saved is an estimate
    # from recent latencies: it can go down)
    "writes", "timeouts", "skipped", "corrupt", "evictions",  # tiers
    "exact_hits", "semantic_hits", "uncached", "expirations", "embed_errors", "index_errors",  # semantic
    "verifier_rejections", "verifier_errors", "compactions", "answer_checks", "answer_disagreements",
    "difference_rejections", "store_skipped",
    "calls", "deduplicated", "dropped", "rejected", "batches", "items", "failed_batches",  # batching
    "admitted", "immediate", "waited", "cancelled", "storage_calls", "pause_reads", "refusals", "refunds",  # limits
    "rate_limit_errors", "retries", "pauses",
    "events_received", "events_forged", "events_unsigned", "events_replayed", "events_expired",  # the channel
    "events_dropped", "clears_applied", "clears_coalesced",
    "events",  # audit records
})

# Figures in seconds: their metric names end in ``_seconds``, as Prometheus names units.
_SECONDS: Final = frozenset({"cached_p50", "cached_p95", "computed_p50", "computed_p95", "time_saved", "wait_p50",
                             "wait_p99", "batch_p50", "batch_p99"})

_TIER_FIELDS: Final = (*(f for f in TierStats.__slots__ if f != "name"), "entries", "bytes", "breaker_open",
                       *EventStats.__slots__, "events_dropped")


class Sample(NamedTuple):
    """One figure of one source, ready for a monitoring system."""

    name: str
    """Metric name, ``cachelayers_<kind>_<field>``."""
    labels: dict[str, str]
    """Which source (and tier) the figure belongs to."""
    value: float
    counter: bool
    """Whether the figure only grows (a counter) rather than goes up and down (a gauge)."""


def catalogue() -> dict[str, bool]:
    """Every metric name `samples` can produce, mapped to whether it is a counter."""
    fields = {
        "function": CacheInfo._fields,
        "tier": _TIER_FIELDS,
        "semantic": SemanticCacheInfo._fields,
        "batch": BatchInfo._fields,
        "limiter": LimiterInfo._fields,
        "audit": ("events",),
    }
    return {_metric(kind, field): field in _COUNTERS for kind, names in fields.items() for field in names}


def _metric(kind: str, field: str) -> str:
    return f"{PREFIX}_{kind}_{field}_seconds" if field in _SECONDS else f"{PREFIX}_{kind}_{field}"


def _source(source: Any) -> tuple[str, str, str] | None:
    """``(kind, label, label value)`` of a stats source, or ``None`` for one that is not exported."""
    if isinstance(source, FunctionCache):
        return "function", "function", source.identity
    if isinstance(source, TieredCache):
        return "tier", "engine", f"{id(source):x}"
    if isinstance(source, SemanticFunction):
        return "semantic", "function", source.identity
    if isinstance(source, Batcher):
        return "batch", "function", source.name
    if isinstance(source, RateLimiter):
        return "limiter", "limiter", f"{id(source):x}"
    return None


def _numbers(kind: str, labels: dict[str, str], fields: dict[str, Any]) -> Iterator[Sample]:
    for field, value in fields.items():
        if isinstance(value, dict):  # hits_by_tier: one sample per tier
            for tier, count in value.items():
                yield Sample(_metric(kind, field), {**labels, "tier": str(tier)}, float(count), field in _COUNTERS)
        elif field == "breaker":  # a circuit breaker's state: open (or half-open) is what to alert on
            yield Sample(_metric(kind, "breaker_open"), labels, 0.0 if value == "closed" else 1.0, False)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield Sample(_metric(kind, field), labels, float(value), field in _COUNTERS)


def samples(sources: Iterable[Any] | None = None) -> list[Sample]:
    """The figures of every live stats source (or of ``sources``) as flat samples.

    Sources that share a name (functions made by one factory, two batchers named alike) are told apart by
    ``@<id>`` after the name, so no two series carry the same labels. A source whose figures cannot be read is
    left out (and logged once), not allowed to fail the whole scrape.
    """
    described = [(source, _source(source)) for source in (live_sources() if sources is None else sources)]
    names = Counter((d[0], d[2]) for _, d in described if d is not None)
    out: list[Sample] = []
    for source, description in described:
        if description is None:
            continue
        kind, label, value = description
        if names[kind, value] > 1:
            value = f"{value}@{id(source):x}"
        try:
            snapshot = source.stats_snapshot()
        except Exception as exc:
            _log.failure(f"reading the statistics of {value}", exc)
            continue
        for figures in snapshot.values():
            if kind == "tier":
                for tier, fields in figures.items():
                    out.extend(_numbers(kind, {label: value, "tier": tier}, fields))
            else:
                out.extend(_numbers(kind, {label: value}, figures))
    if sources is None:
        out.extend(Sample(_metric("audit", "events"), {"event": event}, float(count), True)
                   for event, count in sorted(audit.counts().items()))
    return out


_log = StateLog()


_HELP: Final = {"function": "a @multilevel_cached function", "tier": "a tier of a cache engine",
                "semantic": "a @semantic_cached function", "batch": "a @batched function",
                "limiter": "a rate limiter", "audit": "cachelayers.audit records, by event"}


def _help(name: str) -> str:
    kind, field = name[len(PREFIX) + 1:].split("_", 1)
    unit = " (seconds)" if field.endswith("_seconds") else ""
    return f"cachelayers: {field.removesuffix('_seconds').replace('_', ' ')}{unit} of {_HELP[kind]}"


class PrometheusCollector:
    """A ``prometheus_client`` collector of `samples`: register it once, every scrape reads the figures then.

    Args:
        sources: The stats sources to export; every live one (as `cachelayers.stats` sees them) when omitted.
    """

    def __init__(self, sources: Callable[[], Iterable[Any]] | None = None) -> None:
        self._sources = sources

    def describe(self) -> list[Any]:
        """Nothing up front: the metrics depend on the functions alive at each scrape."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield one metric family per metric name (called by ``prometheus_client`` on each scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for sample in samples(self._sources() if self._sources is not None else None):
            family = families.get(sample.name)
            if family is None:
                make = CounterMetricFamily if sample.counter else GaugeMetricFamily
                family = families[sample.name] = make(sample.name, _help(sample.name), labels=sorted(sample.labels))
            family.add_metric([sample.labels[k] for k in sorted(sample.labels)], sample.value)
        yield from families.values()


def register_prometheus(registry: Any = None) -> PrometheusCollector:
    """Register a `PrometheusCollector` with ``registry`` (``prometheus_client.REGISTRY`` when omitted).

    Raises:
        MissingDependencyError: ``prometheus_client`` is not installed.
    """
    _require("prometheus_client", "prometheus-client", "prometheus")
    from prometheus_client import REGISTRY

    collector = PrometheusCollector()
    (registry if registry is not None else REGISTRY).register(collector)
    return collector


def instrument_opentelemetry(meter_provider: Any = None, *, max_age: float = 1.0,
                             sources: Callable[[], Iterable[Any]] | None = None) -> list[Any]:
    """Create an OpenTelemetry observable counter or gauge for every metric of `catalogue`.

    Their callbacks read the figures when the meter provider collects. One collection asks every
    instrument in turn, so the figures are read once and reused for ``max_age`` seconds.

    Args:
        meter_provider: The provider to create the instruments with; the global one when omitted.
        max_age: Seconds the figures read for one instrument are reused for the others.
        sources: The stats sources to export; every live one (as `cachelayers.stats` sees them) when omitted.

    Returns:
        The instruments (keep them if you want to inspect them; the provider holds them anyway).

    Raises:
        MissingDependencyError: ``opentelemetry-api`` is not installed.
    """
    _require("opentelemetry.metrics", "opentelemetry-api", "opentelemetry")
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation

    from cachelayers import __version__

    meter = (meter_provider or metrics.get_meter_provider()).get_meter("cachelayers", __version__)
    lock = threading.Lock()
    cached: list[Any] = [float("-inf"), {}]  # when read, samples by metric name

    def read() -> dict[str, list[Sample]]:
        with lock:
            now = time.monotonic()
            if now - cached[0] > max_age:
                by_name: dict[str, list[Sample]] = {}
                for sample in samples(sources() if sources is not None else None):
                    by_name.setdefault(sample.name, []).append(sample)
                cached[:] = [now, by_name]
            return cached[1]  # type: ignore[no-any-return]

    def callback(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(s.value, s.labels) for s in read().get(name, ())]

        return observe

    instruments = []
    for name, counter in catalogue().items():
        make = meter.create_observable_counter if counter else meter.create_observable_gauge
        instruments.append(make(name, callbacks=[callback(name)], description=_help(name)))
    return instruments


def _require(module: str, package: str, extra: str) -> None:
    """Import ``module`` (of ``package``) or raise an error naming the extra that installs it."""
    import importlib

    from cachelayers.errors import MissingDependencyError

    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError("exporter", module, package, extra) from None
