"""Micro-batching: the per-item overhead of ``@batched``, and its fill ratio and added latency under load.

Everything runs in this process and run, on asyncio, every contender once per round in a fresh random order.

**Overhead** (no load; the batch function returns its list at once, so only the machinery is measured). For
``--items`` items (a multiple of ``--max-size``, so every batch goes full and no timer is waited for):

* **direct**: the batch function awaited on lists of ``max_size`` items: the floor;
* **cachelayers many()**: ``await fn.many(items)``;
* **cachelayers per item**: ``asyncio.gather`` of one ``await fn(item)`` per item: a task per caller, as
  concurrent callers are in a real pipeline;
* **aiodataloader load_many** and **aiodataloader per item** (``cache=False``, ``max_batch_size`` = max_size),
  the same two ways;
* **gather of plain calls**: ``asyncio.gather`` of a trivial ``async def`` per item: what the callers' own tasks
  cost, batching or not.

Times are CPU time of the process per item (robust to a shared machine descheduling us). ``added`` is contender
minus direct, per item: what batching costs over calling the batch function yourself, including the callers'
tasks; ``x plain`` divides the per-item contenders by the gather of plain calls of the same round.

**Load**: items arrive at ``--load`` x ``max_size / max_wait`` per second (twice the rate that fills a batch
exactly in ``max_wait``) for ``--duration`` seconds, in bursts every millisecond, each from its own task; the
provider takes ``--latency`` per call. Contenders: ``@batched(max_size, max_wait)``, aiodataloader (which sends
what arrived in one loop iteration) and a plain ``asyncio.gather`` of single calls (one provider call per item).
Reported: provider calls, mean batch size, fill ratio (mean size / max_size), the first item's added latency
(batch start - arrival of its first item) and the items' latency (answer - arrival), p50 and p99, and the loop
lag (how late the driver's 1 ms sleeps woke: the stalls of the machine and the loop, which every latency
includes). One more row runs the same batcher at ``--light-load`` (a quarter of ``max_size / max_wait`` by
default), where batches go by their timer: its first-item wait shows the timer's precision.

Run ``python benchmarks/bench_batching.py`` (``--json`` for machine-readable output, ``--check`` to exit 1 when an
acceptance target is missed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiodataloader import DataLoader

from _util import (
    Series,
    add_common_arguments,
    emit,
    environment,
    exit_status,
    gc_paused,
    interleaved,
    make_parser,
    missed,
    percentile,
    render_table,
    report_head,
    shuffled,
    target_lines,
)
from cachelayers import batched

PEER_PACKAGES = ("cachelayers", "anyio", "aiodataloader")
FILL_TARGET = 0.90  # acceptance (issue 4): fill ratio >= 90 % under the 2x load ...
LATENCY_SLACK = 0.002  # ... first-item added latency p99 <= max_wait + 2 ms ...
OVERHEAD_TARGET_US = 20.0  # ... and at most 20 us added per item

Item = tuple[int, float]  # (id, arrival time from time.perf_counter())
Provider = Callable[[list[Item]], Coroutine[Any, Any, list[int]]]


# -- overhead ----------------------------------------------------------------------------------------------


async def _identity(items: list[int]) -> list[int]:
    return items


async def _one(item: int) -> int:
    return item


@dataclass
class OverheadContender:
    """One way of getting ``items`` through the batch function, timed per item."""

    name: str
    run: Callable[[list[int]], Awaitable[list[int]]]
    ours: bool = False
    per_item: Series = field(default_factory=Series)


def overhead_contenders(max_size: int) -> list[OverheadContender]:
    """The contenders of the overhead measurement, each with its own batcher or loader."""
    ours = batched(max_size=max_size, max_wait=0.005, dedupe=False)(_identity)
    keyed = batched(max_size=max_size, max_wait=0.005)(_identity)

    async def direct(items: list[int]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(items), max_size):
            out += await _identity(items[start:start + max_size])
        return out

    async def many(items: list[int]) -> list[int]:
        return await ours.many(items)

    async def per_item(items: list[int]) -> list[int]:
        return list(await asyncio.gather(*(ours(i) for i in items)))

    async def per_item_dedupe(items: list[int]) -> list[int]:
        return list(await asyncio.gather(*(keyed(i) for i in items)))

    async def plain(items: list[int]) -> list[int]:
        return list(await asyncio.gather(*(_one(i) for i in items)))

    def loader() -> DataLoader[int, int]:
        return DataLoader(_identity, max_batch_size=max_size, cache=False)

    async def dataloader_many(items: list[int]) -> list[int]:
        return list(await loader().load_many(items))

    async def dataloader_per_item(items: list[int]) -> list[int]:
        dl = loader()

        async def call(i: int) -> int:
            return int(await dl.load(i))

        return list(await asyncio.gather(*(call(i) for i in items)))

    return [
        OverheadContender("direct: the batch function on lists", direct),
        OverheadContender("cachelayers many()", many, ours=True),
        OverheadContender("cachelayers per item (task per caller)", per_item, ours=True),
        OverheadContender("cachelayers per item, dedupe on", per_item_dedupe, ours=True),
        OverheadContender("aiodataloader load_many", dataloader_many),
        OverheadContender("aiodataloader per item (task per caller)", dataloader_per_item),
        OverheadContender("gather of plain calls (no batching)", plain),
    ]


async def measure_overhead(contender: OverheadContender, items: list[int], repeat: int) -> float:
    """CPU microseconds per item of ``repeat`` passes over ``items``, the GC off while timing.

    CPU time of the process rather than wall time: on a shared machine, time spent descheduled is not the
    contender's cost (everything here runs on the event loop's one thread, without I/O).
    """
    with gc_paused():
        start = time.process_time()
        for _ in range(repeat):
            result = await contender.run(items)
        elapsed = time.process_time() - start
    if result != items:
        raise AssertionError(f"{contender.name} returned wrong results")
    return elapsed / (repeat * len(items)) * 1e6


# -- load --------------------------------------------------------------------------------------------------


@dataclass
class LoadRun:
    """What one contender did in one round under load."""

    sizes: list[int] = field(default_factory=list)
    first_waits: list[float] = field(default_factory=list)  # per batch: start - first item's arrival
    latencies: list[float] = field(default_factory=list)  # per item: answer - arrival
    lags: list[float] = field(default_factory=list)  # per arrival tick: how late the driver's 1 ms sleep woke
    items: int = 0
    seconds: float = 0.0


@dataclass
class LoadContender:
    """One way of serving the offered load, and its rounds."""

    name: str
    make: Callable[[Provider], Callable[[Item], Awaitable[int]]]
    ours: bool = False
    load_factor: float = 1.0  # times the offered load (the timer-driven row runs at a fraction of it)
    runs: list[LoadRun] = field(default_factory=list)


def load_contenders(max_size: int, max_wait: float, load: float, light: float) -> list[LoadContender]:
    """The contenders of the load measurement; ``make`` wraps a fresh provider per round."""

    def ours(provider: Provider) -> Callable[[Item], Awaitable[int]]:
        return batched(max_size=max_size, max_wait=max_wait, dedupe=False)(provider)

    def dataloader(provider: Provider) -> Callable[[Item], Awaitable[int]]:
        dl: DataLoader[Item, int] = DataLoader(provider, max_batch_size=max_size, cache=False)

        async def call(item: Item) -> int:
            return int(await dl.load(item))

        return call

    def singles(provider: Provider) -> Callable[[Item], Awaitable[int]]:
        async def call(item: Item) -> int:
            return (await provider([item]))[0]

        return call

    return [
        LoadContender(f"cachelayers @batched(max_size={max_size}, max_wait={max_wait * 1000:g}ms)", ours, ours=True),
        LoadContender(f"aiodataloader (max_batch_size={max_size})", dataloader),
        LoadContender("asyncio.gather of single calls", singles),
        # Not a peer: the same batcher at a light load, where batches go by their timer rather than full.
        LoadContender(f"cachelayers, same, light load (timer-driven) [{light:g}x]", ours, load_factor=light / load),
    ]


async def run_load(contender: LoadContender, rate: float, duration: float, latency: float) -> LoadRun:
    """Offer ``rate`` items per second for ``duration`` seconds; return what happened."""
    run = LoadRun()

    async def provider(items: list[Item]) -> list[int]:
        started = time.perf_counter()
        run.sizes.append(len(items))
        run.first_waits.append(started - min(arrived for _, arrived in items))
        await asyncio.sleep(latency)
        return [n for n, _ in items]

    call = contender.make(provider)

    async def caller(n: int) -> None:
        arrived = time.perf_counter()
        if await call((n, arrived)) != n:
            raise AssertionError(f"{contender.name}: wrong result for item {n}")
        run.latencies.append(time.perf_counter() - arrived)

    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()  # only the callers still waiting: finished ones are freed at once
    spawned = 0
    gc.collect()
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration:
        for n in range(spawned, int(rate * elapsed) + 1):
            task = loop.create_task(caller(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            spawned += 1
        tick = time.perf_counter()
        await asyncio.sleep(0.001)
        run.lags.append(time.perf_counter() - tick - 0.001)
    while pending:
        await asyncio.gather(*pending)
    run.seconds = time.perf_counter() - start
    run.items = spawned
    return run


def summarise(run: LoadRun, max_size: int) -> dict[str, float]:
    """The figures of one round."""
    mean_size = sum(run.sizes) / len(run.sizes)
    return {
        "calls": float(len(run.sizes)),
        "items": float(run.items),
        "mean_size": mean_size,
        "fill_ratio": mean_size / max_size,
        "first_wait_p50_ms": percentile(run.first_waits, 50) * 1000,
        "first_wait_p99_ms": percentile(run.first_waits, 99) * 1000,
        "latency_p50_ms": percentile(run.latencies, 50) * 1000,
        "latency_p99_ms": percentile(run.latencies, 99) * 1000,
        "loop_lag_p99_ms": percentile(run.lags, 99) * 1000,
        "rate": run.items / run.seconds,
    }


# -- the run -----------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure overhead and load, every contender once per round, interleaved."""
    rng = random.Random(args.seed)
    items = list(range(args.items - args.items % args.max_size))
    overhead = overhead_contenders(args.max_size)
    for c in overhead:  # untimed: warm up and check results
        await measure_overhead(c, items, 1)
    rate = args.load * args.max_size / args.max_wait
    load = load_contenders(args.max_size, args.max_wait, args.load, args.light_load)
    for order in interleaved(overhead, args.rounds, rng):
        for c in order:
            c.per_item.samples.append(await measure_overhead(c, items, args.repeat))
        for lc in shuffled(load, rng):
            lc.runs.append(await run_load(lc, rate * lc.load_factor, args.duration, args.latency))

    floor, plain = overhead[0], overhead[-1]
    overhead_results: dict[str, dict[str, Any]] = {
        c.name: {"best_us": c.per_item.best, "median_us": c.per_item.median,
                 "ratio_to_direct": c.per_item.median_ratio(floor.per_item),
                 "ratio_to_plain_gather": c.per_item.median_ratio(plain.per_item),
                 "added_best_us": min(m - f for m, f in zip(c.per_item.samples, floor.per_item.samples, strict=True)),
                 "added_median_us": statistics.median(
                     m - f for m, f in zip(c.per_item.samples, floor.per_item.samples, strict=True)),
                 "samples_us": c.per_item.samples}
        for c in overhead
    }
    load_results: dict[str, Any] = {}
    for lc in load:
        rounds = [summarise(r, args.max_size) for r in lc.runs]
        load_results[lc.name] = {
            "median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
            "best": {k: (min if k.endswith("_ms") or k == "calls" else max)(r[k] for r in rounds) for k in rounds[0]},
            "rounds": rounds,
        }
    ours_load = load_results[load[0].name]
    per_item = overhead_results["cachelayers per item (task per caller)"]
    latency_cap_ms = (args.max_wait + LATENCY_SLACK) * 1000
    targets: dict[str, dict[str, Any]] = {
        f"fill ratio >= {FILL_TARGET:.0%}": {
            "best": ours_load["best"]["fill_ratio"], "median": ours_load["median"]["fill_ratio"],
            "ok": ours_load["median"]["fill_ratio"] >= FILL_TARGET},
        f"first-item added latency p99 <= max_wait + {LATENCY_SLACK * 1000:g} ms = {latency_cap_ms:g} ms": {
            "best": ours_load["best"]["first_wait_p99_ms"], "median": ours_load["median"]["first_wait_p99_ms"],
            "ok": ours_load["median"]["first_wait_p99_ms"] <= latency_cap_ms},
        f"overhead per item (per-item calls - direct) <= {OVERHEAD_TARGET_US:g} us": {
            "best": per_item["added_best_us"], "median": per_item["added_median_us"],
            "ok": per_item["added_median_us"] <= OVERHEAD_TARGET_US},
    }
    return {
        "benchmark": "micro-batching: per-item overhead, and fill ratio and added latency under load",
        "environment": environment(PEER_PACKAGES),
        "config": {"rounds": args.rounds, "items": len(items), "repeat": args.repeat, "max_size": args.max_size,
                   "max_wait_s": args.max_wait, "load": args.load, "rate_per_s": rate, "duration_s": args.duration,
                   "provider_latency_s": args.latency, "seed": args.seed},
        "overhead": overhead_results,
        "load": load_results,
        "targets": targets,
    }


