"""The Redis tier: a hit of a cached ``async def f(x: int)`` with Redis as the only tier, a 100-key batch, and
throughput under 100 concurrent callers; cachelayers against raw redis-py and peers, on one redis-server.

The benchmark starts its own ``redis-server`` on a free loopback port (and stops it). Contenders, in this
process and run, measured interleaved in random order each round:

* **hit**: the floor is raw redis-py ``await r.get(key)`` of an equally large value; then
  ``@multilevel_cached`` with ``tiers={"redis": url}``, cashews (``cache.setup("redis://...")``,
  ``@cache(ttl=...)``) and aiocache (``@cached(cache=RedisCache)``). Each call awaits the previous one.
* **batch**: the floor is raw ``await r.mget(keys)`` of 100 keys; then ``@multilevel_cached(batch=True)`` on
  ``async def f(xs: list[int]) -> list[...]`` with all 100 items in Redis, and aiocache's ``multi_cached``.
* **concurrent**: 100 callers at once (``asyncio.gather``), each wanting one key: the floor is one
  ``GET`` per caller, against cachelayers, whose reads of one event-loop tick go as one ``MGET``; peers too.
  Figures are ns per call (lower is better) and the throughput gain over the floor.
* **bursts**: 2,000 and 10,000 concurrent misses (``asyncio.gather``) of a function never called before, on an
  emptied Redis: throughput of the burst (calls/s), how many results landed in Redis (keys counted on the
  server with ``SCAN``), then a second burst of the same calls from a fresh instance (for cachelayers a fresh
  memory tier, as a new process would have) and its hit rate. cachelayers runs memory + Redis with its default
  ``tier_timeout``; cashews and aiocache their Redis cache, on the same server. "x cachelayers" divides a
  peer's throughput by cachelayers's at the same size.

Run ``python benchmarks/bench_redis.py`` (``--json``, ``--check`` to exit 1 when a target is missed;
``--burst-rounds 0`` leaves the bursts out, ``--only-bursts`` runs only them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _util import (
    RedisServer,
    Series,
    add_common_arguments,
    emit,
    environment,
    exit_status,
    interleaved,
    make_parser,
    missed,
    problem_lines,
    ratio_cells,
    render_table,
    report_head,
    scenario,
    target_lines,
    time_async,
)
from cachelayers import Settings, TieredCache, multilevel_cached

HIT_TARGET = 1.1  # acceptance: a Redis-tier hit at most 1.1x a raw GET ...
BATCH_TARGET = 1.1  # ... a 100-key batch at most 1.1x a raw MGET ...
CONCURRENT_TARGET = 3.0  # ... and 100 concurrent callers at least 3x the throughput of one GET per call
PEER_PACKAGES = ("cachelayers", "redis", "cashews", "aiocache")
KEYS = 100
VALUE_SIZE = 200


def value_of(x: int) -> str:
    return f"{x:08d}" + "v" * (VALUE_SIZE - 8)


# -- contenders -----------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One way of getting values out of Redis; ``one`` serves a key, ``batch`` a list of keys."""

    name: str
    one: Callable[[int], Awaitable[Any]] | None = None
    batch: Callable[[list[int]], Awaitable[Any]] | None = None
    ours: bool = False
    floor: bool = False
    computed: list[int] = field(default_factory=lambda: [0])
    hit: Series = field(default_factory=Series)
    batched: Series = field(default_factory=Series)
    concurrent: Series = field(default_factory=Series)
    problems: list[str] = field(default_factory=list)
    close: Callable[[], Awaitable[None]] | None = None


async def make_raw(url: str) -> Contender:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(url)
    await client.mset({f"raw:{x}": value_of(x).encode() for x in range(KEYS)})

    async def one(x: int) -> Any:
        return await client.get(f"raw:{x}")

    async def batch(xs: list[int]) -> Any:
        return await client.mget([f"raw:{x}" for x in xs])

    return Contender("floor: raw redis-py GET / MGET", one, batch, floor=True, close=client.aclose)


