"""The usearch wrapper: explicit dtype, one writer, key reuse, compaction, atomic save; churn recall."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelayers.backends.vectors import IndexOptions, VectorIndex, atomic_write
from cachelayers.backends.vectors.index import GRAPH_FROM, RESCORE
from cachelayers.codec import Codec
from cachelayers.embedders import HashingEmbedder
from cachelayers.engines.semantic import SemanticStats as _Stats
from cachelayers.engines.semantic import SemanticStore
from cachelayers.errors import ConfigError
from cachelayers.metrics import StateLog
from tests.semantic_helpers import near_duplicate_texts


def unit(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


def compacting(index: VectorIndex) -> bool:
    return index.compacting


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def test_the_scalar_type_is_explicit_f32_by_default() -> None:
    index = VectorIndex(16)
    assert index.dtype == "f32"
    assert index.search_dtype == "i8"  # the graph is compact; the similarities reported are exact f32
    assert "I8" in str(index._index.dtype)
    assert "BF16" in str(VectorIndex(16, search_dtype="bf16")._index.dtype)
    assert "F32" in str(VectorIndex(16, search_dtype="f32")._index.dtype)
    assert "F16" in str(VectorIndex(16, dtype="f16")._index.dtype)
    assert VectorIndex(16, dtype="f16").search_dtype == "f16"
    with pytest.raises(ConfigError, match="search_dtype"):
        VectorIndex(16, search_dtype="f64")
    with pytest.raises(ConfigError, match="search_dtype"):
        VectorIndex(16, dtype="f16", search_dtype="i8")
    with pytest.raises(ConfigError, match="rescore"):
        VectorIndex(16, rescore=0)
    with pytest.raises(ConfigError, match="dtype"):
        VectorIndex(16, dtype="f8")
    with pytest.raises(ConfigError, match="ndim"):
        VectorIndex(0)
    with pytest.raises(ConfigError, match="connectivity"):
        VectorIndex(4, connectivity=-1)


def test_add_search_remove_and_replace() -> None:
    vectors = random_unit(50, 16)
    index = VectorIndex(16)
    assert index.search(vectors[0], 3).keys == []
    index.add_many(range(50), vectors)
    found = index.search(vectors[7], 2)
    assert found.keys[0] == 7
    assert found.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert 7 in index
    assert 99 not in index
    assert -1 not in index
    assert index.remove(7)
    assert not index.remove(7)
    assert 7 not in index
    assert len(index) == 49
    assert index.search(vectors[7], 1).keys[0] != 7
    index.add(7, vectors[8])  # the key is reused for another vector
    assert set(index.search(vectors[8], 2).keys) == {7, 8}
    index.add(7, vectors[9])  # adding an existing key replaces its vector
    assert len(index) == 50
    assert set(index.search(vectors[9], 2).keys) == {7, 9}
    np.testing.assert_allclose(index.get([7]), vectors[9:10], atol=1e-6)
    with pytest.raises(KeyError):
        index.get([1234])


def test_bad_shapes_and_duplicate_keys_are_rejected() -> None:
    index = VectorIndex(4)
    with pytest.raises(ValueError, match="dimension"):
        index.add(1, np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="unique"):
        index.add_many([1, 1], random_unit(2, 4))
    with pytest.raises(ValueError, match="array"):
        index.add_many([1, 2], random_unit(3, 4))


def test_concurrent_writers_from_threads_never_orphan_a_node() -> None:
    """usearch #735: parallel adds can leave nodes unreachable. Every write goes through one lock."""
    vectors = random_unit(800, 32, seed=3)
    index = VectorIndex(32)

    def writer(part: int) -> None:
        for key in range(part, 800, 4):
            index.add(key, vectors[key])

    threads = [threading.Thread(target=writer, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(index) == 800
    found = [index.search(vectors[key], 1).keys[0] for key in range(800)]
    assert found == list(range(800))  # every node is reachable: an exact self-search finds it


def test_a_compaction_replays_writes_made_while_it_was_building() -> None:
    """(Sizes past GRAPH_FROM: a smaller f32 index keeps no graph, so it has nothing to compact.)"""
    vectors = random_unit(600, 16, seed=1)
    index = VectorIndex(16)
    index.add_many(range(400), vectors[:400])
    index.remove_many(range(200))
    assert index.needs_compaction(minimum=10)
    job = index.begin_compaction()
    assert index.compacting
    assert not index.needs_compaction(minimum=10)
    with pytest.raises(RuntimeError):
        index.begin_compaction()
    index.add_many(range(400, 600), vectors[400:])  # written while the new graph builds
    index.remove_many(range(200, 300))
    index.add(220, vectors[0])  # a reused key
    job.build()
    assert index.commit_compaction(job)
    assert not compacting(index)
    assert set(index.keys().tolist()) == set(range(300, 600)) | {220}
    assert index.search(vectors[0], 1).keys == [220]
    assert index.search(vectors[500], 1).keys == [500]
    assert index.removed_since_build == 100


def test_a_small_f32_index_keeps_no_graph_and_searches_its_exact_vectors() -> None:
    """Up to GRAPH_FROM vectors the graph stays empty (a partition of a few entries costs no graph nodes);
    past it every vector is put in the graph, and a save/load keeps either state."""
    vectors = random_unit(GRAPH_FROM + 1, 16, seed=4)
    index = VectorIndex(16)
    index.add_many(range(GRAPH_FROM), vectors[:GRAPH_FROM])
    assert len(index) == GRAPH_FROM
    assert index._index.size == 0
    assert [index.search(vectors[k], 1).keys[0] for k in range(0, GRAPH_FROM, 17)] == list(range(0, GRAPH_FROM, 17))
    reloaded = VectorIndex.from_bytes(index.to_bytes())
    assert len(reloaded) == GRAPH_FROM
    assert reloaded._index.size == 0
    assert reloaded.search(vectors[5], 1).keys == [5]
    assert index.remove(3)
    assert 3 not in index
    assert len(index) == GRAPH_FROM - 1
    index.add(3, vectors[3])
    index.add(GRAPH_FROM, vectors[GRAPH_FROM])
    assert index._index.size == GRAPH_FROM + 1  # past the bound: the graph holds every vector
    assert [index.search(vectors[k], 1).keys[0] for k in range(0, GRAPH_FROM + 1, 17)] == list(
        range(0, GRAPH_FROM + 1, 17))
    reloaded = VectorIndex.from_bytes(index.to_bytes())
    assert reloaded._index.size == GRAPH_FROM + 1
    assert reloaded.search(vectors[GRAPH_FROM], 1).keys == [GRAPH_FROM]


def test_clear_abandons_a_running_compaction() -> None:
    index = VectorIndex(8)
    index.add_many(range(10), random_unit(10, 8))
    job = index.begin_compaction()
    index.clear()
    job.build()
    assert not index.commit_compaction(job)
    assert len(index) == 0


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vectors = random_unit(100, 16, seed=2)
    index = VectorIndex(16)
    index.add_many(range(100), vectors)
    path = tmp_path / "index.usearch"
    index.save(path)
    loaded = VectorIndex.load(path, dtype="f32")
    assert len(loaded) == 100
    assert loaded.dtype == "f32"
    assert loaded.search(vectors[42], 1).keys == [42]
    with pytest.raises(ValueError, match="f16"):
        VectorIndex.load(path, dtype="f16")
    with pytest.raises(ValueError):
        VectorIndex.from_bytes(b"not an index")


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.bin"
    atomic_write(path, b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_top1_recall_on_real_near_duplicates_stays_above_099_after_churn(anyio_backend: str) -> None:
    """Five rounds of replacing half the entries; compaction keeps the graph's top-1 recall >= 0.99.

    Recall here is the index's: the share of queries (the paraphrase of a live entry) whose top-1 from the
    graph is the exact nearest live vector (brute force). Texts are real near-duplicates from the shared data.
    """
    live_size, rounds = 600, 5
    pairs = near_duplicate_texts(live_size + rounds * live_size // 2 + 50, seed=11)
    embedder = HashingEmbedder()
    texts = [a for a, _ in pairs]
    queries = dict(pairs)
    stats = _Stats()
    store = SemanticStore(max_entries=10**6, options=IndexOptions(), clock=lambda: 0.0,
                          stats=stats, log=StateLog(), codec=Codec())
    await store.open(embedder.name, embedder.ndim)
    partition = b"p" * 16
    vectors = dict(zip(texts, embedder(texts), strict=True))
    pool = iter(texts)
    for _ in range(live_size):
        text = next(pool)
        await store.insert(partition, text, vectors[text], text, None)
    rng = random.Random(5)
    recalls = []
    for _ in range(rounds):
        live = list(store.entries.values())
        await store.remove(rng.sample(live, len(live) // 2))
        while len(store) < live_size:
            text = next(pool)
            await store.insert(partition, text, vectors[text], text, None)
        await store.wait_compactions()
        live_texts = [e.text for e in store.entries.values()]
        matrix = np.stack([vectors[t] for t in live_texts])
        query_vectors = embedder([queries[t] for t in live_texts])
        exact = [live_texts[i] for i in np.argmax(query_vectors @ matrix.T, axis=1)]
        found = [store.find_similar(partition, q, 1) for q in query_vectors]
        got = [hits[0][0].text if hits else None for hits in found]
        recalls.append(sum(g == e for g, e in zip(got, exact, strict=True)) / len(exact))
    assert stats.compactions >= 1
    assert min(recalls) >= 0.99, recalls


# -- exact similarities from a compact graph ---------------------------------------------------------------


def brute_cosine(live: dict[int, np.ndarray], query: np.ndarray) -> dict[int, float]:
    """numpy's cosine of ``query`` to every live vector, in float64."""
    q = query.astype(np.float64)
    return {k: float(v.astype(np.float64) @ q / (np.linalg.norm(v.astype(np.float64)) * np.linalg.norm(q)))
            for k, v in live.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 120), dim=st.sampled_from([4, 16, 48]),
       count=st.integers(1, 20), churn=st.integers(0, 40),
       search_dtype=st.sampled_from(["bf16", "i8", "f16", "f32"]), roundtrip=st.booleans())
def test_reported_similarities_are_numpys_exact_cosine(seed: int, size: int, dim: int, count: int, churn: int,
                                                       search_dtype: str, roundtrip: bool) -> None:
    """Whatever the graph's type, after adds, replacements and removals (and a save/load or a compaction),
    every similarity reported is numpy's float64 cosine of the query and the vector stored under that key
    (to 1e-6), best first; up to `RESCORE` vectors the answer is exactly brute force's top ``count``."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, (size, 1))  # not unit vectors: the cosine must still be exact
    vectors = (rng.standard_normal((size, dim)) * scale).astype(np.float32)
    index = VectorIndex(dim, search_dtype=search_dtype)
    index.add_many(range(size), vectors)
    live = {k: vectors[k] for k in range(size)}
    for _ in range(churn):
        key = int(rng.integers(0, size + 10))
        if rng.random() < 0.5:
            assert index.remove(key) == (key in live)
            live.pop(key, None)
        else:
            live[key] = rng.standard_normal(dim).astype(np.float32)
            index.add(key, live[key])
    if roundtrip:
        index = VectorIndex.from_bytes(index.to_bytes(), dtype="f32")
    elif live:
        index.compact()
    assert len(index) == len(live)
    assert sorted(index.keys().tolist()) == sorted(live)
    for _ in range(5):
        query = (rng.standard_normal(dim) * rng.uniform(0.1, 10.0)).astype(np.float32)
        found = index.search(query, count)
        exact = brute_cosine(live, query)
        assert len(found.keys) == min(count, len(live))
        assert len(set(found.keys)) == len(found.keys)
        for key, similarity in zip(found.keys, found.similarities, strict=True):
            assert similarity == pytest.approx(exact[key], abs=1e-6)
            np.testing.assert_array_equal(index.get([key])[0], live[key])
        assert found.similarities == sorted(found.similarities, reverse=True)
        if len(live) <= max(count, RESCORE):
            best = sorted(exact.values(), reverse=True)[:count]
            np.testing.assert_allclose(found.similarities, best, atol=1e-6)


def test_a_compact_graph_finds_what_exact_f32_finds_on_real_near_duplicates() -> None:
    """The compact graph (i8 or bf16) plus rescoring gives brute force's top-1, with the same similarity."""
    pairs = near_duplicate_texts(400, seed=3)
    embedder = HashingEmbedder()
    stored = embedder([a for a, _ in pairs])
    queries = embedder([b for _, b in pairs])
    for search_dtype in ("i8", "bf16"):
        check_top1_against_brute_force(VectorIndex(embedder.ndim, search_dtype=search_dtype), stored, queries)


def check_top1_against_brute_force(index: VectorIndex, stored: np.ndarray, queries: np.ndarray) -> None:
    index.add_many(range(len(stored)), stored)
    exact = queries.astype(np.float64) @ stored.astype(np.float64).T
    exact /= np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(stored, axis=1))
    agree = 0
    for i, query in enumerate(queries):
        found = index.search(query, 1)
        assert found.similarities[0] == pytest.approx(exact[i, found.keys[0]], abs=1e-6)
        agree += found.keys[0] == int(np.argmax(exact[i]))
    assert agree / len(queries) >= 0.99


def test_memory_usage_counts_the_exact_vectors_beside_the_graph() -> None:
    exact, compact = VectorIndex(64), VectorIndex(64, dtype="bf16")
    vectors = random_unit(500, 64, seed=4)
    exact.add_many(range(500), vectors)
    compact.add_many(range(500), vectors)
    assert exact.memory_usage >= compact.memory_usage + 500 * 64 * 4


def test_inconsistent_or_truncated_index_bytes_are_refused() -> None:
    count = GRAPH_FROM + 30  # with a graph to check against the vectors
    index = VectorIndex(8)
    index.add_many(range(count), random_unit(count, 8, seed=5))
    data = index.to_bytes()
    for bad in (data[:10], data[:200], data[:-50]):
        with pytest.raises(ValueError):
            VectorIndex.from_bytes(bad)
    other = VectorIndex(8)
    other.add_many(range(1, count + 1), random_unit(count, 8, seed=5))  # same count, other keys
    head = data[:len(data) - len(other._index.save())]
    with pytest.raises(ValueError, match="keys"):
        VectorIndex.from_bytes(head + bytes(other._index.save()))
    with pytest.raises(ValueError, match="f16"):
        VectorIndex.from_bytes(data, dtype="f16")


def test_a_bare_f32_usearch_index_from_before_still_loads_with_exact_similarities() -> None:
    from usearch.index import Index

    vectors = random_unit(300, 16, seed=6)
    raw = Index(ndim=16, metric="cos", dtype="f32")
    raw.add(np.arange(300, dtype=np.uint64), vectors, threads=1)
    saved = raw.save()
    assert saved is not None
    index = VectorIndex.from_bytes(bytes(saved), dtype="f32")
    found = index.search(vectors[5], 3)
    assert found.keys[0] == 5
    assert found.similarities[0] == pytest.approx(1.0, abs=1e-6)
    index.compact()  # the next compaction makes the compact graph
    assert "I8" in str(index._index.dtype)
    assert index.search(vectors[5], 1).keys == [5]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_compaction_refused_at_exit_is_abandoned_not_left_journaling(anyio_backend: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the interpreter exits, no worker starts (`cachelayers.workers`): the rebuild that was due is
    abandoned, so the index stops journaling writes for it and a later compaction can begin."""
    from cachelayers.engines.semantic import store as store_module

    monkeypatch.setattr(store_module, "start_worker", lambda *args, **kwargs: None)
    embedder = HashingEmbedder()
    texts = [f"question number {i} about topic {i % 7}" for i in range(400)]
    stats = _Stats()
    store = SemanticStore(max_entries=10**6, options=IndexOptions(), clock=lambda: 0.0,
                          stats=stats, log=StateLog(), codec=Codec())
    await store.open(embedder.name, embedder.ndim)
    partition = b"p" * 16
    for text, vector in zip(texts, embedder(texts), strict=True):
        await store.insert(partition, text, vector, text, None)
    await store.remove(list(store.entries.values())[:300])  # enough removals for a rebuild
    part = store.partitions[partition]
    assert part.compaction is None
    assert not part.index.compacting
    assert part.index.needs_compaction()  # still due: a process that goes on would rebuild next time
    monkeypatch.undo()
    await store.insert(partition, "one more question", embedder(["one more question"])[0], "x", None)
    await store.wait_compactions()
    assert stats.compactions == 1
