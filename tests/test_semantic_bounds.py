"""@semantic_cached with a partition per tenant: one bound across partitions, and empty partitions are freed."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc
from typing import Any, cast

import numpy as np
import pytest

from cachelayers import ConfigError, Settings, configure, explain, semantic_cached
from cachelayers.backends.vectors import VectorIndex
from cachelayers.backends.vectors.index import GRAPH_FROM
from cachelayers.engines.semantic import SemanticFunction
from cachelayers.engines.semantic.budget import budget
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

    count = GRAPH_FROM + 200  # a partition large enough to have a graph (see GRAPH_FROM)
    for i in range(count):
        await ask(f"q{i}")
    store = store_of(ask)
    assert len(store.entries) == count
    (partition, part), = store.partitions.items()
    entries = list(store.entries.values())
    await store.remove(entries[:count // 2])  # enough removals to start a rebuild of the graph
    assert part.compaction is not None  # started, not committed yet (only a lookup or an insert commits)
    await store.remove(entries[count // 2:])  # the partition empties while its rebuild is pending
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


# -- the process-wide bound: every function and partition counted together ------------------------------------


def mine(functions: list[Any]) -> int:
    return sum(len(f.cache._store) for f in functions if f.cache._store is not None)


def make_tenant_functions(count: int, emb: Any, **options: Any) -> list[Any]:
    functions = []
    for n in range(count):
        async def ask(question: str, tenant: str, n: int = n) -> str:
            return f"{question}/{tenant}/f{n}"

        functions.append(semantic_cached(embed=emb, threshold=0.99, partition=lambda tenant, **_: tenant,
                                         cache_embeddings=False, name=f"bounded-{n}", **options)(ask))
    return functions


async def test_the_process_bound_holds_across_functions_and_partitions_and_keeps_the_newest() -> None:
    gc.collect()
    before = budget.total()  # entries of earlier tests' stores still alive (evicted first: they are older)
    configure(semantic_max_entries=400)
    emb = AngleEmbedder()
    functions = make_tenant_functions(20, emb)
    calls = []
    for f_index, fn in enumerate(functions):
        for t in range(50):
            for topic in ("a", "b"):
                assert await fn(f"{topic}@0", f"t{t}") == f"{topic}@0/t{t}/f{f_index}"
                calls.append((fn, f"{topic}@0", f"t{t}"))
                assert budget.total() <= 400  # each function alone (100 entries) is far below its own bounds
    assert mine(functions) >= 400 - before
    assert sum(f.cache_info().evictions for f in functions) == 2000 - mine(functions)
    for fn in functions[:15]:  # the oldest functions were evicted entirely: their partitions are freed too
        assert fn.cache._store is not None
        assert len(fn.cache._store) == 0
        assert fn.cache._store.partitions == {}
    with explain() as info:
        for fn, question, tenant in calls[-300:]:  # the newest entries survive, each with its own answer
            await fn(question, tenant)
    assert info.levels() == {"exact": 300}
    with explain() as info:
        await functions[0]("a@0", "t0")
    assert info.last is not None
    assert info.last.level == "computed"


async def test_the_process_bound_evicts_the_least_recently_used_not_the_oldest_written() -> None:
    configure(semantic_max_entries=10)
    emb = AngleEmbedder()
    first, second = make_tenant_functions(2, emb)
    await first("a@0", "t0")  # written first, then kept in use
    for t in range(30):
        await second("a@0", f"t{t}")
        with explain() as info:
            await first("a@0", "t0")
        assert info.last is not None
        assert info.last.level == "exact", f"the entry in use was evicted after {t + 1} writes of another function"
    assert budget.total() <= 10
    assert second.cache_info().evictions >= 20


async def test_lowering_the_bound_takes_effect_on_the_next_insert() -> None:
    emb = AngleEmbedder()
    functions = make_tenant_functions(3, emb)
    for fn in functions:
        for t in range(40):
            await fn("a@0", f"t{t}")
    assert mine(functions) == 120
    configure(semantic_max_entries=25)
    await functions[0]("b@0", "new")
    assert budget.total() <= 25
    assert mine(functions) <= 25


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_by_stores(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated under the semantic store (entries, partitions, indexes), not latency rings and the like."""
    kept = snapshot.filter_traces([tracemalloc.Filter(True, pattern) for pattern in (
        "*/engines/semantic/store.py", "*/backends/vectors/*", "*/usearch/*")])
    return sum(stat.size for stat in kept.statistics("filename"))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_many_functions_times_many_tenants_stop_growing_memory(clock: FakeClock) -> None:
    """10 functions x 1,200 tenants, no TTL: without the process bound every tenant keeps an index (~50 KiB)."""
    configure(semantic_max_entries=300)
    functions = make_tenant_functions(10, AxisEmbedder(), clock=clock)
    baseline_indexes = live_indexes()

    async def round_of(start: int, stop: int) -> None:
        for t in range(start, stop):
            for fn in functions:
                await fn("a@0", f"t{t}")

    await round_of(0, 100)  # every function's store is open: what stays is what the bound allows
    tracemalloc.start()
    try:
        await round_of(100, 400)
        gc.collect()
        traced_mid = held_by_stores(tracemalloc.take_snapshot())
        rss_mid = rss_bytes()
        await round_of(400, 1200)
        gc.collect()
        traced_end = held_by_stores(tracemalloc.take_snapshot())
        rss_end = rss_bytes()
    finally:
        tracemalloc.stop()
    assert mine(functions) <= 300
    assert live_indexes() - baseline_indexes <= 300  # 14,700 partitions' indexes were released
    # 8,000 more partitions: Python's memory stays within 25 %, the process's within 64 MiB (~500 MiB unbounded)
    assert traced_end < 1.25 * traced_mid, f"traced memory {traced_mid} -> {traced_end} bytes"
    assert rss_end - rss_mid < 64 * 2**20, f"RSS {rss_mid} -> {rss_end} bytes"


