"""A worker process for the multi-process tests: ``python -m tests.mp_worker <mode> '<json options>'``.

It prints one JSON object per line on stdout (``{"event": ...}``); the test reads them. Modes:

* ``hold``: cache one value in memory + Redis, say ``ready``, then report when the memory tier dropped it;
* ``flight``: at ``start_at``, call a slow function under the distributed lock; report its result;
* ``soak``: from ``start_at`` for ``seconds``, mixed reads, writes and invalidations over memory + Redis + disk;
  at ``settle_at`` (when every process has stopped invalidating) a last pass of reads; report counts.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from typing import Any

import anyio
import redis

from cachelayers import InvalidationError, Settings, TieredCache, multilevel_cached
from tests.tier_factories import eventually


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def expected(k: int) -> dict[str, Any]:
    """The one right value for ``k``: any other value served for ``k`` is wrong."""
    digest = hashlib.sha256(str(k).encode()).hexdigest()
    return {"k": k, "digest": digest, "pad": digest.encode() * (1 + k % 40)}


async def hold(options: dict[str, Any]) -> None:
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": options["redis"]}))

    @multilevel_cached(cache=cache, name="held")
    async def value(x: int) -> int:
        return x

    await value(1)
    assert cache.local is not None
    assert cache.listener is not None
    assert cache.listener.subscribed
    say(event="ready")
    local = cache.local
    await eventually(lambda: not len(local), 30, 0.0005)
    say(event="dropped", at=time.time())
    await cache.aclose()


async def flight(options: dict[str, Any]) -> None:
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": options["redis"]}))
    counter = redis.Redis.from_url(options["redis"])

    @multilevel_cached(cache=cache, name="flight", lock=True)
    async def slow(x: int) -> dict[str, Any]:
        counter.incr("flight:computed")  # how many processes ran it, counted where all can see
        await anyio.sleep(options["compute"])
        return {"x": x, "by": options["worker"]}

    await cache.follow_invalidations()  # connect before the start line, so that all start together
    await anyio.sleep(max(0.0, options["start_at"] - time.time()))
    started = time.monotonic()
    result = await slow(7)
    say(event="done", result=result, seconds=time.monotonic() - started)
    counter.close()
    await cache.aclose()


async def soak(options: dict[str, Any]) -> None:
    settings = Settings(tiers={"memory": "memory://?max_entries=64",
                               "redis": options["redis"],
                               "disk": f"disk://{options['disk']}?max_bytes={options['max_bytes']}"},
                        default_ttl="10m")
    cache = TieredCache(settings)
    rng = random.Random(options["worker"])
    counts = {"calls": 0, "wrong": 0, "invalidations": 0, "invalidation_errors": 0, "computed": 0}

    @multilevel_cached(cache=cache, name="soak", tags=lambda k: [f"group:{k % 7}"])
    async def value(k: int) -> dict[str, Any]:
        counts["computed"] += 1
        await anyio.sleep(rng.random() * 0.002)
        return expected(k)

    # Every process starts at `start_at` and stops at `start_at + seconds` (wall clock, shared by all), so that
    # after `settle_at` nobody invalidates any more.
    await cache.follow_invalidations()
    await anyio.sleep(max(0.0, options["start_at"] - time.time()))
    deadline = options["start_at"] + options["seconds"]

    async def client() -> None:
        while time.time() < deadline:
            k = int(rng.paretovariate(1.2)) % 400
            roll = rng.random()
            if roll < 0.85:
                counts["calls"] += 1
                if await value(k) != expected(k):
                    counts["wrong"] += 1
            else:
                counts["invalidations"] += 1
                try:
                    if roll < 0.95:
                        await value.invalidate(k)
                    elif roll < 0.99:
                        await cache.invalidate_tags(f"group:{k % 7}")
                    else:
                        await value.invalidate_all()
                except InvalidationError:  # a tier too slow under the soak: queued and replayed (issue 11)
                    counts["invalidation_errors"] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(client)
    # Settle: with every process done invalidating, read some keys once more, so that the disk the test checks
    # afterwards holds entries (a last invalidate_all of the soak may have emptied it).
    await anyio.sleep(max(0.0, options["settle_at"] - time.time()))
    for k in range(20):
        counts["calls"] += 1
        if await value(k) != expected(k):
            counts["wrong"] += 1
    tiers = cache.tier_stats()
    say(event="done", **counts, corrupt=sum(t.get("corrupt", 0) for t in tiers.values()),
        errors={name: t.get("errors", 0) + t.get("timeouts", 0) for name, t in tiers.items()},
        hits={name: t.get("hits", 0) for name, t in tiers.items()})
    await cache.aclose()


def main() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    options = json.loads(raw)
    anyio.run({"hold": hold, "flight": flight, "soak": soak}[mode], options)


if __name__ == "__main__":
    main()
