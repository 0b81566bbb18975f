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

Run ``python benchmarks/bench_redis.py`` (``--json``, ``--check`` to exit 1 when a target is missed).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
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
    contenders: list[Contender] = []
    notes: list[str] = []
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
    return {
        "benchmark": "Redis tier: hit, 100-key batch, 100 concurrent callers",
        "environment": environment(PEER_PACKAGES),
        "config": {"rounds": args.rounds, "repeat": args.repeat, "keys": KEYS, "value_bytes": VALUE_SIZE,
                   "seed": args.seed},
        "notes": notes,
        "results": results,
        "targets": targets,
    }


def render(document: dict[str, Any]) -> str:
    config = document["config"]
    lines = report_head(
        document,
        f"{config['rounds']} interleaved rounds; {config['keys']} keys of {config['value_bytes']} bytes; "
        "ns per call (batch: per 100-key call); x floor = median over rounds of (contender / floor that round).",
        "",
    )
    rows = []
    for name, r in document["results"].items():
        row = [name]
        for kind in ("hit", "batched", "concurrent"):
            row += ratio_cells(r[kind]) if kind in r else ["-", "-", "-"]
        rows.append(row)
    lines.append(render_table(["contender", "hit best", "hit median", "x floor", "batch best", "batch median",
                               "x floor", "100 concurrent best", "median", "x floor"], rows))
    lines += problem_lines(document["results"])
    lines += target_lines("acceptance targets (cachelayers):", document["targets"])
    lines += [f"note: {n}" for n in document["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the keys per measurement (default 3)")
    add_common_arguments(parser, seed=True)
    args = parser.parse_args(argv)
    if min(args.rounds, args.repeat) <= 0:
        parser.error("--rounds and --repeat must be positive")
    with RedisServer() as server:
        document = asyncio.run(run(args, server.url))
    emit(document, args.json, render)
    return exit_status(args.check, missed(document["targets"]),
                       any(r["problems"] for r in document["results"].values()))


if __name__ == "__main__":
    sys.exit(main())
