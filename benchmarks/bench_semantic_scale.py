"""One partition of the semantic index at scale (1,000,000 entries by default): build time, lookup p50/p99, RSS.

The index is cachelayers' `VectorIndex` as the semantic engine makes it (``f32``: a compact graph, ``i8`` by
default, searched, the best candidates rescored with the exact ``f32`` vectors kept beside it). The vectors are
random unit vectors (``--dim``, 384 by default: the dimension of MiniLM), the worst case of HNSW; the queries are
near-duplicates of stored vectors (cosine about 0.99), so each has a known right answer (its top-1 recall is
printed). The graph is built in chunks with usearch's multi-threaded add (``--threads``); when the build
exceeds ``--max-build-seconds`` it stops there and the report gives the size reached and an extrapolation.

Each lookup is timed on its own (``perf_counter_ns``), so the percentiles are per call; RSS is read from
``/proc/self/status`` (current and peak) after the build and after the lookups.

Run (from ``benchmarks/``): ``nice -n 10 python bench_semantic_scale.py [--size N] [--dim D] [--threads T]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

from _util import environment, environment_line, make_parser, percentile, render_table
from cachelayers.backends.vectors import VectorIndex

CHUNK = 50_000


def rss_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def random_unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random unit vectors (float32)."""
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def build(index: VectorIndex, size: int, dim: int, threads: int, budget: float) -> tuple[int, float]:
    """Add up to ``size`` random unit vectors in chunks; stop after ``budget`` seconds. Return (n, seconds)."""
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    done = 0
    while done < size:
        count = min(CHUNK, size - done)
        index.add_many(np.arange(done, done + count, dtype=np.uint64), random_unit(count, dim, rng), threads=threads)
        done += count
        elapsed = time.perf_counter() - started
        print(f"  built {done:,} in {elapsed:,.0f} s", flush=True)
        if elapsed > budget and done < size:
            break
    return done, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser: argparse.ArgumentParser = make_parser(__doc__)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--max-build-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    print(environment_line(environment(["usearch", "numpy"])))
    rss_before, _ = rss_mib()
    index = VectorIndex(args.dim)
    n, seconds = build(index, args.size, args.dim, args.threads, args.max_build_seconds)
    rss_built, peak_built = rss_mib()
    rng = np.random.default_rng(1)
    picks = rng.integers(0, n, args.queries)
    stored = index.get(picks.tolist())
    queries = stored + 0.02 * rng.standard_normal(stored.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for q in queries[:200]:  # warm up
        index.search(q, 1)
    timings = []
    hits = 0
    gc.collect()
    gc.disable()
    try:
        for q, pick in zip(queries, picks, strict=True):
            start = time.perf_counter_ns()
            found = index.search(q, 1)
            timings.append((time.perf_counter_ns() - start) / 1000)
            hits += found.keys[0] == pick
    finally:
        gc.enable()
    errors = []
    for q in queries[:200]:  # the similarity reported against numpy's exact cosine of the key returned
        found = index.search(q, 1)
        v = index.get(found.keys).astype(np.float64)[0]
        exact = float(v @ q.astype(np.float64) / np.linalg.norm(v) / np.linalg.norm(q.astype(np.float64)))
        errors.append(abs(found.similarities[0] - exact))
    rss_after, peak_after = rss_mib()
    graph = index.memory_usage
    rows = [
        ["entries", f"{n:,}"], ["dimension", str(args.dim)],
        ["graph / searched as", f"{index.search_dtype}, rescored f32"],
        ["build (threads)", f"{seconds:,.0f} s ({args.threads}); {n / seconds:,.0f} vectors/s"],
        ["lookup p50", f"{percentile(timings, 50):,.1f} µs"], ["lookup p99", f"{percentile(timings, 99):,.1f} µs"],
        ["lookup mean", f"{statistics.fmean(timings):,.1f} µs"],
        ["top-1 recall (near-duplicates)", f"{hits / len(picks):.4f}"],
        ["max |similarity - exact cosine| (200)", f"{max(errors):.1e}"],
        ["index memory_usage (graph + f32 rows)", f"{graph / 2**20:,.0f} MiB"],
        ["RSS before / after build / after lookups", f"{rss_before:,.0f} / {rss_built:,.0f} / {rss_after:,.0f} MiB"],
        ["peak RSS", f"{max(peak_built, peak_after):,.0f} MiB"],
    ]
    if n < args.size:
        rows.append(["extrapolated build of the full size",
                     f"~{seconds * args.size / n * 1.15:,.0f} s (x{args.size / n:.1f}, +15% for the deeper graph)"])
    print(render_table(["one partition", "value"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
