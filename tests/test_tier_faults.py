"""Faults of real tiers: Redis or memcached killed mid-flight, every stored entry damaged, a hung Redis, lost
pub/sub.

Each test runs against a server of its own (``own_redis``, ``own_memcached``) that it kills, pauses and
restarts; the kill, damage and signing tests run on both shared tiers. The
promise under test: a cache failure never fails a call, never returns a wrong value, and costs a call at most
one tier timeout; the tier is used again soon after it comes back.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cachelayers import Settings, StoreItem, TieredCache, multilevel_cached
from tests.memcached_server import MemcachedServer
from tests.redis_server import RedisServer
from tests.tier_factories import eventually

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    """The Redis and memcached tiers are asyncio-only."""
    return "asyncio"


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("memcached", marks=pytest.mark.memcached)])
def own_shared(request: pytest.FixtureRequest) -> tuple[str, RedisServer | MemcachedServer]:
    """A shared tier's kind and a server of the test's own (Redis or memcached)."""
    kind = str(request.param)
    server: RedisServer | MemcachedServer = request.getfixturevalue(f"own_{kind}")
    return kind, server


def expected(x: int) -> dict[str, Any]:
    return {"x": x, "square": x * x, "pad": bytes(x % 50)}


async def test_shared_tier_killed_with_1000_calls_in_flight(own_shared: tuple[str, RedisServer | MemcachedServer]
                                                           ) -> None:
    """0 failed calls, 0 wrong values; after a restart, hits of the tier resume within 5 s (the breaker closes)."""
    kind, server = own_shared
    cache = TieredCache(Settings(tiers={kind: server.url}))  # that tier only: every call goes to it
    computed = 0

    @multilevel_cached(cache=cache, name="killed")
    async def value(x: int) -> dict[str, Any]:
        nonlocal computed
        computed += 1
        await anyio.sleep(0.005 * (x % 5))
        return expected(x)

    for x in range(0, 300, 3):  # some entries are in Redis already, so the calls are reads, writes and computes
        await value(x)
    results: dict[int, Any] = {}
    failures: list[BaseException] = []

    async def call(i: int) -> None:
        x = i % 300
        try:
            results[i] = await value(x)
        except BaseException as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for wave in range(10):
            for i in range(wave * 100, wave * 100 + 100):
                tg.start_soon(call, i)
            await anyio.sleep(0.01)
            if wave == 4:
                server.kill()
    assert failures == []
    assert len(results) == 1000
    assert all(results[i] == expected(i % 300) for i in results)
    stats = cache.tier_stats()[kind]
    assert stats["errors"] + stats["timeouts"] + stats["skipped"] > 0  # it did fail under them

    server.start()
    restarted = time.monotonic()
    hits_before = cache.tier_stats()[kind]["hits"]
    x = 10_000
    with anyio.fail_after(5):
        while cache.tier_stats()[kind]["hits"] == hits_before:
            x += 1
            assert await value(x) == expected(x)  # stored, if the tier is back ...
            assert await value(x) == expected(x)  # ... and then read from it
            await anyio.sleep(0.05)
    assert time.monotonic() - restarted < 5
    assert cache.tier_stats()[kind]["breaker"] == "closed"
    await cache.aclose()


@pytest.mark.disk
async def test_every_damaged_entry_in_a_shared_tier_and_on_disk_is_counted_and_never_served(
        own_shared: tuple[str, RedisServer | MemcachedServer], tmp_path: Path) -> None:
    """Random bytes, truncation, another entry's bytes: 0 served, all counted, all deleted."""
    kind, server = own_shared
    settings = Settings(tiers={kind: server.url, "disk": f"disk://{tmp_path}/d"})
    writer = TieredCache(settings)
    computed: list[int] = []

    async def compute(x: int) -> dict[str, Any]:
        computed.append(x)
        return expected(x)

    write = multilevel_cached(cache=writer, name="damaged")(compute)
    keys = range(60)
    for x in keys:
        await write(x)
    storage = [write.cache._prefix + write.cache._keys.storage_digest(write.cache._keys.local((x,), {}))
               for x in keys]
    rng = random.Random(7)
    for tier in writer.tiers:
        blobs = await tier.backend.get_many(storage)
        damaged: list[StoreItem] = []
        for i, (key, blob) in enumerate(zip(storage, blobs, strict=True)):
            assert blob is not None
            damage = i % 3
            if damage == 0:
                bad = os.urandom(len(blob))
            elif damage == 1:
                bad = blob[: rng.randrange(len(blob))]
            else:
                other = blobs[(i + 1) % len(blobs)]  # intact, but another entry's
                assert other is not None
                bad = other
            damaged.append(StoreItem(key, bad, None))
        await tier.backend.set_many(damaged)
    await writer.aclose()

    computed.clear()
    reader = TieredCache(settings)
    read = multilevel_cached(cache=reader, name="damaged")(compute)
    assert [await read(x) for x in keys] == [expected(x) for x in keys]
    assert computed == list(keys)  # not one damaged entry was served
    stats = reader.tier_stats()
    assert stats[kind]["corrupt"] == len(keys)
    assert stats["disk"]["corrupt"] == len(keys)
    assert stats[kind]["hits"] == stats["disk"]["hits"] == 0
    # The damaged entries were deleted and replaced by the recomputed ones.
    for tier in reader.tiers:
        for key, blob in zip(storage, await tier.backend.get_many(storage), strict=True):
            assert blob is not None
            reader.codec.open(key, blob)
    await reader.aclose()