def render(document: dict[str, Any]) -> str:
    """The human-readable report: environment, both tables, the targets."""
    config = document["config"]
    lines = report_head(
        document,
        f"{config['rounds']} interleaved rounds; best and median round shown.",
        "",
        f"Overhead: {config['items']:,} items x {config['repeat']} per round, batches of {config['max_size']}, "
        "a batch function that returns at once. CPU us per item; x direct: median over rounds of the per-round "
        "ratio;",
        "x plain: the same against the gather of plain calls (the callers' own tasks); added: contender - direct, "
        "per item (median round).",
    )
    rows = [[name, f"{r['best_us']:.2f}", f"{r['median_us']:.2f}", f"{r['ratio_to_direct']:.0f}",
             f"{r['ratio_to_plain_gather']:.2f}", f"{r['added_median_us']:.2f}"]
            for name, r in document["overhead"].items()]
    lines.append(render_table(["contender", "us/item best", "median", "x direct", "x plain", "added us/item"], rows))
    lines += [
        "",
        f"Load: {config['load']:g} x max_size / max_wait = {config['rate_per_s']:,.0f} items/s for "
        f"{config['duration_s']:g} s, arrivals every 1 ms, provider latency {config['provider_latency_s'] * 1000:g} ms "
        "per call (median round; calls x: relative to cachelayers).",
    ]
    ours_calls = next(iter(document["load"].values()))["median"]["calls"]
    rows = []
    for name, r in document["load"].items():
        m = r["median"]
        same_load = m["items"] > 0.8 * next(iter(document["load"].values()))["median"]["items"]
        rows.append([name, f"{m['items']:,.0f}", f"{m['calls']:,.0f}",
                     f"{m['calls'] / ours_calls:.1f}" if same_load else "-",
                     f"{m['mean_size']:.1f}", f"{m['fill_ratio']:.1%}", f"{m['first_wait_p50_ms']:.2f}",
                     f"{m['first_wait_p99_ms']:.2f}", f"{m['latency_p50_ms']:.2f}", f"{m['latency_p99_ms']:.2f}",
                     f"{m['loop_lag_p99_ms']:.2f}"])
    lines.append(render_table(["contender", "items", "calls", "calls x", "mean size", "fill", "1st wait p50 ms",
                               "p99 ms", "latency p50 ms", "p99 ms", "loop lag p99 ms"], rows))
    lines += ["loop lag: how late the load driver's 1 ms sleeps woke (the machine's and the loop's stalls, which every "
              "wait above includes)."]
    lines += target_lines("acceptance targets (cachelayers; pass/fail on the median round):", document["targets"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--items", type=int, default=4096, help="items per overhead pass (default 4096)")
    parser.add_argument("--repeat", type=int, default=5, help="overhead passes per round (default 5)")
    parser.add_argument("--max-size", type=int, default=32, help="max_size of a batch (default 32)")
    parser.add_argument("--max-wait", type=float, default=0.005, help="max_wait in seconds (default 0.005)")
    parser.add_argument("--load", type=float, default=2.0,
                        help="offered load as a multiple of max_size / max_wait items per second (default 2)")
    parser.add_argument("--light-load", type=float, default=0.25,
                        help="load of the timer-driven row, as a multiple of max_size / max_wait (default 0.25)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of load per contender (default 2)")
    parser.add_argument("--latency", type=float, default=0.002, help="provider latency per call (default 0.002)")
    add_common_arguments(parser, seed=True)
    args = parser.parse_args(argv)
    document = asyncio.run(run(args))
    emit(document, args.json, render)
    return exit_status(args.check, missed(document["targets"]))


if __name__ == "__main__":
    sys.exit(main())