async def make_cachelayers(url: str) -> Contender:
    # The tier timeout as long as redis-py's socket timeout (the floor's): on a loaded machine a slow reply must
    # be measured, not turned into a miss.
    cache = TieredCache(Settings(tiers={"redis": url}, tier_timeout="5s"))
    contender = Contender("cachelayers (Redis tier only)", ours=True, close=cache.aclose)
    computed = contender.computed

    @multilevel_cached(ttl="1h", cache=cache, name="bench.one")
    async def one(x: int) -> str:
        computed[0] += 1
        return value_of(x)

    @multilevel_cached(ttl="1h", cache=cache, name="bench.batch", batch=True)
    async def batch(xs: list[int]) -> list[str]:
        computed[0] += len(xs)
        return [value_of(x) for x in xs]

    contender.one, contender.batch = one, batch
    return contender


async def make_cashews(url: str) -> Contender:
    import cashews

    cache = cashews.Cache(name="bench_redis")
    cache.setup(url, client_side=False)
    contender = Contender("cashews redis:// ttl=1h", close=cache.close)
    computed = contender.computed

    @cache(ttl="1h")
    async def one(x: int) -> str:
        computed[0] += 1
        return value_of(x)

    contender.one = one
    return contender


async def make_aiocache(url: str) -> Contender:
    import aiocache
    from aiocache.serializers import PickleSerializer

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    contender = Contender("aiocache RedisCache ttl=3600")
    computed = contender.computed
    options: dict[str, Any] = {"cache": aiocache.RedisCache, "endpoint": "127.0.0.1", "port": port,
                               "serializer": PickleSerializer(), "ttl": 3600}

    @aiocache.cached(namespace="bench_one", **options)  # type: ignore[untyped-decorator]
    async def one(x: int) -> str:
        computed[0] += 1
        return value_of(x)

    @aiocache.multi_cached(keys_from_attr="xs", namespace="bench_batch", **options)  # type: ignore[untyped-decorator]
    async def batch(xs: list[int]) -> dict[int, str]:
        computed[0] += len(xs)
        return {x: value_of(x) for x in xs}

    contender.one, contender.batch = one, batch
    return contender


FACTORIES = (make_raw, make_cachelayers, make_cashews, make_aiocache)


# -- bursts of misses -------------------------------------------------------------------------------------------

BURSTS = (2_000, 10_000)
BURST_OURS = "cachelayers memory + Redis"
Fn = Callable[[int], Awaitable[Any]]
BurstMaker = Callable[[str, list[int]], Awaitable[tuple[Fn, Callable[[], Awaitable[None]]]]]


async def burst_cachelayers(url: str, computed: list[int]) -> tuple[Fn, Callable[[], Awaitable[None]]]:
    cache = TieredCache(Settings(tiers={"memory": "memory://?max_entries=20000", "redis": url},
                                 key_prefix="burst:"))

    @multilevel_cached(ttl="1h", cache=cache, name="bench.burst")
    async def fn(x: int) -> str:
        computed[0] += 1
        await asyncio.sleep(0)
        return value_of(x)

    return fn, cache.aclose


_instances = iter(range(1_000_000))


async def burst_cashews(url: str, computed: list[int]) -> tuple[Fn, Callable[[], Awaitable[None]]]:
    import cashews

    cache = cashews.Cache(name=f"bench_burst{next(_instances)}")
    cache.setup(url, client_side=False)

    @cache(ttl="1h")
    async def fn(x: int) -> str:
        computed[0] += 1
        await asyncio.sleep(0)
        return value_of(x)

    return fn, cache.close


async def burst_aiocache(url: str, computed: list[int]) -> tuple[Fn, Callable[[], Awaitable[None]]]:
    import aiocache
    from aiocache.serializers import PickleSerializer

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    decorator = aiocache.cached(namespace="bench_burst", cache=aiocache.RedisCache, endpoint="127.0.0.1", port=port,
                                serializer=PickleSerializer(), ttl=3600)

    @decorator  # type: ignore[untyped-decorator]
    async def fn(x: int) -> str:
        computed[0] += 1
        await asyncio.sleep(0)
        return value_of(x)

    async def close() -> None:
        await decorator.cache.close()

    return fn, close


