"""Exporters: the figures of `stats()` as Prometheus metrics and OpenTelemetry observations, read when asked."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachelayers import (
    MemoryBackend,
    MissingDependencyError,
    RateLimiter,
    Settings,
    TieredCache,
    batched,
    multilevel_cached,
)
from cachelayers.exporters import PrometheusCollector, catalogue, instrument_opentelemetry, register_prometheus, samples
from cachelayers.metrics import live_sources
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


async def sources(clock: FakeClock) -> list[Any]:
    """One live source of each kind but semantic (see below), with known figures: 2 hits and 2 misses of a
    function with a cost of 0.25 on a memory and a lower tier, one batch of two items, one admission."""
    cache = TieredCache(Settings(), backends={"memory": MemoryBackend(clock=clock),
                                              "lower": MemoryBackend(clock=clock)}, clock=clock)

    @multilevel_cached(cache=cache, cost=0.25, name="exported.square")
    async def square(x: int) -> int:
        return x * x

    for x in (1, 1, 2, 2):
        await square(x)

    @batched(max_size=2, max_wait=0, name="exported.lengths")
    async def lengths(texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    await lengths.many(["a", "bb"])
    limiter = RateLimiter(Settings(limits={"rpm": "10/second"}))
    await limiter.acquire("rpm")
    return [square.cache, cache, lengths.batcher, limiter]


def by_name(found: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in found}


async def test_samples_name_every_figure_of_every_kind_from_the_catalogue(clock: FakeClock) -> None:
    made = await sources(clock)
    found = samples(made)
    names = catalogue()
    assert {s.name for s in found} <= names.keys()
    assert all(s.counter == names[s.name] for s in found)
    values = by_name(found)
    fn = (("function", "exported.square"),)
    assert values[("cachelayers_function_hits", fn)] == 2
    assert values[("cachelayers_function_misses", fn)] == 2
    assert values[("cachelayers_function_hit_rate", fn)] == 0.5
    assert values[("cachelayers_function_cost_saved", fn)] == 0.5
    assert values[("cachelayers_function_hits_by_tier", (*fn, ("tier", "memory")))] == 2
    engine = f"{id(made[1]):x}"
    assert values[("cachelayers_tier_entries", (("engine", engine), ("tier", "memory")))] == 2
    assert values[("cachelayers_tier_writes", (("engine", engine), ("tier", "memory")))] == 2
    assert values[("cachelayers_tier_misses", (("engine", engine), ("tier", "lower")))] == 2
    assert values[("cachelayers_tier_breaker_open", (("engine", engine), ("tier", "lower")))] == 0
    assert values[("cachelayers_batch_items", (("function", "exported.lengths"),))] == 2
    assert values[("cachelayers_batch_batches", (("function", "exported.lengths"),))] == 1
    assert values[("cachelayers_limiter_admitted", (("limiter", f"{id(made[3]):x}"),))] == 1
    # Percentiles are in seconds and named so; one not measured yet (no hit below memory yet) is left out.
    assert ("cachelayers_function_computed_p50_seconds", fn) in values
    assert not any(name == "cachelayers_function_cached_p50_seconds" for name, _ in values)
    assert names["cachelayers_function_hits"]
    assert not names["cachelayers_function_hit_rate"]
    assert not names["cachelayers_function_time_saved_seconds"]  # an estimate from recent latencies: it can fall
    await made[3].aclose()


async def test_semantic_functions_are_exported() -> None:
    from cachelayers import semantic_cached
    from tests.semantic_helpers import AngleEmbedder

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, name="exported.ask")
    async def ask(question: str) -> str:
        return question

    await ask("t@0")
    await ask("t@10")
    values = by_name(samples([ask.cache]))
    fn = (("function", "exported.ask"),)
    assert values[("cachelayers_semantic_semantic_hits", fn)] == 1
    assert values[("cachelayers_semantic_misses", fn)] == 1
    assert values[("cachelayers_semantic_entries", fn)] == 1


async def test_prometheus_scrape_reads_the_figures_at_scrape_time(clock: FakeClock) -> None:
    made = await sources(clock)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(lambda: made))
    square = made[0].wrapper

    def scrape() -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}

    families = scrape()
    hits = families["cachelayers_function_hits"]
    assert hits.type == "counter"
    assert [(s.name, s.labels, s.value) for s in hits.samples] == [
        ("cachelayers_function_hits_total", {"function": "exported.square"}, 2.0)]
    assert families["cachelayers_function_hit_rate"].type == "gauge"
    assert families["cachelayers_tier_breaker_open"].type == "gauge"
    await square(1)  # one more hit: the next scrape sees it, nothing was pushed
    assert scrape()["cachelayers_function_hits"].samples[0].value == 3.0
    await made[3].aclose()


async def test_register_prometheus_uses_the_live_sources(clock: FakeClock) -> None:
    gc.collect()  # the function of this test's other parametrisation, whose name this one shares

    @multilevel_cached(cache=TieredCache(Settings(), clock=clock), name="exported.live")
    async def live(x: int) -> int:
        return x

    await live(1)
    await live(1)
    registry = CollectorRegistry()
    register_prometheus(registry)
    text = generate_latest(registry).decode()
    assert 'cachelayers_function_hits_total{function="exported.live"} 1.0' in text
    assert live.cache in live_sources()


async def test_opentelemetry_observes_counters_and_gauges(clock: FakeClock) -> None:
    made = await sources(clock)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = instrument_opentelemetry(provider, max_age=0, sources=lambda: made)
    assert len(instruments) == len(catalogue())

    def points() -> dict[str, list[Any]]:
        data = reader.get_metrics_data()
        assert data is not None
        return {m.name: list(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics}

    first = points()
    [hits] = first["cachelayers_function_hits"]
    assert dict(hits.attributes) == {"function": "exported.square"}
    assert hits.value == 2
    [rate] = first["cachelayers_function_hit_rate"]
    assert rate.value == 0.5
    await made[0].wrapper(2)
    [hits] = points()["cachelayers_function_hits"]
    assert hits.value == 3
    provider.shutdown()
    await made[3].aclose()


@pytest.mark.parametrize(("module", "extra", "setup"), [
    ("prometheus_client", "prometheus", lambda: register_prometheus(CollectorRegistry())),
    ("opentelemetry.metrics", "opentelemetry", lambda: instrument_opentelemetry(MeterProvider())),
])
def test_a_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, extra: str,
                                                  setup: Any) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingDependencyError, match=rf"cachelayers\[{extra}\]"):
        setup()


async def test_sources_sharing_a_name_get_distinct_labels(clock: FakeClock) -> None:
    """Functions made by one factory share their name: each series still has labels of its own."""
    cache = TieredCache(Settings(), clock=clock)

    def make() -> Any:
        @multilevel_cached(cache=cache, name="exported.twin")
        async def twin(x: int) -> int:
            return x

        return twin

    first, second = make(), make()
    await first(1)
    await first(2)
    await second(3)
    misses = [s for s in samples([first.cache, second.cache]) if s.name == "cachelayers_function_misses"]
    assert sorted((s.labels["function"], s.value) for s in misses) == sorted(
        [(f"exported.twin@{id(first.cache):x}", 2.0), (f"exported.twin@{id(second.cache):x}", 1.0)])


async def test_a_source_that_fails_to_report_is_left_out(clock: FakeClock) -> None:
    made = await sources(clock)

    class Broken:
        identity = "broken"

        def stats_snapshot(self) -> dict[str, Any]:
            raise RuntimeError("cannot read")

    broken = made[0].__class__.__new__(made[0].__class__)  # a FunctionCache whose snapshot fails
    broken.stats_snapshot = Broken().stats_snapshot
    broken.identity = "broken"
    found = samples([broken, made[0]])
    assert {s.labels.get("function") for s in found} == {"exported.square"}
    await made[3].aclose()
