"""One process, several event loops in a row (``asyncio.run`` twice) on a Redis tier: invalidations stay heard.

The invalidation listener runs in the loop that started it; when that loop ends, the next loop must start it
again and reload the invalidation epochs before it trusts a stamp, with or without a memory tier.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from cachelayers import Settings, TieredCache, multilevel_cached
from cachelayers.engines.sync import run


def _engine(redis_url: str, memory: bool) -> TieredCache:
    tiers = {"memory": "memory://", "redis": redis_url} if memory else {"redis": redis_url}
    return TieredCache(Settings(tiers=tiers, key_prefix="loops:"))


def _function(engine: TieredCache, calls: list[str], version: list[str]) -> Any:
    @multilevel_cached(ttl=600, name="loops.f", cache=engine)
    async def f(x: int) -> str:
        calls.append(version[0])
        return version[0]

    return f


def test_a_second_event_loop_without_memory_tier_still_caches_after_its_own_invalidation(redis_url: str) -> None:
    engine = _engine(redis_url, memory=False)
    calls: list[str] = []
    f = _function(engine, calls, ["v"])

    async def session() -> int:
        calls.clear()
        await f.invalidate(1)
        for _ in range(4):
            assert await f(1) == "v"
        return len(calls)

    assert asyncio.run(session()) == 1
    assert asyncio.run(session()) == 1  # was 4: stamped older than its own invalidation, every entry refused
    asyncio.run(engine.aclose())


@pytest.mark.parametrize("memory", [False, True], ids=["redis-only", "memory+redis"])
def test_a_second_event_loop_hears_another_process_and_refuses_its_old_bytes(redis_url: str, memory: bool) -> None:
    raw = redis.Redis.from_url(redis_url)
    engine, other = _engine(redis_url, memory), _engine(redis_url, memory)  # other: as another process
    calls: list[str] = []
    version = ["v1"]
    f, f_elsewhere = _function(engine, calls, version), _function(other, [], version)

    async def session(x: int) -> str:
        version[0] = "v1"
        before = set(raw.keys("loops:*"))
        assert await f(x) == "v1"
        (key,) = {k for k in set(raw.keys("loops:*")) - before if b"~" not in k}  # not the tag keys
        old, ttl = raw.get(key), raw.pttl(key)
        assert old is not None
        await f_elsewhere.invalidate(x)
        await asyncio.sleep(0.2)  # the message reaches this engine's listener
        raw.set(key, old, px=ttl)  # the old bytes come back (a replayed write, a lagging writer)
        version[0] = "v2"
        return str(await f(x))

    assert asyncio.run(session(1)) == "v2"
    assert asyncio.run(session(2)) == "v2"  # was "v1" without a memory tier: the old entry served
    for each in (engine, other):
        asyncio.run(each.aclose())


@pytest.mark.parametrize("memory", [False, True], ids=["redis-only", "memory+redis"])
def test_plain_and_async_functions_in_two_loops_share_one_subscription(redis_url: str, memory: bool) -> None:
    """A plain function runs on the library's loop, an async one on the application's: the listener stays in
    the first loop that started it while that loop runs, rather than moving (and leaving a subscription open)
    at every call from the other; and each loop keeps its own Redis pool."""
    raw = redis.Redis.from_url(redis_url)
    engine = _engine(redis_url, memory)

    @multilevel_cached(ttl=600, name="loops.plain", cache=engine)
    def plain(x: int) -> int:
        return x

    @multilevel_cached(ttl=600, name="loops.coro", cache=engine)
    async def coro(x: int) -> int:
        return x

    def subscribers() -> int:
        ((_, count),) = raw.pubsub_numsub("loops:~events")
        return int(count)

    async def session() -> list[int]:
        seen = []
        for i in range(30):
            assert await asyncio.to_thread(plain, i % 3) == i % 3  # misses, then hits, in the library loop
            assert await coro(i % 3) == i % 3  # and in this one
            seen.append(subscribers())
        await engine.aclose()  # this loop's connections
        return seen

    before = subscribers()  # engines of earlier tests may still be closing theirs
    connections = int(raw.info("stats")["total_connections_received"])
    try:
        assert set(asyncio.run(session())) == {before + 1}
        # each loop keeps its pool: was a new connection at nearly every call (about 60), the other loop's
        # pool dropped and its sockets left to the garbage collector of the wrong thread
        assert int(raw.info("stats")["total_connections_received"]) - connections <= 8
    finally:
        run(engine.aclose)  # on the library's loop, where the listener runs
