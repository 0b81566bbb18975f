"""Semantic cache latency: lookup and insert at 10k and 100k entries, against the designs it replaces.

Contenders, measured in the same process, interleaved in rounds (fresh random order each round):

lookup (a near-duplicate query, nearest neighbour, similarity check)
    ``usearch bf16``       raw ``Index.search(q, 1, threads=1)`` on a bf16 graph of the same vectors — the
                           floor (with ``--search-dtype bf16`` the very graph the index searches);
    ``usearch f32``        the same on an f32 graph of the same vectors (what the index stored before);
    ``index search``       cachelayers' `VectorIndex.search`: the compact (i8) search of the best ``--rescore``
                           candidates, rescored with the exact f32 vectors (exact similarities);
    ``store lookup``       cachelayers' `SemanticStore.find_similar` (what the engine calls): the index
                           search plus entry and expiry checks;
    ``decorated hit``      a whole ``await fn(question)`` answered semantically (signature binding, partition
                           hash, embedding-cache hit, search, payload, `explain` record) — embedding excluded,
                           since it is cached;
    ``numpy brute force``  ``argmax(M @ q)`` over a float32 matrix;
    and the engine's own cost of a decorated hit: the same ``await fn(question)`` with the store's search
    answered from a table (it does not move with the search's time, which moves most with the machine's load).
insert (a new entry into an index of n)
    ``usearch add``        raw ``Index.add(key, v, threads=1)`` into the f32 graph — the floor;
    ``store insert``       `SemanticStore.insert`: sweep, capacity check, the add, bookkeeping (the store's
                           capacity is raised so that nothing is evicted: an insert into a full store also
                           evicts, and the evicted entry's key is reused — about 3 ms at 100k);
    ``numpy append``       a row written into a preallocated matrix;
    ``rebuild per insert`` the GPTCache-style design that rebuilds the index on each insert — measured only
                           at small n (``--rebuild-sizes``), because it costs O(n) per insert (seconds at 10k).

A second table times the floor, the store lookup and the decorated hit taking turns query by query (rotating
order), so each call finds the CPU caches as another left them, as a lookup amid an application's other work
does; in the first table each contender repeats its own lookup and keeps its graph in the caches.

Graphs are built with usearch's multi-threaded add (``--threads``); the index's graph is ``i8`` by default
(``--search-dtype``), the floor's ``bf16``. Vectors are synthetic and clustered
(``--clusters`` centres plus noise, unit length, ``--dim`` 384 like all-MiniLM-L6-v2): real embeddings are
clustered too, and random vectors are the worst case of HNSW. Targets (``--check``): store lookup <= usearch
bf16 + 50 µs, decorated hit <= usearch bf16 + 50 µs, and store insert <= usearch add + 50 µs at every size.

    python benchmarks/bench_semantic.py                    # 10k and 100k (the 100k build takes minutes)
    python benchmarks/bench_semantic.py --sizes 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import partial
from typing import Any

import anyio
import numpy as np
from usearch.index import Index

from _util import (
    Series,
    environment,
    floor_row,
    make_parser,
    render_table,
    shuffled,
    time_async_indexed,
    time_sync,
    to_json,
)
from cachelayers.backends.vectors import IndexOptions, VectorIndex
from cachelayers.backends.vectors.index import DEFAULT_SEARCH_DTYPE
from cachelayers.codec import Codec
from cachelayers.engines.semantic import Entry as _Entry
from cachelayers.engines.semantic import SemanticFunction, SemanticStore
from cachelayers.engines.semantic import SemanticStats as _Stats
from cachelayers.engines.semantic.options import DEFAULT_MAX_CANDIDATES
from cachelayers.metrics import StateLog

LOOKUPS = ("usearch bf16", "usearch f32", "index search", "store lookup", "decorated hit", "numpy brute force")
FLOOR = LOOKUPS[0]
INSERTS = ("usearch add", "store insert", "numpy append")
TARGET_US = 50.0


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


def near(vectors: np.ndarray, seed: int, noise: float = 0.02) -> np.ndarray:
    """Near-duplicates of ``vectors`` (cosine about 0.99)."""
    rng = np.random.default_rng(seed)
    rows = vectors + noise * rng.standard_normal(vectors.shape).astype(np.float32)
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


class Setup:
    """One size: the shared graph, the store on a copy of it, the brute-force matrix, the decorated function."""

    def __init__(self, n: int, args: argparse.Namespace) -> None:
        extra = args.inserts * args.rounds
        self.n = n
        self.vectors = clustered(n + extra, args.dim, args.clusters, seed=n)
        base = self.vectors[:n]
        self.fresh = self.vectors[n:]
        started = time.perf_counter()
        self.index = VectorIndex(args.dim, search_dtype=args.search_dtype, rescore=args.rescore)
        self.index.add_many(np.arange(n, dtype=np.uint64), base, threads=args.threads)
        self.build_seconds = time.perf_counter() - started
        if args.search_dtype == "bf16":
            self.compact = self.index._index  # the very graph the index searches: the floor searches it raw
        else:
            self.compact = Index(ndim=args.dim, metric="cos", dtype="bf16")
            self.compact.add(np.arange(n, dtype=np.uint64), base, threads=args.threads)
        started = time.perf_counter()
        self.raw = Index(ndim=args.dim, metric="cos", dtype="f32")
        self.raw.add(np.arange(n, dtype=np.uint64), base, threads=args.threads)
        self.build_f32_seconds = time.perf_counter() - started
        self.partition = b"p" * 16
        self.store = SemanticStore(max_entries=10**9, max_total_entries=10**9, options=IndexOptions(),
                                   clock=time.time, stats=_Stats(), log=StateLog(), codec=Codec())
        self.texts = [f"question {i}" for i in range(n)]
        self.matrix = np.empty((n + extra, args.dim), dtype=np.float32)
        self.matrix[:n] = base
        self.rows = n
        picks = np.random.default_rng(1).integers(0, n, args.queries)
        self.queries = near(base[picks], seed=2)
        self.query_texts = [f"query {i}" for i in range(args.queries)]
        self.expected = picks
        self.next_key = n
        self.fn: Any = None
        self.engine: Any = None
        self.computed = 0

    async def load_store(self, dim: int) -> None:
        await self.store.open("bench", dim)
        part = self.store._partition(self.partition)
        part.index = self.index
        for key, text in enumerate(self.texts):
            self.store._adopt(_Entry(key, key, self.partition, text, None, {"answer": text}), part)
        self.store._next_key = self.n
        self.store._seq = self.n

        by_text = dict(zip(self.query_texts, self.queries, strict=True))

        def embed(texts: list[str]) -> np.ndarray:
            return np.stack([by_text[t] for t in texts])

        async def ask(question: str) -> dict[str, str]:
            self.computed += 1  # reported: every lookup in the timed loop should be a hit
            return {"answer": question}

        engine: SemanticFunction[Any, Any] = SemanticFunction(ask, embed=embed, threshold=0.5,
                                                              max_entries=10**9, name="bench.ask")
        engine._store, engine._store_url = self.store, "memory://"
        partition = engine._text_and_partition({"question": "x"})[1]
        if partition != self.partition:  # the decorated call's partition: move the loaded graph there
            self.store.partitions[partition] = self.store.partitions.pop(self.partition)
            for entry in self.store.entries.values():
                entry.partition = partition
            self.partition = partition
        for text in self.query_texts:  # warm the embedding cache: a hit does not embed
            await engine.embed_text(text)
        self.engine = engine
        self.fn = engine.wrapper


def insert_raw(raw: Index, fresh: np.ndarray, start_key: int) -> float:
    """ns per raw usearch add of each row of ``fresh`` under keys from ``start_key``."""
    return time_sync(lambda i: raw.add(start_key + i, fresh[i], threads=1), len(fresh))


async def insert_store(store: SemanticStore, partition: bytes, texts: list[str], fresh: np.ndarray) -> float:
    """ns per `SemanticStore.insert` of each row of ``fresh``."""
    return await time_async_indexed(lambda i: store.insert(partition, texts[i], fresh[i], i, None), len(fresh))


def append_row(matrix: np.ndarray, base_row: int, fresh: np.ndarray, i: int) -> None:
    """The brute-force design's insert: write a row of a preallocated matrix."""
    matrix[base_row + i] = fresh[i]


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    setup = Setup(n, args)
    anyio.run(setup.load_store, args.dim)
    q = setup.queries
    raw, compact, index, store, part = setup.raw, setup.compact, setup.index, setup.store, setup.partition
    count = len(q)

    def lookup_raw(i: int) -> object:
        return raw.search(q[i], 1, threads=1)

    def lookup_compact(i: int) -> object:
        return compact.search(q[i], 1, threads=1)

    def lookup_index(i: int) -> object:
        return index.search(q[i], 1)

    def lookup_store(i: int) -> object:
        return store.find_similar(part, q[i], 1)

    def lookup_numpy(i: int) -> object:
        return int(np.argmax(setup.matrix[:setup.rows] @ q[i]))

    texts = setup.query_texts
    fn = setup.fn

    async def decorated_batch() -> float:
        return await time_async_indexed(lambda i: fn(texts[i]), len(texts))

    lookups: dict[str, Series] = {name: Series() for name in LOOKUPS}
    inserts: dict[str, Series] = {name: Series() for name in INSERTS}
    rng = random.Random(7)
    recall = {
        FLOOR: float(np.mean([compact.search(q[i], 1, threads=1).keys[0] == setup.expected[i] for i in range(count)])),
        "usearch f32": float(np.mean([raw.search(q[i], 1, threads=1).keys[0] == setup.expected[i]
                                      for i in range(count)])),
        "store lookup": float(np.mean([store.find_similar(part, q[i], 1)[0][0].key == setup.expected[i]
                                       for i in range(count)])),
    }
    numpy_count = max(20, count // (10 if n >= 50_000 else 2))
    engine = anyio.run(engine_only, setup, args.rounds)  # before the inserts: every query is then a hit
    for round_ in range(args.rounds):
        for name in shuffled(LOOKUPS, rng):
            if name == FLOOR:
                lookups[name].samples.append(time_sync(lookup_compact, count))
            elif name == "usearch f32":
                lookups[name].samples.append(time_sync(lookup_raw, count))
            elif name == "index search":
                lookups[name].samples.append(time_sync(lookup_index, count))
            elif name == "store lookup":
                lookups[name].samples.append(time_sync(lookup_store, count))
            elif name == "numpy brute force":
                lookups[name].samples.append(time_sync(lookup_numpy, numpy_count))
            else:
                lookups[name].samples.append(anyio.run(decorated_batch))
        fresh = setup.fresh[round_ * args.inserts:(round_ + 1) * args.inserts]
        for name in shuffled(INSERTS, rng):
            if name == "usearch add":
                inserts[name].samples.append(insert_raw(raw, fresh, 10**9 + round_ * args.inserts))
            elif name == "store insert":
                texts_in = [f"new {round_} {i}" for i in range(len(fresh))]
                inserts[name].samples.append(anyio.run(insert_store, store, part, texts_in, fresh))
            else:
                append = partial(append_row, setup.matrix, setup.rows, fresh)
                inserts[name].samples.append(time_sync(append, len(fresh)))
                setup.rows += len(fresh)
    mixed = anyio.run(interleaved, setup, args.rounds)
    return {"n": n, "build_seconds": setup.build_seconds, "build_f32_seconds": setup.build_f32_seconds,
            "interleaved": mixed, "engine_only": engine,
            "memory_mib": {f"index ({args.search_dtype} graph + f32 rows)": index.memory_usage / 2**20,
                           "usearch f32 graph": raw.memory_usage / 2**20},
            "lookups": lookups, "inserts": inserts,
            "recall": recall, "decorated_computed": setup.computed}


MIXED = ("usearch bf16", "store lookup", "decorated hit")


async def engine_only(setup: Setup, rounds: int) -> list[float]:
    """ns per decorated hit with the store's search answered from a table: what the engine adds to the search
    (signature binding, partition digest, embedding-cache hit, candidate checks, payload, `explain` record).

    Unlike the lookups, it does not move with the search's time, which varies most with the machine's load.
    The table costs a copy and a hash of the query vector per call, so this is an upper bound.
    """
    store, part, texts, fn = setup.store, setup.partition, setup.query_texts, setup.fn
    table = {}
    for text in texts:  # the vectors as the engine has them (normalised by the embedding path)
        vector = await setup.engine.embed_text(text)
        table[vector.tobytes()] = store.find_similar(part, vector, DEFAULT_MAX_CANDIDATES)
    store.find_similar = lambda partition, vector, count: table[vector.tobytes()]  # type: ignore[method-assign]
    try:
        return [await time_async_indexed(lambda i: fn(texts[i]), len(texts)) for _ in range(rounds)]
    finally:
        del store.find_similar  # the class's method again


async def interleaved(setup: Setup, rounds: int) -> dict[str, list[float]]:
    """ns per call of the floor, the store lookup and the decorated hit, taking turns query by query.

    In the timed loops above each contender repeats its own lookup, so its graph stays in the CPU caches; here
    each call finds the caches as the previous contender left them, as a lookup amid other work does. The
    order rotates every query, so no contender always follows the same one.
    """
    q, texts, fn = setup.queries, setup.query_texts, setup.fn
    compact, store, part = setup.compact, setup.store, setup.partition
    out: dict[str, list[float]] = {name: [] for name in MIXED}
    clock = time.perf_counter_ns
    turn = 0
    for _ in range(rounds):
        for i in range(len(q)):
            turn += 1
            for name in MIXED[turn % 3:] + MIXED[:turn % 3]:
                if name == "usearch bf16":
                    started = clock()
                    compact.search(q[i], 1, threads=1)
                elif name == "store lookup":
                    started = clock()
                    store.find_similar(part, q[i], 4)
                else:
                    started = clock()
                    await fn(texts[i])
                out[name].append(float(clock() - started))
    return out


def rebuild_per_insert(sizes: list[int], dim: int, clusters: int) -> list[tuple[int, float]]:
    """Seconds to insert one vector by rebuilding an index of n (the design that rebuilds on every insert)."""
    out = []
    for n in sizes:
        vectors = clustered(n + 1, dim, clusters, seed=99)
        started = time.perf_counter()
        index = Index(ndim=dim, metric="cos", dtype="f32")
        index.add(np.arange(n + 1, dtype=np.uint64), vectors, threads=1)
        out.append((n, time.perf_counter() - started))
    return out


def us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads of usearch's add while building")
    parser.add_argument("--search-dtype", default=DEFAULT_SEARCH_DTYPE, help="the index graph's type")
    parser.add_argument("--rescore", type=int, default=16, help="candidates rescored exactly per lookup")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--inserts", type=int, default=200)
    parser.add_argument("--rebuild-sizes", type=int, nargs="*", default=[500, 1000, 2000])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 if a latency target is missed")
    args = parser.parse_args(argv)
    results = [run_size(n, args) for n in args.sizes]
    rebuild = rebuild_per_insert(args.rebuild_sizes, args.dim, args.clusters) if args.rebuild_sizes else []
    missed = []
    for result in results:
        lookups, inserts = result["lookups"], result["inserts"]
        extra_lookup = lookups["store lookup"].median - lookups[FLOOR].median
        extra_hit = lookups["decorated hit"].median - lookups[FLOOR].median
        extra_insert = inserts["store insert"].median - inserts["usearch add"].median
        result["overhead_us"] = {"lookup": extra_lookup / 1000, "decorated hit": extra_hit / 1000,
                                 "insert": extra_insert / 1000}
        if extra_lookup / 1000 > TARGET_US:
            missed.append(f"n={result['n']}: store lookup is {us(extra_lookup)} µs over {FLOOR}")
        if extra_hit / 1000 > TARGET_US:
            missed.append(f"n={result['n']}: decorated hit is {us(extra_hit)} µs over {FLOOR}")
        if extra_insert / 1000 > TARGET_US:
            missed.append(f"n={result['n']}: store insert is {us(extra_insert)} µs over usearch add")
    if args.json:
        print(to_json({"environment": environment(["usearch", "numpy"]), "args": vars(args),
                       "results": [{**r, "lookups": {k: v.samples for k, v in r["lookups"].items()},
                                    "inserts": {k: v.samples for k, v in r["inserts"].items()}} for r in results],
                       "rebuild_per_insert": rebuild, "missed": missed}))
    else:
        for result in results:
            n = result["n"]
            recall = ", ".join(f"{k} {v:.3f}" for k, v in result["recall"].items())
            memory = ", ".join(f"{k} {v:,.0f} MiB" for k, v in result["memory_mib"].items())
            print(f"\n## n = {n:,} entries, dim {args.dim} (graphs built in {result['build_seconds']:.0f} s "
                  f"({args.search_dtype} index) and {result['build_f32_seconds']:.0f} s (f32), {args.threads} threads; "
                  f"top-1 recall of the near-duplicate queries: {recall}; memory: {memory})\n")
            rows = []
            floor = result["lookups"][FLOOR]
            for name in LOOKUPS:
                rows.append(floor_row(f"lookup: {name}", result["lookups"][name], floor, digits=1, ratio_suffix="x",
                                      paired=False))
            floor = result["inserts"]["usearch add"]
            for name in INSERTS:
                rows.append(floor_row(f"insert: {name}", result["inserts"][name], floor, digits=1, ratio_suffix="x",
                                      paired=False))
            print(render_table(["contender", "best µs", "median µs", "x floor", "Δ µs vs floor"], rows))
            mixed = result["interleaved"]
            floor_median = float(np.median(mixed[FLOOR]))
            print(f"\nTaking turns query by query ({len(mixed[FLOOR]):,} calls each; the store lookup asks for "
                  f"{DEFAULT_MAX_CANDIDATES} candidates, as the decorator does):\n")
            print(render_table(["contender", "p10 µs", "median µs", "p90 µs", "Δ median µs vs floor"],
                               [[name, us(float(np.percentile(mixed[name], 10))), us(float(np.median(mixed[name]))),
                                 us(float(np.percentile(mixed[name], 90))),
                                 f"{(float(np.median(mixed[name])) - floor_median) / 1000:+.1f}"] for name in MIXED]))
            engine = result["engine_only"]
            print(f"\nThe engine's own cost of a decorated hit (the search answered from a table): median "
                  f"{us(float(np.median(engine)))} µs, best {us(min(engine))} µs; a decorated hit is a store lookup "
                  f"of {DEFAULT_MAX_CANDIDATES} candidates plus this.")
            if result["decorated_computed"]:
                print(f"problem: {result['decorated_computed']} decorated lookups computed instead of hitting")
        if rebuild:
            print("\n## rebuild per insert (the design that rebuilds the index on every insert)\n")
            print(render_table(["n", "one insert (s)", "µs per existing entry"],
                               [[f"{n:,}", f"{s:.3f}", f"{s / n * 1e6:.0f}"] for n, s in rebuild]))
            per_entry = rebuild[-1][1] / rebuild[-1][0]
            print(f"\nAt least linear in n: at 10,000 entries one insert would take about {per_entry * 10_000:.1f} s, "
                  f"at 100,000 about {per_entry * 100_000:.0f} s (not run).")
        print(f"\nTargets: store lookup and decorated hit <= {FLOOR} + {TARGET_US:.0f} µs, store insert <= "
              f"usearch add + {TARGET_US:.0f} µs (medians): {'met' if not missed else 'MISSED: ' + '; '.join(missed)}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
