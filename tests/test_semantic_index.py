"""The usearch wrapper: explicit dtype, one writer, key reuse, compaction, atomic save; churn recall."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachelayers.backends.vectors import IndexOptions, VectorIndex, atomic_write
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
    assert "F32" in str(index._index.dtype)
    assert "F16" in str(VectorIndex(16, dtype="f16")._index.dtype)
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
    vectors = random_unit(300, 16, seed=1)
    index = VectorIndex(16)
    index.add_many(range(200), vectors[:200])
    index.remove_many(range(100))
    assert index.needs_compaction(minimum=10)
    job = index.begin_compaction()
    assert index.compacting
    assert not index.needs_compaction(minimum=10)
    with pytest.raises(RuntimeError):
        index.begin_compaction()
    index.add_many(range(200, 300), vectors[200:])  # written while the new graph builds
    index.remove_many(range(100, 150))
    index.add(120, vectors[0])  # a reused key
    job.build()
    assert index.commit_compaction(job)
    assert not compacting(index)
    assert set(index.keys().tolist()) == set(range(150, 300)) | {120}
    assert index.search(vectors[0], 1).keys == [120]
    assert index.search(vectors[250], 1).keys == [250]
    assert index.removed_since_build == 50


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
