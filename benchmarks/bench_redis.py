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
import gc
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _util import Series, environment, environment_line, render_table, target_line, to_json
from cachelayers import Settings, TieredCache, multilevel_cached

HIT_TARGET = 1.1  # acceptance: a Redis-tier hit at most 1.1x a raw GET ...
BATCH_TARGET = 1.1  # ... a 100-key batch at most 1.1x a raw MGET ...
CONCURRENT_TARGET = 3.0  # ... and 100 concurrent callers at least 3x the throughput of one GET per call
PEER_PACKAGES = ("cachelayers", "redis", "cashews", "aiocache")
KEYS = 100
VALUE_SIZE = 200


def value_of(x: int) -> str:
    return f"{x:08d}" + "v" * (VALUE_SIZE - 8)


# -- a redis-server of our own --------------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence, for the length of the benchmark."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed (scripts/ensure-redis installs it)")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"redis-server did not start on port {self.port}")

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


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


async def timed(action: Callable[[], Awaitable[Any]], repeat: int) -> float:
    """ns per repetition of ``action``, GC off while timing."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(repeat):
            await action()
        return (time.perf_counter_ns() - start) / repeat
    finally:
        gc.enable()


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
    for _ in range(args.rounds):
        for c in rng.sample(contenders, len(contenders)):
            before = c.computed[0]
            if c.one is not None:
                one = c.one
                order = rng.sample(keys, len(keys))

                async def sequential(one: Callable[[int], Awaitable[Any]] = one, order: list[int] = order) -> None:
                    for x in order:
                        await one(x)

                c.hit.samples.append(await timed(sequential, args.repeat) / len(keys))

                async def together(one: Callable[[int], Awaitable[Any]] = one) -> None:
                    await asyncio.gather(*(one(x) for x in keys))

                c.concurrent.samples.append(await timed(together, args.repeat) / len(keys))
            if c.batch is not None:
                batch = c.batch

                async def whole(batch: Callable[[list[int]], Awaitable[Any]] = batch) -> None:
                    await batch(keys)

                c.batched.samples.append(await timed(whole, args.repeat * 3))
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
                entry[kind] = {"best_ns": series.best, "median_ns": series.median,
                               "ratio_to_floor": series.median_ratio(getattr(floor, kind)),
                               "samples_ns": series.samples}
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
    env, config = document["environment"], document["config"]
    lines = [
        document["benchmark"],
        environment_line(env),
        f"{config['rounds']} interleaved rounds; {config['keys']} keys of {config['value_bytes']} bytes; "
        "ns per call (batch: per 100-key call); x floor = median over rounds of (contender / floor that round).",
        "",
    ]
    rows = []
    for name, r in document["results"].items():
        row = [name]
        for kind in ("hit", "batched", "concurrent"):
            if kind in r:
                row += [f"{r[kind]['best_ns']:,.0f}", f"{r[kind]['median_ns']:,.0f}",
                        f"{r[kind]['ratio_to_floor']:.2f}"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    lines.append(render_table(["contender", "hit best", "hit median", "x floor", "batch best", "batch median",
                               "x floor", "100 concurrent best", "median", "x floor"], rows))
    problems = [f"  {name}: {p}" for name, r in document["results"].items() for p in r["problems"]]
    if problems:
        lines += ["", "PROBLEMS (these figures are not comparable):", *problems]
    lines += ["", "acceptance targets (cachelayers):"]
    for check_name, outcome in document["targets"].items():
        lines.append(target_line(check_name, outcome["ok"], outcome["value"]))
    lines += [f"note: {n}" for n in document["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the keys per measurement (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the contender order (default 1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when an acceptance target is missed")
    args = parser.parse_args(argv)
    if min(args.rounds, args.repeat) <= 0:
        parser.error("--rounds and --repeat must be positive")
    with RedisServer() as server:
        document = asyncio.run(run(args, server.url))
    print(to_json(document) if args.json else render(document))
    failed = any(not o["ok"] for o in document["targets"].values())
    broken = any(r["problems"] for r in document["results"].values())
    return 1 if args.check and (failed or broken) else 0


if __name__ == "__main__":
    sys.exit(main())
