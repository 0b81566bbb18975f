"""Sync functions: hit and miss of a cached plain ``def f(x: int)``, against a dict floor and sync peers.

Contenders, all in this process, measured interleaved in random order each round:

* **floor**: a bare ``def`` that looks ``x`` up in a plain dict;
* **functools.lru_cache** and **cachetools.cached(LRUCache)** (unbounded by TTL, thread-unsafe or locked);
* **cachelayers sync**: ``@multilevel_cached`` on a ``def`` (the memory hit runs in the calling thread; a
  miss crosses to the library's loop and back);
* **cachelayers async**, for reference: the same decorator on an ``async def``, awaited in a running loop.

*Hit*: the same ``--keys`` keys again and again. *Miss*: always-new keys.
Run ``python benchmarks/bench_sync.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import cachetools

from cachelayers import multilevel_cached

Measure = Callable[[list[int]], float]  # ns per call over the keys


def _sync_measure(fn: Callable[[int], Any]) -> Measure:
    def measure(keys: list[int]) -> float:
        started = time.perf_counter_ns()
        for k in keys:
            fn(k)
        return (time.perf_counter_ns() - started) / len(keys)

    return measure


def _async_measure(fn: Callable[[int], Any]) -> Measure:
    loop = asyncio.new_event_loop()

    async def calls(keys: list[int]) -> float:
        started = time.perf_counter_ns()
        for k in keys:
            await fn(k)
        return (time.perf_counter_ns() - started) / len(keys)

    def measure(keys: list[int]) -> float:
        return loop.run_until_complete(calls(keys))

    return measure


def contenders() -> dict[str, Measure]:
    """Every contender's measuring function."""
    store: dict[int, int] = {}

    def floor(x: int) -> int:
        value = store.get(x)
        if value is None:
            value = store[x] = 2 * x + 1
        return value

    @functools.lru_cache(maxsize=10_000)
    def lru(x: int) -> int:
        return 2 * x + 1

    @cachetools.cached(cachetools.LRUCache(maxsize=10_000))
    def tools(x: int) -> int:
        return 2 * x + 1

    @multilevel_cached(name="bench_sync.sync")
    def ours(x: int) -> int:
        return 2 * x + 1

    @multilevel_cached(name="bench_sync.async")
    async def ours_async(x: int) -> int:
        return 2 * x + 1

    return {"floor: def + dict": _sync_measure(floor), "functools.lru_cache": _sync_measure(lru),
            "cachetools LRU": _sync_measure(tools), "cachelayers sync": _sync_measure(ours),
            "cachelayers async (awaited)": _async_measure(ours_async)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--hit-calls", type=int, default=20_000)
    parser.add_argument("--miss-calls", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    measures = contenders()
    hit_keys = list(range(args.keys))
    hit_calls = hit_keys * max(1, args.hit_calls // args.keys)
    hits: dict[str, list[float]] = {name: [] for name in measures}
    misses: dict[str, list[float]] = {name: [] for name in measures}
    next_key = 1_000_000
    for measure in measures.values():
        measure(hit_keys)  # warm
    for _ in range(args.rounds):
        order = list(measures.items())
        rng.shuffle(order)
        for name, measure in order:
            hits[name].append(measure(hit_calls))
            misses[name].append(measure(list(range(next_key, next_key + args.miss_calls))))
            next_key += args.miss_calls
    floor = "floor: def + dict"
    print("sync functions: hit and miss of a cached def f(x: int) -> int (ns per call, median of "
          f"{args.rounds} interleaved rounds; x floor: median of per-round ratios)")
    print(f"{'contender':<30}{'hit':>10}{'x floor':>9}{'miss':>12}{'x floor':>9}")
    for name in measures:
        hit_ratio = statistics.median(h / f for h, f in zip(hits[name], hits[floor], strict=True))
        miss_ratio = statistics.median(m / f for m, f in zip(misses[name], misses[floor], strict=True))
        print(f"{name:<30}{statistics.median(hits[name]):>10,.0f}{hit_ratio:>9.2f}"
              f"{statistics.median(misses[name]):>12,.0f}{miss_ratio:>9.2f}")


if __name__ == "__main__":
    main()
