"""Bursts of concurrent misses: every result lands in the shared tier, and the next round is served from it.

On memory + Redis, 2,000 and 10,000 concurrent misses of one cached function: each result is stored in Redis
(counted on the server, by ``SCAN`` over the function's keys) and a second round with a fresh memory tier is
all Redis hits, the function never called. (Before: 102 of 2,000 landed — the pool raised
``MaxConnectionsError``, the tier counted a failure and every call in flight skipped its write, uncounted.)
Writes are coalesced into a few ``MULTI`` transactions, waiting for a connection is not a failure, and a write
that cannot be made is counted. On memory + disk, 1,000 concurrent misses land with no timeout or failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import redis

from cachelayers import BackendError, Settings, StoreItem, TieredCache, multilevel_cached
from cachelayers.backends import Backend, BackendURL
from cachelayers.backends.base import BackendBusyError, DeadlineSupport
from cachelayers.backends.memory import MemoryBackend
from cachelayers.backends.redis import RedisBackend
from cachelayers.backends.redis.writes import MAX_WRITERS
from tests.bursts import burst
from tests.redis_server import RedisServer

PREFIX = "burst:"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The Redis tier is asyncio-only (the disk and engine tests use asyncio too)."""
    return "asyncio"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking at the server behind the backend's back."""
    c = redis.Redis.from_url(redis_url)
    c.config_resetstat()
    yield c
    c.close()


def entries(client: redis.Redis, namespace: str) -> int:
    """The function's entries in Redis (its tag set left out)."""
    return sum(1 for key in client.scan_iter(match=f"{PREFIX}{namespace}:*", count=1000) if b"~tag:" not in key)


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def engine(url: str) -> TieredCache:
    return TieredCache(Settings(tiers={"memory": "memory://?max_entries=20000", "redis": url}, key_prefix=PREFIX))


@pytest.mark.redis
@pytest.mark.parametrize("n", [2_000, 10_000])
async def test_every_result_of_a_burst_of_misses_lands_in_redis(redis_url: str, client: redis.Redis,
                                                                  n: int) -> None:
    first = engine(redis_url)
    computed: list[int] = []
    results, _ = await burst(first, n, computed)
    assert results == [2 * x for x in range(n)]
    assert len(computed) == n
    stats = first.tier_stats()["redis"]
    assert (stats["writes"], stats["skipped"], stats["errors"], stats["timeouts"]) == (n, 0, 0, 0), stats
    assert first.failures == 0
    await first.aclose()
    assert entries(client, "burst") == n
    # Few transactions (one per event-loop tick, at most MAX_BATCH entries each), not one command per write.
    assert calls(client, "exec") <= 20, calls(client, "exec")
    assert calls(client, "set") == n

    # The next round, with a fresh memory tier (as a new process would have), is served from Redis.
    second = engine(redis_url)
    again: list[int] = []
    results, info = await burst(second, n, again)
    assert results == [2 * x for x in range(n)]
    assert again == []
    assert info.hits_by_tier == {"redis": n}
    assert second.failures == 0
    await second.aclose()


@pytest.mark.redis
async def test_waiting_for_a_connection_is_not_a_failure(redis_url: str, client: redis.Redis) -> None:
    """With a pool of one connection, a burst waits for it: every write lands, nothing counts as failing, the
    breaker stays closed. (Before: ``MaxConnectionsError``, a failure, and the writes in flight skipped.)"""
    cache = engine(redis_url + "?max_connections=1")
    computed: list[int] = []
    await burst(cache, 3_000, computed)
    stats = cache.tier_stats()["redis"]
    assert (stats["writes"], stats["skipped"], stats["errors"], stats["timeouts"]) == (3_000, 0, 0, 0), stats
    assert stats["breaker"] == "closed"
    assert cache.failures == 0
    await cache.aclose()
    assert entries(client, "burst") == 3_000