BURST_MAKERS: tuple[tuple[str, BurstMaker], ...] = (
    (BURST_OURS, burst_cachelayers),
    ("cashews redis:// ttl=1h", burst_cashews),
    ("aiocache RedisCache ttl=3600", burst_aiocache),
)


async def one_burst(fn: Fn, n: int) -> tuple[float, int]:
    """Call ``fn`` on ``range(n)`` all at once; return the seconds taken and how many calls failed or answered
    wrong."""
    started = time.perf_counter()
    results = await asyncio.gather(*(fn(x) for x in range(n)), return_exceptions=True)
    seconds = time.perf_counter() - started
    return seconds, sum(1 for x, r in enumerate(results) if r != value_of(x))


async def measure_burst(make: BurstMaker, url: str, n: int) -> dict[str, float]:
    """One burst of ``n`` misses on an emptied Redis, then ``n`` calls from a fresh instance."""
    import redis.asyncio as aredis

    raw = aredis.Redis.from_url(url)
    await raw.flushdb()
    computed = [0]
    fn, close = await make(url, computed)
    first, failed = await one_burst(fn, n)
    await close()
    landed = 0
    async for key in raw.scan_iter(count=1000):
        landed += b"~" not in key  # cachelayers's tag sets are not results
    again = [0]
    fn, close = await make(url, again)
    second, failed_again = await one_burst(fn, n)
    await close()
    await raw.aclose()
    return {"calls_per_s": n / first, "landed": landed, "failed_calls": failed + failed_again,
            "second_calls_per_s": n / second, "second_hit_rate": 1 - again[0] / n}


async def run_bursts(rounds: int, url: str, rng: random.Random, notes: list[str]) -> dict[str, Any]:
    """Every contender at every size, ``rounds`` times in random order; medians of throughput, worst of the
    rest."""
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    makers = list(BURST_MAKERS)
    # aiocache and cashews log a traceback for every operation that fails or times out under a burst: what they
    # lost shows as "landed" and the hit rate instead.
    for peer in ("aiocache", "cashews"):
        logging.getLogger(peer).setLevel(logging.CRITICAL)
    for _ in range(rounds):
        for n in BURSTS:
            for name, make in rng.sample(makers, len(makers)):
                try:
                    figures = await measure_burst(make, url, n)
                except ImportError as exc:
                    notes.append(f"skipped a peer in bursts: {exc}")
                    makers = [(k, m) for k, m in makers if k != name]
                    continue
                samples.setdefault((name, n), []).append(figures)
    results: dict[str, Any] = {}
    for (name, n), runs in samples.items():
        results[f"{name} @ {n}"] = {
            "contender": name, "n": n,
            "calls_per_s": statistics.median(r["calls_per_s"] for r in runs),
            "second_calls_per_s": statistics.median(r["second_calls_per_s"] for r in runs),
            "landed_min": min(r["landed"] for r in runs),
            "second_hit_rate_min": min(r["second_hit_rate"] for r in runs),
            "failed_calls": sum(r["failed_calls"] for r in runs),
            "runs": runs,
        }
    for entry in results.values():
        ours = results.get(f"{BURST_OURS} @ {entry['n']}")
        entry["x_cachelayers"] = entry["calls_per_s"] / ours["calls_per_s"] if ours else None
        entry["second_x_cachelayers"] = entry["second_calls_per_s"] / ours["second_calls_per_s"] if ours else None
    return results