def test_the_process_bound_is_validated_and_read_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="semantic_max_entries"):
        Settings(semantic_max_entries=0)
    with pytest.raises(ConfigError, match="semantic_max_entries"):
        Settings(semantic_max_entries=cast(Any, "many"))
    with pytest.raises(ConfigError, match="CACHELAYERS_SEMANTIC_MAX_ENTRIES"):
        Settings.from_env({"CACHELAYERS_SEMANTIC_MAX_ENTRIES": "-5"})
    assert Settings.from_env({"CACHELAYERS_SEMANTIC_MAX_ENTRIES": "2500"}).semantic_max_entries == 2500
    assert Settings().semantic_max_entries == 500_000


async def test_a_full_partition_evicts_its_least_recently_used_in_a_batch() -> None:
    from cachelayers.engines.semantic.store import eviction_batch

    assert [eviction_batch(c) for c in (1, 999, 1000, 5000, 10_000, 64_000, 10**6)] == [1, 1, 1, 5, 10, 64, 64]

    @semantic_cached(embed=AngleEmbedder(), threshold=0.99999, max_entries=5000, cache_embeddings=False)
    async def ask(question: str) -> str:
        return question

    await ask.prefill([(f"a@{i / 1000}", f"v{i}") for i in range(5000)])
    store = store_of(ask)
    assert len(store.entries) == 5000
    assert ask.cache_info().evictions == 0
    await ask.prefill([("b@0", "new 0")])  # full: the 5 least recently used go together
    texts = {entry.text for entry in store.entries.values()}
    assert len(store.entries) == 4996
    assert not {f"a@{i / 1000}" for i in range(5)} & texts
    assert "a@0.005" in texts
    assert "b@0" in texts
    await ask.prefill([(f"b@{i}", f"new {i}") for i in range(1, 5)])  # room for four more: no eviction
    assert len(store.entries) == 5000
    assert ask.cache_info().evictions == 5
    assert sum(len(p.index) for p in store.partitions.values()) == 5000
    await ask.prefill([("c@0", "new")])
    assert len(store.entries) == 4996
    assert ask.cache_info().evictions == 10


EXIT_DURING_COMPACTION = textwrap.dedent('''
    import asyncio, threading
    import numpy as np
    from cachelayers import semantic_cached

    def embed(texts):
        rows = np.random.default_rng(abs(hash(tuple(texts))) % 2**32).standard_normal((len(texts), 64))
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    @semantic_cached(embed=embed, threshold=0.99, max_entries=1000, cache_embeddings=False)
    async def ask(question: str) -> str:
        return "computed"

    async def main():
        for i in range(4000):
            await ask(f"question {i}")
        builds = [t for t in threading.enumerate() if t.name == "cachelayers-compaction"]
        print(ask.cache_info().compactions, len(builds), all(not t.daemon for t in builds), flush=True)

    asyncio.run(main())  # then exit at once, compactions possibly still building
''')


def test_the_process_exits_cleanly_while_an_index_compaction_is_building() -> None:
    """usearch killed mid-build at interpreter exit aborts the process (SIGABRT): builds are not daemons."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", EXIT_DURING_COMPACTION], capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        compactions, _, non_daemon = done.stdout.split()
        assert int(compactions) > 0
        assert non_daemon == "True"


WORKERS_AT_EXIT = textwrap.dedent('''
    import time
    from cachelayers import workers

    finished = []
    thread = workers.start_worker(lambda: (time.sleep(0.3), finished.append("build")), name="cachelayers-test")
    assert thread is not None and not thread.daemon
    workers.join_at_exit()  # what atexit runs, after the interpreter joined its non-daemon threads
    assert finished == ["build"], finished  # the running worker was waited for
    assert workers.start_worker(lambda: finished.append("late"), name="cachelayers-test") is None
    time.sleep(0.1)
    print(finished)
''')


def test_at_exit_running_workers_are_joined_and_new_ones_refused() -> None:
    """A worker started after the interpreter's own join (from the sync decorators' daemon loop) is joined by
    the atexit hook, and none starts after it: no usearch build is cut off at exit."""
    done = subprocess.run([sys.executable, "-c", WORKERS_AT_EXIT], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['build']"
