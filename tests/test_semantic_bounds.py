"""@semantic_cached with a partition per tenant: one bound across partitions, and empty partitions are freed."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import numpy as np
import pytest

from cachelayers import ConfigError, explain, semantic_cached
from cachelayers.backends.vectors import VectorIndex
from cachelayers.engines.semantic import SemanticFunction
from tests.conftest import FakeClock
from tests.semantic_helpers import AngleEmbedder

pytestmark = pytest.mark.anyio


def store_of(fn: Any) -> Any:
    engine: SemanticFunction[Any, Any] = fn.cache
    assert engine._store is not None
    return engine._store


def live_indexes() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, VectorIndex))


async def test_the_total_across_partitions_is_bounded_and_the_oldest_tenants_go_first() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.99, partition=lambda tenant, **_: tenant, max_total_entries=300,
                     cache_embeddings=False)
    async def ask(question: str, tenant: str) -> str:
        return f"{question}/{tenant}"

    store = None
    for t in range(2000):
        for topic in ("a", "b", "c"):
            assert await ask(f"{topic}@0", f"t{t}") == f"{topic}@0/t{t}"
            store = store_of(ask)
            assert len(store.entries) <= 300
    assert store is not None
    assert len(store.entries) == 300
    assert len(store.partitions) == 100  # the 100 most recent tenants, 3 entries each; the rest are freed
    assert len(store.lru) == 300
    assert sum(len(p.index) for p in store.partitions.values()) == 300
    assert ask.cache_info().evictions == 6000 - 300
    with explain() as info:
        for t in range(1900, 2000):  # recent tenants still hit, each with its own answer
            for topic in ("a", "b", "c"):
                assert await ask(f"{topic}@0", f"t{t}") == f"{topic}@0/t{t}"
    assert info.levels() == {"exact": 300}
    with explain() as info:
        assert await ask("a@0", "t0") == "a@0/t0"  # the oldest tenant was evicted: computed again
    assert info.last is not None
    assert info.last.level == "computed"


async def test_a_bounded_store_never_answers_from_another_partition() -> None:
    """Threshold 0 answers with *any* entry of the partition, so a leak between partitions would show."""
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.0, partition=lambda tenant, **_: tenant, max_total_entries=50,
                     cache_embeddings=False)
    async def ask(question: str, tenant: str) -> str:
        return f"{question}/{tenant}"

    for t in range(600):
        tenant = f"t{t % 200}"
        got = await ask(f"q{t}@{t % 90}", tenant)
        assert got.endswith(f"/{tenant}"), f"answered from another partition: {got} for {tenant}"
        assert len(store_of(ask).entries) <= 50


class AxisEmbedder:
    """Every text on one axis: cheap, and keeps nothing per call."""

    ndim = 4
    default_threshold = None
    blocking = False
    name = "axis"

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.tile(np.array([1, 0, 0, 0], dtype=np.float32), (len(texts), 1))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_twenty_thousand_tenants_keep_memory_and_indexes_at_the_bound(clock: FakeClock) -> None:
    emb = AxisEmbedder()
    bound = 500

    @semantic_cached(embed=emb, threshold=0.99, partition=lambda tenant, **_: tenant, max_total_entries=bound,
                     ttl=3600, cache_embeddings=False, clock=clock)
    async def ask(question: str, tenant: str) -> str:
        return f"{question}/{tenant}"

    baseline_indexes = live_indexes()
    tracemalloc.start()  # from the first call: blocks freed later are only subtracted if traced
    try:
        for t in range(6000):
            await ask("a@0", f"t{t}")
            if t == 1999:
                gc.collect()
                at_2000 = tracemalloc.get_traced_memory()[0]
        gc.collect()
        at_6000 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # 4,000 more tenants: what Python holds stays within 25 % (the old code grows with every tenant)
    assert at_6000 < 1.25 * at_2000, f"traced memory {at_2000} -> {at_6000} bytes"
    for t in range(6000, 20_000):
        await ask("a@0", f"t{t}")
    store = store_of(ask)
    assert len(store.entries) == bound
    assert len(store.partitions) == bound
    assert live_indexes() - baseline_indexes == bound  # 19,500 usearch indexes were released
    clock.advance(3601)  # every entry expires; inserts sweep them and free their partitions
    for t in range(20):
        await ask("a@0", f"new{t}")
    assert len(store.entries) <= bound
    assert len(store.partitions) == len({e.partition for e in store.entries.values()}) <= bound
    assert live_indexes() - baseline_indexes == len(store.partitions)


class RandomEmbedder:
    """A random unit vector per text (64 dimensions: two texts are never near each other)."""

    ndim = 64
    default_threshold = None
    blocking = False
    name = "random"

    def __call__(self, texts: list[str]) -> np.ndarray:
        rng = np.random.default_rng([ord(c) for c in "".join(texts)])
        out = rng.standard_normal((len(texts), self.ndim)).astype(np.float32)
        normed: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
        return normed


async def test_a_partition_emptied_while_its_graph_is_rebuilt_is_freed() -> None:
    @semantic_cached(embed=RandomEmbedder(), threshold=0.99, cache_embeddings=False)
    async def ask(question: str) -> str:
        return question

    for i in range(200):
        await ask(f"q{i}")
    store = store_of(ask)
    assert len(store.entries) == 200
    (partition, part), = store.partitions.items()
    entries = list(store.entries.values())
    await store.remove(entries[:100])  # enough removals to start a rebuild of the graph
    assert part.compaction is not None  # started, not committed yet (only a lookup or an insert commits)
    await store.remove(entries[100:])  # the partition empties while its rebuild is pending
    assert partition not in store.partitions
    await store.wait_compactions()
    assert store.partitions == {}
    assert await ask("q0") == "q0"
    assert len(store.partitions) == 1


def test_max_total_entries_must_be_a_positive_integer() -> None:
    with pytest.raises(ConfigError, match="max_total_entries"):
        @semantic_cached(max_total_entries=0)
        async def ask(question: str) -> str:
            return question