async def test_unsigned_entries_are_never_served_when_a_secret_is_set(
        own_shared: tuple[str, RedisServer | MemcachedServer]) -> None:
    kind, server = own_shared
    unsigned = TieredCache(Settings(tiers={kind: server.url}))
    signed = TieredCache(Settings(tiers={kind: server.url}, secret="a-secret-of-16-bytes-or-more"))
    made_by: list[str] = []

    def fn(who: str) -> Any:
        async def compute(x: int) -> str:
            made_by.append(who)
            return who

        return multilevel_cached(cache=unsigned if who == "unsigned" else signed, name="sig")(compute)

    assert await fn("unsigned")(1) == "unsigned"
    assert await fn("signed")(1) == "signed"
    assert signed.tier_stats()[kind]["corrupt"] == 1
    assert await fn("unsigned")(1) == "unsigned"  # and the signed entry is foreign to an unsigned reader
    assert unsigned.tier_stats()[kind]["corrupt"] == 1
    assert made_by == ["unsigned", "signed", "unsigned"]
    await unsigned.aclose()
    await signed.aclose()


@pytest.mark.redis
async def test_a_hung_redis_costs_a_call_at_most_one_timeout(own_redis: RedisServer) -> None:
    """SIGSTOPped Redis: calls return within tier timeout + compute time (and soon without the timeout)."""
    timeout, compute = 0.25, 0.05
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": own_redis.url}, tier_timeout=timeout))

    @multilevel_cached(cache=cache, name="hung")
    async def value(x: int) -> dict[str, Any]:
        await anyio.sleep(compute)
        return expected(x)

    await value(0)  # warm: connections open, invalidation listener subscribed
    own_redis.pause()
    try:
        durations: list[float] = []

        async def call(x: int) -> None:
            started = time.monotonic()
            assert await value(x) == expected(x)
            durations.append(time.monotonic() - started)

        for x in range(1, 9):  # one after another: the breaker opens after 5 timeouts
            await call(x)
        async with anyio.create_task_group() as tg:  # and many at once
            for x in range(100, 150):
                tg.start_soon(call, x)
        slack = 0.2  # scheduling on a busy machine
        assert max(durations) < timeout + compute + slack, durations
        assert cache.tier_stats()["redis"]["breaker"] == "open"
        # Once the breaker is open, the hung tier costs nothing at all.
        assert max(durations[5:8]) < compute + slack
    finally:
        own_redis.resume()
    await cache.aclose()


@pytest.mark.redis
async def test_a_failing_tier_is_logged_once_when_it_fails_and_once_when_it_recovers(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    cache = TieredCache(Settings(tiers={"redis": own_redis.url}, breaker_cooldown=0.2))

    @multilevel_cached(cache=cache, name="logged")
    async def value(x: int) -> int:
        return x

    await value(1)
    own_redis.kill()
    with caplog.at_level(logging.WARNING, logger="cachelayers"):
        for x in range(40):
            assert await value(x) == x
            await anyio.sleep(0.01)
        own_redis.start()
        with anyio.fail_after(5):
            while cache.tier_stats()["redis"]["breaker"] != "closed" or \
                    not any("recovered" in r.getMessage() for r in caplog.records):
                await value(0)
                await anyio.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records if "tier 'redis'" in r.getMessage()]
    assert len([m for m in messages if "failing" in m]) == 1, messages
    assert len([m for m in messages if "recovered" in m]) == 1, messages
    await cache.aclose()


@pytest.mark.redis
async def test_after_a_lost_subscription_the_memory_tier_starts_over(own_redis: RedisServer) -> None:
    """Invalidations published while a process was disconnected are lost to it: it drops its memory tier."""
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": own_redis.url}))

    @multilevel_cached(cache=cache, name="resync")
    async def value(x: int) -> int:
        return x

    for x in range(5):
        await value(x)
    assert cache.local is not None
    assert len(cache.local) == 5
    own_redis.kill()
    own_redis.start()
    local, listener = cache.local, cache.listener
    assert listener is not None
    await eventually(lambda: not len(local), 10, 0.02)
    await eventually(lambda: listener.subscribed, 10, 0.02)
    await cache.aclose()


@pytest.fixture
async def redis_only(own_redis: RedisServer) -> AsyncIterator[TieredCache]:
    cache = TieredCache(Settings(tiers={"redis": own_redis.url}))
    yield cache
    await cache.aclose()


@pytest.mark.redis
async def test_a_lock_tier_that_is_down_does_not_stop_the_call(redis_only: TieredCache,
                                                               own_redis: RedisServer) -> None:
    @multilevel_cached(cache=redis_only, name="lockdown", lock=True)
    async def value(x: int) -> int:
        return x * 3

    own_redis.kill()
    assert await value(2) == 6
    assert await value(2) == 6
