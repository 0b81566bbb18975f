"""The tiered engine over real tiers: read-through, back-fill, writes, invalidation, integrity, batch, SWR, locks.

Most tests run with the memory tier in front of one real lower tier of each kind (marks ``memory``, ``redis``,
``disk``); a memory tier as the lower tier stands in for a shared store the engine cannot tell apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
import numpy as np
import pytest
import redis

from cachelayers import (
    Backend,
    BatchError,
    ConfigError,
    MemoryBackend,
    Settings,
    StoreItem,
    TieredCache,
    multilevel_cached,
)
from cachelayers.backends.memory import EXPIRES_AT
from cachelayers.codec import Codec
from tests.conftest import FakeClock
from tests.tier_factories import backend_params, eventually, make_backend, skip_unless_supported

pytestmark = pytest.mark.anyio

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture(params=backend_params())
def kind(request: pytest.FixtureRequest) -> str:
    skip_unless_supported(request.param, request)
    return str(request.param)


@pytest.fixture
async def lower(kind: str, request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Backend]:
    """The tier below memory, of each kind."""
    backend = make_backend(kind, request, clock)
    yield backend
    await backend.aclose()


@pytest.fixture
async def cache(lower: Backend, clock: FakeClock) -> AsyncIterator[TieredCache]:
    """Memory in front of one real lower tier.

    With a generous ``tier_timeout``: on a loaded machine a disk write or a Redis answer can take longer than the
    default 250 ms, and these tests are about what the tiers store, not about timeouts (test_tier_faults.py).
    """
    engine = TieredCache(Settings(tier_timeout="5s"), backends={"memory": MemoryBackend(clock=clock), "lower": lower},
                         clock=clock)
    yield engine
    await engine.background.aclose()


def counting(results: dict[Any, int]) -> Callable[[int], Coroutine[Any, Any, tuple[int, int]]]:
    async def compute(x: int) -> tuple[int, int]:
        results[x] = results.get(x, 0) + 1
        return (x, results[x])

    return compute


def redis_client(request: pytest.FixtureRequest) -> redis.Redis:
    return redis.Redis.from_url(str(request.getfixturevalue("redis_url")))


class TestReadWrite:
    async def test_a_call_is_written_to_every_tier_and_read_back_from_each(
            self, cache: TieredCache, lower: Backend, clock: FakeClock) -> None:
        calls: dict[Any, int] = {}
        f = multilevel_cached(ttl="1m", cache=cache)(counting(calls))
        assert await f(7) == (7, 1)
        storage_key = f.cache._prefix + f.cache._keys.storage_digest(f.cache._keys.local((7,), {}))
        (blob,) = await lower.get_many([storage_key])
        assert blob is not None
        envelope = cache.codec.open(storage_key, blob)
        assert envelope.value == (7, 1)
        assert envelope.expires_at == clock() + 60
        assert await f(7) == (7, 1)  # memory
        assert cache.local is not None
        cache.local.clear_now()
        assert await f(7) == (7, 1)  # the lower tier, back-filled into memory
        assert cache.tier_stats()["lower"]["hits"] == 1
        assert await f(7) == (7, 1)
        assert calls == {7: 1}
        assert f.cache_info().hits_by_tier == {"memory": 2, "lower": 1}

    async def test_invalidation_by_arguments_tag_and_namespace_reaches_the_lower_tier(
            self, cache: TieredCache, lower: Backend) -> None:
        calls: dict[Any, int] = {}
        f = multilevel_cached(tags=lambda x: [f"parity:{x % 2}"], namespace="inv", cache=cache)(counting(calls))

        def key(x: int) -> str:
            return f.cache._prefix + f.cache._keys.storage_digest(f.cache._keys.local((x,), {}))

        for x in range(4):
            await f(x)
        await f.invalidate(0)
        assert await lower.get_many([key(0)]) == [None]
        assert None not in await lower.get_many([key(1), key(2), key(3)])
        await cache.invalidate_tags("parity:1")
        assert await lower.get_many([key(1), key(2), key(3)]) == [None, (await lower.get_many([key(2)]))[0], None]
        assert (await lower.get_many([key(2)]))[0] is not None
        await f.invalidate_all()
        assert await lower.get_many([key(2)]) == [None]
        for x in range(4):
            await f(x)
        assert calls == {0: 2, 1: 2, 2: 2, 3: 2}

    async def test_namespace_invalidation_reaches_entries_back_filled_into_memory(self, cache: TieredCache) -> None:
        """Memory finds a namespace's entries by their keys, not by an index of namespace tags: an entry it got
        from a lower tier (whose envelope carries the namespace tag) goes with the namespace too."""
        calls: dict[Any, int] = {}
        others: dict[Any, int] = {}
        f = multilevel_cached(tags=["shared"], namespace="refill", cache=cache)(counting(calls))
        g = multilevel_cached(tags=["shared"], namespace="refill-other", cache=cache)(counting(others))
        await f(1)
        await g(1)
        assert cache.local is not None
        cache.local.clear_now()
        assert await f(1) == (1, 1)  # both back-filled from the lower tier
        assert await g(1) == (1, 1)
        assert len(cache.local) == 2
        await f.invalidate_all()
        assert len(cache.local) == 1  # g's entry stays: "refill" is a prefix of its namespace, not its namespace
        assert await f(1) == (1, 2)
        assert await g(1) == (1, 1)
        await cache.invalidate_tags("shared")
        assert len(cache.local) == 0
        assert calls == {1: 2}
        assert others == {1: 1}

    async def test_key_value_api_over_the_lower_tier(self, cache: TieredCache, clock: FakeClock) -> None:
        await cache.set("answer", {"v": 42}, ttl=30, tags=["t"])
        assert cache.local is not None
        cache.local.clear_now()
        assert await cache.get("answer") == {"v": 42}
        clock.advance(31)
        cache.local.clear_now()
        assert await cache.get("answer", "gone") == "gone"
        await cache.set("b", 1, tags=["t"])
        await cache.invalidate_tags("t")
        cache.local.clear_now()
        assert await cache.get("b") is None

    async def test_clear_empties_every_tier_but_only_under_its_prefix(
            self, lower: Backend, clock: FakeClock) -> None:
        front = {"memory": MemoryBackend(clock=clock)}
        mine = TieredCache(Settings(key_prefix="app1:"), backends={**front, "lower": lower}, clock=clock)
        theirs = TieredCache(Settings(key_prefix="app2:"), backends={"memory2": MemoryBackend(clock=clock),
                                                                     "lower": lower}, clock=clock)
        await mine.set("k", 1)
        await theirs.set("k", 2)
        await mine.clear()
        assert await mine.get("k") is None
        assert theirs.local is not None
        theirs.local.clear_now()
        if isinstance(lower, MemoryBackend):
            assert await theirs.get("k") is None  # a memory tier has no prefixes: clear() empties it
        else:
            assert await theirs.get("k") == 2


@pytest.mark.redis
async def test_read_through_in_order_and_back_fill_keeps_the_remaining_ttl(
        anyio_backend: str, request: pytest.FixtureRequest, clock: FakeClock) -> None:
    """memory → Redis → disk: a hit in disk fills Redis and memory with what is *left* of the TTL."""
    skip_unless_supported("redis", request)
    disk = make_backend("disk", request, clock)
    redis_tier = make_backend("redis", request, clock)
    writer = TieredCache(Settings(), backends={"disk": disk}, clock=clock)
    calls: dict[Any, int] = {}
    fn = counting(calls)
    await multilevel_cached(ttl=100, name="rt", cache=writer)(fn)(1)  # only disk has it
    started = clock()
    clock.advance(40)
    reader = TieredCache(Settings(), backends={"memory": MemoryBackend(clock=clock), "redis": redis_tier,
                                               "disk": disk}, clock=clock)
    f = multilevel_cached(ttl=100, name="rt", cache=reader)(fn)
    assert await f(1) == (1, 1)
    assert f.cache_info().hits_by_tier == {"disk": 1}
    storage_key = f.cache._prefix + f.cache._keys.storage_digest(f.cache._keys.local((1,), {}))
    assert reader.local is not None
    assert next(iter(reader.local.slots.values()))[EXPIRES_AT] == started + 100
    client = redis_client(request)
    assert 59_000 < client.pttl(storage_key) <= 60_000  # 60 s left, not a fresh 100
    client.close()
    (blob,) = await redis_tier.get_many([storage_key])
    assert blob is not None
    assert reader.codec.open(storage_key, blob).expires_at == started + 100
    reader.local.clear_now()
    assert await f(1) == (1, 1)
    assert f.cache_info().hits_by_tier == {"disk": 1, "redis": 1}
    assert calls == {1: 1}
    await reader.aclose()
    await writer.aclose()


async def test_a_value_computed_while_it_was_invalidated_is_returned_but_not_stored(
        cache: TieredCache, lower: Backend) -> None:
    started, release = anyio.Event(), anyio.Event()
    computed = 0

    @multilevel_cached(cache=cache, name="racy")
    async def value(x: int) -> int:
        nonlocal computed
        computed += 1
        started.set()
        await release.wait()
        return computed

    results: list[int] = []

    async def call() -> None:
        results.append(await value(1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await started.wait()
        await value.invalidate(1)  # the source changed while the old value was being computed
        release.set()
    assert results == [1]
    storage_key = value.cache._prefix + value.cache._keys.storage_digest(value.cache._keys.local((1,), {}))
    assert await lower.get_many([storage_key]) == [None]
    assert await value(1) == 2


class TestIntegrity:
    @pytest.mark.parametrize("damage", ["random", "truncated", "foreign", "unsigned"])
    async def test_a_damaged_entry_is_a_miss_deleted_and_counted(
            self, lower: Backend, clock: FakeClock, damage: str) -> None:
        settings = Settings(secret=SECRET) if damage == "unsigned" else Settings()
        cache = TieredCache(settings, backends={"memory": MemoryBackend(clock=clock), "lower": lower}, clock=clock)
        calls: dict[Any, int] = {}
        f = multilevel_cached(cache=cache, name="integrity")(counting(calls))
        await f(1)
        await f(2)

        def key(x: int) -> str:
            return f.cache._prefix + f.cache._keys.storage_digest(f.cache._keys.local((x,), {}))

        good = (await lower.get_many([key(1)]))[0]
        assert good is not None
        bad = {
            "random": bytes(reversed(good)),
            "truncated": good[: len(good) // 2],
            "foreign": (await lower.get_many([key(2)]))[0],  # another entry's intact bytes
            "unsigned": Codec().seal(key(1), (1, 1), None),  # a well-formed entry without the signature
        }[damage]
        assert bad is not None
        await lower.set_many([StoreItem(key(1), bad, None)])
        assert cache.local is not None
        cache.local.clear_now()
        assert await f(1) == (1, 2)  # recomputed: the damaged entry was not served
        assert cache.tier_stats()["lower"]["corrupt"] == 1
        repaired = (await lower.get_many([key(1)]))[0]
        assert repaired is not None
        assert cache.codec.open(key(1), repaired).value == (1, 2)


class TestBatch:
    async def test_items_are_cached_one_by_one_and_only_missing_ones_are_computed(
            self, cache: TieredCache) -> None:
        seen: list[list[str]] = []

        @multilevel_cached(batch=True, cache=cache)
        async def lengths(texts: list[str], scale: int = 1) -> list[int]:
            seen.append(list(texts))
            return [len(t) * scale for t in texts]

        assert await lengths(["a", "bb", "ccc"]) == [1, 2, 3]
        assert await lengths(["ccc", "dddd", "a", "eeeee", "dddd"]) == [3, 4, 1, 5, 4]
        assert seen == [["a", "bb", "ccc"], ["dddd", "eeeee"]]
        assert await lengths(texts=["bb", "a"], scale=10) == [20, 10]  # other arguments are part of the key
        assert seen[-1] == ["bb", "a"]
        info = lengths.cache_info()
        assert (info.hits, info.misses) == (2, 7)  # counted per distinct item of a call

    async def test_array_results_are_stored_per_row_and_stacked_back(self, cache: TieredCache) -> None:
        calls = 0

        @multilevel_cached(batch="texts", cache=cache)
        async def embed(model: str, texts: list[str]) -> np.ndarray:
            nonlocal calls
            calls += 1
            return np.array([[len(t), ord(t[0]), hash(model) % 7] for t in texts], dtype=np.float32)

        first = await embed("m", ["x", "yy"])
        assert cache.local is not None
        cache.local.clear_now()  # the rows come back from the lower tier
        again = await embed("m", ["yy", "zzz", "x"])
        assert isinstance(again, np.ndarray)
        assert again.dtype == np.float32
        assert again.shape == (3, 3)
        np.testing.assert_array_equal(again[0], first[1])
        np.testing.assert_array_equal(again[2], first[0])
        assert calls == 2

    async def test_one_multi_get_per_tier_for_the_whole_batch(
            self, cache: TieredCache, lower: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
        @multilevel_cached(batch=True, cache=cache)
        async def double(xs: list[int]) -> list[int]:
            return [2 * x for x in xs]

        await double(list(range(50)))
        assert cache.local is not None
        cache.local.clear_now()
        reads: list[int] = []
        tier = cache.tiers[0]
        original = tier.read_within or lower.get_many

        async def counted(keys: Any, *rest: Any) -> Any:
            reads.append(len(keys))
            return await original(keys, *rest)

        if tier.read_within:
            monkeypatch.setattr(tier, "read_within", counted)
        else:
            monkeypatch.setattr(lower, "get_many", counted)
        assert await double(list(range(60))) == [2 * x for x in range(60)]
        assert reads == [60]

    async def test_concurrent_batches_compute_each_item_once(self, cache: TieredCache) -> None:
        computed: list[int] = []

        @multilevel_cached(batch=True, cache=cache)
        async def square(xs: list[int]) -> list[int]:
            await anyio.sleep(0.01)
            computed.extend(xs)
            return [x * x for x in xs]

        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            results[i] = await square(list(range(i, i + 10)))

        async with anyio.create_task_group() as tg:
            for i in range(0, 30, 3):
                tg.start_soon(run, i)
        assert sorted(computed) == sorted(set(computed)) == list(range(37))
        for i, out in results.items():
            assert out == [x * x for x in range(i, i + 10)]

    async def test_a_wrong_number_of_results_is_an_error_and_nothing_is_cached(self, cache: TieredCache) -> None:
        @multilevel_cached(batch=True, cache=cache)
        async def broken(xs: list[int]) -> list[int]:
            return [1]

        with pytest.raises(BatchError, match=r"2 items to .*broken\(\) returned a list of 1 result; expected 2"):
            await broken([1, 2])
        assert cache.local is not None
        assert len(cache.local) == 0

    async def test_batch_options_are_checked_at_decoration(self) -> None:
        async def fn(xs: list[int]) -> list[int]:
            return xs

        with pytest.raises(ConfigError, match="batch"):
            multilevel_cached(batch="nope")(fn)
        with pytest.raises(ConfigError, match="stale"):
            multilevel_cached(batch=True, stale=5)(fn)


class TestStaleWhileRevalidate:
    async def test_a_stale_entry_is_served_while_exactly_one_refresh_runs(
            self, cache: TieredCache, clock: FakeClock) -> None:
        computed = 0
        release = anyio.Event()

        @multilevel_cached(ttl=10, stale=60, cache=cache)
        async def value(x: int) -> int:
            nonlocal computed
            computed += 1
            if computed > 1:
                await release.wait()
            return computed

        assert await value(1) == 1
        clock.advance(15)  # expired, within the grace period
        results = []

        async def call() -> None:
            results.append(await value(1))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call)
        assert results == [1] * 50  # every caller got the stale value at once
        await eventually(lambda: computed >= 2, 5)  # and a refresh started in the background
        release.set()
        await eventually(lambda: value.cache.refreshes >= 1, 5)
        assert await value(1) == 2
        assert computed == 2
        assert value.cache_info().hits_by_tier.get("stale") == 50

    async def test_the_lower_tier_keeps_an_entry_through_its_grace_period(
            self, cache: TieredCache, clock: FakeClock) -> None:
        computed = 0

        @multilevel_cached(ttl=10, stale=60, cache=cache)
        async def value(x: int) -> int:
            nonlocal computed
            computed += 1
            return computed

        await value(1)
        clock.advance(30)
        assert cache.local is not None
        cache.local.clear_now()  # only the lower tier has it now, expired 20 s ago
        assert await value(1) == 1
        await eventually(lambda: value.cache.refreshes >= 1, 5)
        assert await value(1) == 2
        clock.advance(100)  # past expiry and grace: computed in the call
        assert await value(1) == 3


@pytest.mark.redis
class TestAcrossCaches:
    """Two engines on one Redis, each with its own memory tier: what two processes look like to each other."""

    @pytest.fixture
    async def pair(self, request: pytest.FixtureRequest) -> AsyncIterator[tuple[TieredCache, TieredCache]]:
        skip_unless_supported("redis", request)
        url = str(request.getfixturevalue("redis_url"))
        settings = Settings(tiers={"memory": "memory://", "redis": url})
        first, second = TieredCache(settings), TieredCache(settings)
        yield first, second
        await first.aclose()
        await second.aclose()

    @staticmethod
    async def dropped_within(cache: TieredCache, seconds: float) -> float:
        """How long until ``cache``'s memory tier is empty; fails after ``seconds``."""
        local = cache.local
        assert local is not None
        return await eventually(lambda: not len(local), seconds)

    @pytest.mark.parametrize("how", ["arguments", "tag", "namespace", "clear"])
    async def test_an_invalidation_reaches_the_other_memory_tier_within_100ms(
            self, pair: tuple[TieredCache, TieredCache], how: str) -> None:
        first, second = pair
        fns = [multilevel_cached(name="shared", tags=["t"], cache=c)(counting({})) for c in pair]
        for fn in fns:
            await fn(1)
        assert first.local is not None
        assert second.local is not None
        assert len(second.local) == 1
        if how == "arguments":
            await fns[0].invalidate(1)
        elif how == "tag":
            await first.invalidate_tags("t")
        elif how == "namespace":
            await fns[0].invalidate_all()
        else:
            await first.clear()
        assert await self.dropped_within(second, 0.1) < 0.1

    async def test_a_lock_makes_two_caches_compute_once(self, pair: tuple[TieredCache, TieredCache],
                                                       request: pytest.FixtureRequest) -> None:
        computed = 0

        async def slow(x: int) -> int:
            nonlocal computed
            computed += 1
            await anyio.sleep(0.3)
            return x * 2

        fns = [multilevel_cached(name="locked", lock=True, cache=c)(slow) for c in pair]
        results: list[int] = []

        async def call(fn: Any) -> None:
            results.append(await fn(21))

        client = redis_client(request)
        client.config_resetstat()
        async with anyio.create_task_group() as tg:
            for fn in fns:
                tg.start_soon(call, fn)
        assert results == [42, 42]
        assert computed == 1
        # The waiter was woken by the release message: at most two attempts to take the lock (one more after
        # 0.25 s, in case a message is lost), then it found the value; polling from 20 ms up would have taken
        # five. The other two SETs are the holder's lock and its write.
        assert int(client.info("commandstats")["cmdstat_set"]["calls"]) <= 4
        client.close()

    async def test_a_stale_entry_is_refreshed_once_across_caches(self, request: pytest.FixtureRequest,
                                                                 clock: FakeClock) -> None:
        """With ``lock=``, stale-while-revalidate refreshes a key once across processes, not once in each."""
        skip_unless_supported("redis", request)
        settings = Settings(tiers={"memory": "memory://", "redis": str(request.getfixturevalue("redis_url"))})
        caches = [TieredCache(settings, clock=clock) for _ in range(2)]
        computed = 0
        release = anyio.Event()

        async def fn(x: int) -> int:
            nonlocal computed
            computed += 1
            if computed > 1:
                await release.wait()
            return computed

        fns = [multilevel_cached(name="swr", ttl=10, stale=100, lock=True, cache=c)(fn) for c in caches]
        assert await fns[0](1) == 1
        assert await fns[1](1) == 1  # from Redis
        clock.advance(20)
        results: list[int] = []

        async def call(f: Any) -> None:
            results.append(await f(1))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                for f in fns:
                    tg.start_soon(call, f)
        assert results == [1] * 40
        # One cache's refresh holds the lock and computes; the other's found it taken and gave up.
        await eventually(lambda: computed == 2 and any(not c.inflight for c in caches), 5)
        release.set()
        await eventually(lambda: sum(f.cache.refreshes for f in fns) == 1 and
                         all(not c.inflight for c in caches), 5)
        assert computed == 2
        for c in caches:
            await c.aclose()

    async def test_a_crashed_holder_blocks_only_until_its_lease_runs_out(
            self, pair: tuple[TieredCache, TieredCache], request: pytest.FixtureRequest) -> None:
        first, _ = pair
        computed = 0

        @multilevel_cached(name="orphan", lock="10s", cache=first)
        async def fn(x: int) -> int:
            nonlocal computed
            computed += 1
            return x

        storage_key = fn.cache._prefix + fn.cache._keys.storage_digest(fn.cache._keys.local((1,), {}))
        lock_key = first.lock_prefix + storage_key[len(first.settings.key_prefix):]
        client = redis_client(request)
        client.set(lock_key, "a process that died", px=600)  # never released, never refreshed
        client.config_resetstat()
        started = anyio.current_time()
        assert await fn(1) == 1
        waited = anyio.current_time() - started
        assert 0.5 < waited < 2.0
        assert computed == 1
        # Waiting backs off exponentially: a handful of attempts, not a busy loop.
        attempts = int(client.info("commandstats").get("cmdstat_set", {}).get("calls", 0))
        assert 2 <= attempts <= 8
        client.close()


async def test_aclose_leaves_no_background_task_behind(
        anyio_backend: str, request: pytest.FixtureRequest, clock: FakeClock) -> None:
    """A refresh still running when the engine closes is cancelled, and nothing else is left running."""
    disk = make_backend("disk", request, clock)
    cache = TieredCache(Settings(), backends={"memory": MemoryBackend(clock=clock), "disk": disk}, clock=clock)
    refreshing = anyio.Event()
    calls = 0

    @multilevel_cached(ttl=1, stale=100, cache=cache)
    async def hangs_on_refresh(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            refreshing.set()
            await anyio.sleep_forever()
        return x

    assert await hangs_on_refresh(1) == 1
    clock.advance(5)
    assert await hangs_on_refresh(1) == 1  # stale: served, and a refresh starts in the background
    with anyio.fail_after(5):
        await refreshing.wait()
    assert cache.background.running == 1
    await cache.aclose()
    assert cache.background.running == 0
    if anyio_backend == "asyncio":
        import asyncio

        assert [t for t in asyncio.all_tasks() if "TieredCache@" in t.get_name() and not t.done()] == []