@pytest.mark.redis
async def test_the_pool_waits_for_a_connection_instead_of_raising(redis_url: str) -> None:
    """Commands other than reads and writes (here ``UNLINK``) queue for the pool's connections."""
    backend = RedisBackend(redis_url + "?max_connections=2")
    await asyncio.gather(*(backend.delete_many([f"k{i}"]) for i in range(500)))
    await backend.aclose()


@pytest.mark.redis
async def test_concurrent_writes_share_transactions_and_connections(redis_url: str, client: redis.Redis) -> None:
    backend = RedisBackend(redis_url)
    before = len(client.client_list())
    await asyncio.gather(*(backend.set_many([StoreItem(f"k{i}", b"v" * 100, None, ("t",))]) for i in range(10_000)))
    assert len(client.client_list()) - before <= MAX_WRITERS
    assert calls(client, "exec") <= 10
    assert client.dbsize() == 10_001  # the entries and their tag set
    assert client.scard("t") == 10_000
    await backend.aclose()


@pytest.mark.redis
async def test_a_failed_entry_fails_its_caller_only(redis_url: str, client: redis.Redis) -> None:
    """In a shared transaction, an entry whose tag key holds another type fails its own caller; the other
    callers' entries land."""
    client.set("not-a-set", b"x")
    backend = RedisBackend(redis_url)
    outcomes = await asyncio.gather(
        backend.set_many([StoreItem("a", b"1", None, ("good",))]),
        backend.set_many([StoreItem("b", b"2", None, ("not-a-set",))]),
        backend.set_many([StoreItem("c", b"3", None)]),
        return_exceptions=True)
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], BackendError)
    assert "WRONGTYPE" in str(outcomes[1])
    assert client.mget("a", "c") == [b"1", b"3"]
    assert client.smembers("good") == {b"a"}
    await backend.aclose()


@pytest.mark.redis
async def test_an_expired_entry_is_unlinked_and_a_ttl_is_kept(redis_url: str, client: redis.Redis) -> None:
    now = 1_000_000.0
    backend = RedisBackend(redis_url, clock=lambda: now)
    client.set("old", b"stale")
    await asyncio.gather(backend.set_many([StoreItem("old", b"dead", now - 1)]),
                         backend.set_many([StoreItem("live", b"v", now + 60, ("t",))]))
    assert client.get("old") is None
    assert 59_000 < client.pttl("live") <= 60_000
    assert 59_000 < client.pttl("t") <= 60_000
    await backend.aclose()


@pytest.mark.redis
async def test_a_write_to_a_hung_redis_times_out(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url)
    await backend.set_many_within([StoreItem("k", b"v", None)], 0.2)  # connected
    own_redis.pause()
    try:
        with anyio.fail_after(5), pytest.raises(TimeoutError):
            await backend.set_many_within([StoreItem("k", b"w", None)], 0.2)
    finally:
        own_redis.resume()
    await backend.set_many_within([StoreItem("k", b"x", None)], 1)  # a fresh connection replaces the dropped one
    assert await backend.get_many(["k"]) == [b"x"]
    await backend.aclose()


@pytest.mark.redis
async def test_the_pipeline_path_stores_entries_and_tags_and_fails_only_its_caller(redis_url: str,
                                                                                  client: redis.Redis) -> None:
    """The path a cluster takes (redis-py's pipeline, the tag script sent whole) stores what the transaction
    path stores, and a failed entry fails its own caller only."""
    backend = RedisBackend(redis_url)
    await backend.set_many([StoreItem("warm", b"w", None)])  # the client of this loop exists
    backend.cluster = True  # writes now go through send_pipeline(transaction=False)
    client.set("not-a-set", b"x")
    outcomes = await asyncio.gather(
        backend.set_many([StoreItem("a", b"1", None, ("t",))]),
        backend.set_many([StoreItem("b", b"2", None, ("not-a-set",))]),
        backend.set_many([StoreItem(f"k{i}", b"v", None, ("t",)) for i in range(100)]),
        return_exceptions=True)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], BackendError)
    assert outcomes[2] is None
    assert client.get("a") == b"1"
    assert client.scard("t") == 101
    assert calls(client, "exec") == 1  # the warm-up's transaction only
    await backend.aclose()


