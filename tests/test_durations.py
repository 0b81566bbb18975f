"""Durations that end up in the tiers: TTLs, ``stale=`` grace periods, lock leases and limit windows.

They are bounded by `cachelayers.durations.LONGEST` (1000 years): a longer one is a `ConfigError` naming the
field when the configuration is made, since Redis refuses the write of a TTL of 1e30 s (``value is not an
integer or out of range``) and the function would never be cached there. The maximum itself is stored and
read back by every tier, a real Redis and a real memcached included (memcached is given no expiry beyond 30
days and expires the entry itself), with ``stale=`` on top and tags, and a limit of the longest window is
counted by Redis.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from cachelayers import (
    ConfigError,
    RateLimitExceeded,
    Settings,
    TieredCache,
    durations,
    multilevel_cached,
    rate_limited,
)
from tests.tier_factories import backend_params

pytestmark = pytest.mark.anyio

LONGEST = 1000 * 365 * 86400.0

TOO_LONG = [
    pytest.param(1e30, id="1e30"),
    pytest.param(LONGEST + 1, id="longest-plus-1s"),
    pytest.param("53000w", id="weeks-string"),
    pytest.param(timedelta(days=365001), id="timedelta"),
]


@pytest.fixture
def anyio_backend() -> str:
    """Redis and memcached need asyncio."""
    return "asyncio"


def test_the_longest_duration_is_1000_years_and_is_accepted() -> None:
    assert durations.LONGEST == LONGEST == timedelta(days=365000).total_seconds()
    assert durations.parse_ttl(LONGEST) == durations.parse_ttl(timedelta(days=365000)) == LONGEST
    assert durations.parse_duration(LONGEST, "stale", stored=True) == LONGEST
    assert durations.parse_duration(1e30, "tier_timeout") == 1e30  # not a lifetime in the tiers: unbounded


@pytest.mark.parametrize("ttl", TOO_LONG)
def test_a_ttl_no_tier_can_store_is_refused_naming_the_field_and_the_way_to_never_expire(ttl: Any) -> None:
    with pytest.raises(ConfigError, match=r"at most 1000 years.*use ttl=None for entries that never expire") as info:
        durations.parse_ttl(ttl)
    assert info.value.field == "ttl"
    with pytest.raises(ConfigError, match="use default_ttl=None") as info:
        durations.parse_ttl(ttl, "default_ttl")
    assert info.value.field == "default_ttl"


@pytest.mark.parametrize(("field", "value"), [("stale", 1e30), ("lock", LONGEST * 2), ("stale", "60000w")])
def test_other_lifetimes_longer_than_the_tiers_can_store_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match="at most 1000 years") as info:
        durations.parse_duration(value, field, stored=True)
    assert info.value.field == field


# -- the longest, in every tier ----------------------------------------------------------------------------------


@pytest.fixture(params=backend_params())
async def engine(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[TieredCache]:
    """An engine whose only tier is of the parameter's kind (no memory tier in front of Redis, disk or
    memcached), in strict mode: a write the tier refuses raises."""
    kind = request.param
    url = {"memory": "memory://", "disk": f"disk://{tmp_path}/disk"}.get(kind)
    if url is None:
        url = str(request.getfixturevalue(f"{kind}_url"))
    cache = TieredCache(Settings(tiers={kind: url}, key_prefix=f"longest{os.getpid()}:", strict=True))
    yield cache
    await cache.aclose()


async def test_every_tier_stores_and_serves_an_entry_of_the_longest_ttl_and_grace(engine: TieredCache) -> None:
    assert await engine.set("k", "v", ttl=LONGEST, tags=["t"])
    assert await engine.get("k") == "v"
    calls = 0

    @multilevel_cached(ttl=LONGEST, stale=LONGEST, tags=["t"], cache=engine)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    assert [await f(1), await f(1)] == [1, 1]
    assert calls == 1
    name = engine.settings.tiers[0][0]
    assert engine.tier_stats()[name]["errors"] == 0
    await engine.invalidate_tags("t")  # the tag's record lives as long as its entries
    assert await engine.get("k", "gone") == "gone"


@pytest.mark.redis
async def test_redis_keeps_the_longest_ttl_and_grace_and_a_lock_of_the_longest_lease(redis_url: str) -> None:
    import redis.asyncio as aioredis

    prefix = f"longest{os.getpid()}:"
    cache = TieredCache(Settings(tiers={"redis": redis_url}, key_prefix=prefix, strict=True))

    @multilevel_cached(ttl=LONGEST, stale=LONGEST, tags=["t"], lock=LONGEST, cache=cache)
    async def f(x: int) -> int:
        return x

    assert await f(1) == 1
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttls = {key: await client.pttl(key) async for key in client.scan_iter(f"{prefix}*")}
    finally:
        await client.aclose()
    await cache.aclose()
    assert ttls
    assert max(ttls.values()) > 2 * LONGEST * 1000 - 60_000  # the entry and its tags: ttl + stale, in ms


@pytest.mark.redis
async def test_a_ttl_function_returning_more_than_the_tiers_can_store_stores_nothing_and_breaks_no_tier(
        redis_url: str) -> None:
    """A ``ttl=`` function is only known at the call: its too long TTL is counted and logged as the function's
    error, the result is returned unstored, and Redis never sees (nor refuses) the write."""
    cache = TieredCache(Settings(tiers={"redis": redis_url}, key_prefix=f"longest{os.getpid()}:"))
    calls = 0

    @multilevel_cached(ttl=lambda result: 1e30, cache=cache)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    for _ in range(6):
        assert await f(1) == 1
    stats = cache.tier_stats()["redis"]
    await cache.aclose()
    assert calls == 6
    assert (stats["errors"], stats["writes"], stats["breaker"]) == (0, 0, "closed")


@pytest.mark.redis
@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window", "sliding-window-counter"])
async def test_redis_counts_a_limit_of_the_longest_window(redis_url: str, strategy: str) -> None:
    """``1 per 1013 year`` (limits' years are 360 days) is within ``LONGEST``; windows of thousands of years made
    Redis's scripts answer in a notation the storage cannot read."""

    @rate_limited("2 per 1013 year", storage=redis_url, strategy=strategy, timeout=0)
    async def f() -> int:
        return 1

    assert [await f(), await f()] == [1, 1]
    with pytest.raises(RateLimitExceeded) as info:
        await f()
    assert info.value.retry_after is not None
    assert info.value.retry_after > 101 * 360 * 86400 - 60
    await f.rate_limit.limiter.aclose()