def burst_targets(bursts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = {}
    for n in BURSTS:
        ours = bursts.get(f"{BURST_OURS} @ {n}")
        if ours is None:
            continue
        targets[f"{n:,} concurrent misses: every result lands in Redis"] = {
            "value": f"{ours['landed_min']:,} / {n:,}", "ok": ours["landed_min"] == n}
        targets[f"{n:,} concurrent misses: the next round is 100% Redis hits"] = {
            "value": ours["second_hit_rate_min"], "ok": ours["second_hit_rate_min"] == 1.0}
    return targets


def render_bursts(document: dict[str, Any]) -> list[str]:
    bursts = document.get("bursts")
    if not bursts:
        return []
    rows = []
    for entry in sorted(bursts.values(), key=lambda e: (e["n"], e["contender"] != BURST_OURS, e["contender"])):
        ratio = entry["x_cachelayers"]
        ratio2 = entry["second_x_cachelayers"]
        rows.append([entry["contender"], f"{entry['n']:,}", f"{entry['calls_per_s']:,.0f}",
                     "-" if ratio is None else f"{ratio:.2f}", f"{entry['landed_min']:,} / {entry['n']:,}",
                     f"{entry['second_calls_per_s']:,.0f}", "-" if ratio2 is None else f"{ratio2:.2f}",
                     f"{entry['second_hit_rate_min']:.1%}", f"{entry['failed_calls']:,}"])
    return ["", f"Bursts of concurrent misses ({document['config']['burst_rounds']} rounds; calls/s median, "
                "landed and hit rate the worst round):",
            render_table(["contender", "misses", "calls/s", "x cachelayers", "landed in Redis", "2nd round calls/s",
                          "x cachelayers", "2nd round hit rate", "failed calls"], rows)]


# -- measuring ------------------------------------------------------------------------------------------------


async def check(contender: Contender, keys: list[int]) -> None:
    """Warm every key and check the answers (raw redis-py answers bytes)."""
    for x in keys:
        if contender.one is not None:
            got = await contender.one(x)
            if (got.decode() if isinstance(got, bytes) else got) != value_of(x):
                contender.problems.append(f"one({x}) returned {str(got)[:40]!r}")
                return
    if contender.batch is not None:
        got = await contender.batch(keys)
        values = list(got.values()) if isinstance(got, dict) else got
        if [v.decode() if isinstance(v, bytes) else v for v in values] != [value_of(x) for x in keys]:
            contender.problems.append("batch returned wrong values")


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    notes: list[str] = []
    document: dict[str, Any] = {
        "benchmark": "Redis tier: hit, 100-key batch, 100 concurrent callers; bursts of misses",
        "environment": environment(PEER_PACKAGES),
        "config": {"rounds": args.rounds, "repeat": args.repeat, "keys": KEYS, "value_bytes": VALUE_SIZE,
                   "seed": args.seed, "burst_rounds": args.burst_rounds, "bursts": list(BURSTS)},
        "notes": notes,
        "results": {},
        "targets": {},
    }
    if not args.only_bursts:
        await run_hits(args, url, document)
    if args.burst_rounds:
        bursts = await run_bursts(args.burst_rounds, url, random.Random(args.seed), notes)
        document["bursts"] = bursts
        document["targets"].update(burst_targets(bursts))
    return document


async def run_hits(args: argparse.Namespace, url: str, document: dict[str, Any]) -> None:
    """The hit, batch and concurrent-hit scenarios: fills ``document``'s results and targets."""
    contenders: list[Contender] = []
    notes: list[str] = document["notes"]
    for factory in FACTORIES:
        try:
            contenders.append(await factory(url))
        except ImportError as exc:
            notes.append(f"skipped a peer: {exc}")
    keys = list(range(KEYS))
    rng = random.Random(args.seed)
    for c in contenders:
        await check(c, keys)
        await check(c, keys)
    for ordering in interleaved(contenders, args.rounds, rng):
        for c in ordering:
            before = c.computed[0]
            if c.one is not None:
                one = c.one
                order = rng.sample(keys, len(keys))

                async def sequential(one: Callable[[int], Awaitable[Any]] = one, order: list[int] = order) -> None:
                    for x in order:
                        await one(x)

                c.hit.samples.append(await time_async(sequential, args.repeat) / len(keys))

                async def together(one: Callable[[int], Awaitable[Any]] = one) -> None:
                    await asyncio.gather(*(one(x) for x in keys))

                c.concurrent.samples.append(await time_async(together, args.repeat) / len(keys))
            if c.batch is not None:
                batch = c.batch

                async def whole(batch: Callable[[list[int]], Awaitable[Any]] = batch) -> None:
                    await batch(keys)

                c.batched.samples.append(await time_async(whole, args.repeat * 3))
            if c.computed[0] != before:
                c.problems.append(f"computed {c.computed[0] - before} times during hits")
    for c in contenders:
        if c.close is not None:
            await c.close()

    floor = contenders[0]
    results: dict[str, Any] = {}
    for c in contenders:
        entry: dict[str, Any] = {"problems": sorted(set(c.problems))}
        for kind in ("hit", "batched", "concurrent"):
            series: Series = getattr(c, kind)
            if series.samples:
                entry[kind] = scenario(series, getattr(floor, kind))
        results[c.name] = entry
    ours = next(c for c in contenders if c.ours)
    peers = [c for c in contenders if not c.ours and not c.floor and c.hit.samples]
    hit_ratio = ours.hit.median_ratio(floor.hit)
    batch_ratio = ours.batched.median_ratio(floor.batched)
    gain = 1 / ours.concurrent.median_ratio(floor.concurrent)
    slower = [p.name for p in peers if not ours.hit.median < p.hit.median]
    targets = {
        f"hit <= {HIT_TARGET:g}x raw GET": {"value": hit_ratio, "ok": hit_ratio <= HIT_TARGET},
        "hit faster than cashews and aiocache": {"value": slower or "yes", "ok": not slower},
        f"100-key batch <= {BATCH_TARGET:g}x raw MGET": {"value": batch_ratio, "ok": batch_ratio <= BATCH_TARGET},
        f"100 concurrent callers >= {CONCURRENT_TARGET:g}x the throughput of one GET per call":
            {"value": gain, "ok": gain >= CONCURRENT_TARGET},
    }
    document["results"] = results
    document["targets"].update(targets)


def render(document: dict[str, Any]) -> str:
    config = document["config"]
    head = [] if not document["results"] else [
        f"{config['rounds']} interleaved rounds; {config['keys']} keys of {config['value_bytes']} bytes; "
        "ns per call (batch: per 100-key call); x floor = median over rounds of (contender / floor that round).",
        ""]
    lines = report_head(document, *head)
    rows = []
    for name, r in document["results"].items():
        row = [name]
        for kind in ("hit", "batched", "concurrent"):
            row += ratio_cells(r[kind]) if kind in r else ["-", "-", "-"]
        rows.append(row)
    if rows:
        lines.append(render_table(["contender", "hit best", "hit median", "x floor", "batch best", "batch median",
                                   "x floor", "100 concurrent best", "median", "x floor"], rows))
    lines += render_bursts(document)
    lines += problem_lines(document["results"])
    lines += target_lines("acceptance targets (cachelayers):", document["targets"])
    lines += [f"note: {n}" for n in document["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the keys per measurement (default 3)")
    parser.add_argument("--burst-rounds", type=int, default=3,
                        help="rounds of the bursts of misses (default 3; 0: none)")
    parser.add_argument("--only-bursts", action="store_true", help="run only the bursts of misses")
    add_common_arguments(parser, seed=True)
    args = parser.parse_args(argv)
    if min(args.rounds, args.repeat) <= 0:
        parser.error("--rounds and --repeat must be positive")
    if args.burst_rounds < 0 or (args.only_bursts and not args.burst_rounds):
        parser.error("--burst-rounds must be positive with --only-bursts, and never negative")
    with RedisServer() as server:
        document = asyncio.run(run(args, server.url))
    emit(document, args.json, render)
    return exit_status(args.check, missed(document["targets"]),
                       any(r["problems"] for r in document["results"].values()))


if __name__ == "__main__":
    sys.exit(main())