class Deadline(MemoryBackend, DeadlineSupport):
    """A backend with deadline-bounded reads that leaves writes to `DeadlineSupport`'s default."""

    async def get_many_within(self, keys: Sequence[str], seconds: float) -> list[bytes | None]:
        return await self.get_many(keys)


async def test_the_default_bounded_write_stores() -> None:
    lower = Deadline(BackendURL.parse("memory://"))
    cache = TieredCache(backends={"memory": MemoryBackend(BackendURL.parse("memory://")), "lower": lower})
    await cache.set("k", 1)
    assert cache.tier_stats()["lower"]["writes"] == 1
    assert lower.slots  # stored below memory
    await cache.aclose()


class Busy(MemoryBackend, DeadlineSupport):
    """A tier that is always congested: every write is refused with `BackendBusyError`."""

    async def get_many_within(self, keys: Sequence[str], seconds: float) -> list[bytes | None]:
        return await self.get_many(keys)

    async def set_many_within(self, items: Sequence[StoreItem], seconds: float) -> None:
        raise BackendBusyError("no connection free")


class FailsReads(MemoryBackend):
    """A tier whose reads fail."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        raise OSError("down")


async def test_a_busy_tier_skips_writes_counted_without_failing() -> None:
    busy: Backend = Busy(BackendURL.parse("memory://"))
    cache = TieredCache(Settings(breaker_threshold=2, strict=True), backends={"memory": MemoryBackend(BackendURL.parse("memory://")),
                                                                             "busy": busy})

    @multilevel_cached(cache=cache, name="busy")
    async def f(x: int) -> int:
        return x

    for x in range(5):
        assert await f(x) == x
    stats = cache.tier_stats()["busy"]
    assert (stats["skipped"], stats["writes"], stats["errors"], stats["timeouts"]) == (5, 0, 0, 0)
    assert stats["breaker"] == "closed"
    assert cache.failures == 0
    await cache.aclose()


async def test_a_write_skipped_after_a_failure_is_counted() -> None:
    """A tier that failed while a call ran is not written by that call: the write is counted as skipped."""
    cache = TieredCache(backends={"memory": MemoryBackend(BackendURL.parse("memory://")), "down": FailsReads(BackendURL.parse("memory://"))})

    @multilevel_cached(cache=cache, name="skip")
    async def f(x: int) -> int:
        return x

    assert await f(1) == 1
    stats = cache.tier_stats()["down"]
    assert (stats["errors"], stats["skipped"], stats["writes"]) == (1, 1, 0)
    await cache.aclose()


async def test_a_thousand_concurrent_misses_land_on_disk(tmp_path: Path) -> None:
    """Memory + disk, 1,000 concurrent misses: every write lands, no tier timeout or failure; the next round,
    with a fresh memory tier, is all disk hits."""
    url = f"disk://{tmp_path}/burst"

    def make() -> TieredCache:
        return TieredCache(Settings(tiers={"memory": "memory://", "disk": url}))

    first = make()
    computed: list[int] = []
    results, _ = await burst(first, 1_000, computed, name="disk-burst")
    assert results == [2 * x for x in range(1_000)]
    stats = first.tier_stats()["disk"]
    assert (stats["writes"], stats["skipped"], stats["errors"], stats["timeouts"]) == (1_000, 0, 0, 0), stats
    assert first.failures == 0
    await first.aclose()

    second = make()
    again: list[int] = []
    results, info = await burst(second, 1_000, again, name="disk-burst")
    assert results == [2 * x for x in range(1_000)]
    assert again == []
    assert info.hits_by_tier == {"disk": 1_000}
    await second.aclose()
