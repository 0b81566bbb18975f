"""The tiered engine and `@multilevel_cached`: what a caller sees, tier by tier, under a fake clock."""

from __future__ import annotations

import enum
import gc
import inspect
from datetime import timedelta
from typing import Any

import pytest

import cachelayers
from cachelayers import (
    MemoryBackend,
    Settings,
    TieredCache,
    configure,
    get_settings,
    multilevel_cached,
    stats,
)
from cachelayers.backends.memory import EXPIRES_AT, VALUE
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


def memory_cache(clock: FakeClock, **settings: Any) -> TieredCache:
    """One memory tier on the fake clock."""
    return TieredCache(Settings(**settings), clock=clock)


def two_tiers(clock: FakeClock, **settings: Any) -> tuple[TieredCache, MemoryBackend, MemoryBackend]:
    """A memory tier over a second memory tier that stores envelopes (a stand-in for Redis)."""
    l1, l2 = MemoryBackend(clock=clock), MemoryBackend(clock=clock)
    cache = TieredCache(Settings(**settings), backends={"l1": l1, "l2": l2}, clock=clock)
    return cache, l1, l2


class Counter:
    """Counts calls of the functions the tests decorate."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __len__(self) -> int:
        return len(self.calls)


# -- values --------------------------------------------------------------------------------------------------


async def test_none_is_cached(clock: FakeClock) -> None:
    """A function returning ``None`` runs once; ``None`` is served from the cache afterwards."""
    runs = Counter()

    @multilevel_cached(cache=memory_cache(clock))
    async def lookup(user: str) -> str | None:
        runs.calls.append(user)
        return None

    assert await lookup("ann") is None
    assert await lookup("ann") is None
    assert runs.calls == ["ann"]
    assert lookup.cache_info().hits == 1


async def test_exceptions_are_not_cached(clock: FakeClock) -> None:
    """An exception reaches the caller and the next call runs the function again."""
    runs = Counter()

    @multilevel_cached(cache=memory_cache(clock))
    async def flaky(x: int) -> int:
        runs.calls.append(x)
        if len(runs) == 1:
            raise ConnectionError("provider down")
        return x * 2

    with pytest.raises(ConnectionError, match="provider down"):
        await flaky(1)
    assert await flaky(1) == 2
    assert await flaky(1) == 2
    assert runs.calls == [1, 1]


async def test_values_are_served_for_their_own_arguments_only(clock: FakeClock) -> None:
    """Each argument gets its own result; equal calls share it."""
    runs = Counter()

    @multilevel_cached(cache=memory_cache(clock))
    async def double(x: Any) -> str:
        runs.calls.append(x)
        return f"{x!r}x2"

    for value in (1, 1.0, True, "1", b"1", (1,), [1]):
        assert await double(value) == f"{value!r}x2"
    for value in (1, 1.0, True, "1", b"1", (1,), [1]):
        assert await double(value) == f"{value!r}x2"
    assert len(runs) == 7


# -- TTL -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [(90, 90.0), (2.5, 2.5), ("90s", 90.0), ("1h", 3600.0), ("250ms", 0.25), (timedelta(minutes=2), 120.0)],
)
async def test_ttl_forms(clock: FakeClock, ttl: Any, seconds: float) -> None:
    """A TTL as seconds, a string with a unit or a timedelta expires the entry exactly then."""
    runs = Counter()

    @multilevel_cached(ttl=ttl, cache=memory_cache(clock))
    async def value(x: int) -> int:
        runs.calls.append(x)
        return len(runs)

    assert await value(1) == 1
    clock.advance(seconds * 0.999)
    assert await value(1) == 1
    clock.advance(seconds * 0.001)
    assert await value(1) == 2


async def test_default_ttl_from_settings(clock: FakeClock) -> None:
    """Without ``ttl=`` the settings' ``default_ttl`` applies; without either, entries never expire."""
    runs = Counter()

    async def value(x: int) -> int:
        runs.calls.append(x)
        return len(runs)

    expiring = multilevel_cached(cache=memory_cache(clock, default_ttl="1m"))(value)
    forever = multilevel_cached(cache=memory_cache(clock), namespace="forever")(value)
    assert await expiring(1) == 1
    assert await forever(1) == 2
    clock.advance(60)
    assert await expiring(1) == 3
    clock.advance(10**8)
    assert await forever(1) == 2


# -- tiers ---------------------------------------------------------------------------------------------------


async def test_writes_go_to_every_tier_and_back_fill_keeps_the_remaining_ttl(clock: FakeClock) -> None:
    """A miss writes every tier; a hit in a lower tier back-fills the upper one with the entry's remaining
    lifetime — the same absolute expiry, never a fresh TTL."""
    cache, l1, l2 = two_tiers(clock)
    runs = Counter()

    @multilevel_cached(ttl=60, cache=cache)
    async def answer(q: str) -> str:
        runs.calls.append(q)
        return q.upper()

    written_at = clock()
    assert await answer("hi") == "HI"
    assert len(l1) == len(l2) == 1
    [slot] = l1.slots.values()
    assert slot[EXPIRES_AT] == written_at + 60
    [(storage_key, envelope)] = l2.slots.items()
    assert cache.codec.open(str(storage_key), envelope[VALUE]).expires_at == written_at + 60

    l1.clear_now()
    clock.advance(45)
    assert await answer("hi") == "HI"
    assert runs.calls == ["hi"]
    [slot] = l1.slots.values()
    assert slot[EXPIRES_AT] == written_at + 60  # 15 s left, as in the lower tier
    assert answer.cache_info().hits_by_tier == {"l2": 1}

    clock.advance(15)
    assert await answer("hi") == "HI"
    assert runs.calls == ["hi", "hi"]


async def test_three_tiers_back_fill_every_tier_above_the_hit(clock: FakeClock) -> None:
    """The engine handles N tiers: a hit in the third back-fills the first and the second."""
    tiers = {name: MemoryBackend(clock=clock) for name in ("l1", "l2", "l3")}
    cache = TieredCache(Settings(), backends=tiers, clock=clock)
    await cache.set("k", {"v": 1}, ttl=30)
    tiers["l1"].clear_now()
    tiers["l2"].clear_now()
    clock.advance(10)
    assert await cache.get("k") == {"v": 1}
    assert len(tiers["l1"]) == len(tiers["l2"]) == 1
    [envelope] = tiers["l2"].slots.values()
    assert cache.codec.open(cache.storage_key("k"), envelope[VALUE]).expires_at == clock() + 20
    assert cache.tier_stats()["l3"]["hits"] == 1


async def test_key_value_api(clock: FakeClock) -> None:
    """get/set/delete with a default for misses, TTLs and tags."""
    cache = memory_cache(clock)
    assert await cache.get("k", "default") == "default"
    assert await cache.set("k", None, ttl="10s") is True
    assert await cache.get("k", "default") is None
    await cache.set("t", 1, tags=["group"])
    await cache.invalidate_tags("group")
    assert await cache.get("t", "gone") == "gone"
    await cache.delete("k")
    assert await cache.get("k", "gone") == "gone"


# -- invalidation --------------------------------------------------------------------------------------------


async def test_invalidate_by_arguments_in_every_tier(clock: FakeClock) -> None:
    """``f.invalidate(...)`` normalises its arguments like a call and removes the entry from every tier."""
    cache, l1, l2 = two_tiers(clock)
    runs = Counter()

    @multilevel_cached(cache=cache)
    async def area(width: int, height: int = 1) -> int:
        runs.calls.append((width, height))
        return width * height

    assert await area(2) == 2
    assert await area(3) == 3
    await area.invalidate(width=2, height=1)
    assert len(l1) == len(l2) == 1
    assert await area(2) == 2
    assert await area(3) == 3
    assert runs.calls == [(2, 1), (3, 1), (2, 1)]


async def test_invalidate_by_tag(clock: FakeClock) -> None:
    """Static tags and tags computed from the arguments; invalidation removes from every tier."""
    cache, l1, l2 = two_tiers(clock)
    runs = Counter()

    @multilevel_cached(cache=cache, tags=lambda collection, **_: [f"collection:{collection}"])
    async def search(query: str, collection: str) -> str:
        runs.calls.append(query)
        return f"{collection}/{query}"

    @multilevel_cached(cache=cache, tags=["static"])
    async def other(x: int) -> int:
        runs.calls.append(x)
        return x

    await search("a", "docs")
    await search("b", collection="faq")
    await other(1)
    await cache.invalidate_tags("collection:docs")
    assert len(l1) == len(l2) == 2
    await search("a", "docs")
    await search("b", "faq")
    await cache.invalidate_tags("static")
    await other(1)
    assert runs.calls == ["a", "b", 1, "a", 1]


async def test_invalidate_by_namespace(clock: FakeClock) -> None:
    """A namespace is dropped as a whole, other namespaces stay."""
    cache, l1, l2 = two_tiers(clock)
    runs = Counter()

    async def compute(x: int) -> int:
        runs.calls.append(x)
        return x

    first = multilevel_cached(cache=cache, namespace="first")(compute)
    second = multilevel_cached(cache=cache, namespace="second")(compute)
    await first(1)
    await first(2)
    await second(1)
    await cache.invalidate_namespace("first")
    assert len(l1) == len(l2) == 1
    await second(1)
    await first(1)
    assert runs.calls == [1, 2, 1, 1]
    await second.invalidate_all()
    await second(1)
    assert runs.calls == [1, 2, 1, 1, 1]


async def test_memory_tier_indexes_user_tags_only(clock: FakeClock) -> None:
    """The memory tier keeps no index of namespace tags (one update less per entry stored and evicted);
    invalidating a namespace finds its entries by key, and tags still work."""
    cache = TieredCache(Settings(), clock=clock)
    runs = Counter()

    async def compute(x: int) -> int:
        runs.calls.append(x)
        return x

    tagged = multilevel_cached(cache=cache, namespace="tagged", tags=lambda x: [f"parity:{x % 2}"])(compute)
    plain = multilevel_cached(cache=cache, namespace="plain")(compute)
    for x in range(4):
        await tagged(x)
        await plain(x)
    assert cache.local is not None
    assert set(cache.local._tags) == {"parity:0", "parity:1"}
    await cache.invalidate_tags("parity:1")
    assert len(cache.local) == 6
    await plain.invalidate_all()
    assert len(cache.local) == 2
    assert set(cache.local._tags) == {"parity:0"}
    await tagged.invalidate_all()
    assert len(cache.local) == 0
    assert cache.local._tags == {}
    assert runs.calls == [0, 0, 1, 1, 2, 2, 3, 3]


async def test_module_level_invalidation_uses_the_settings_in_force() -> None:
    """``cachelayers.invalidate_tags`` and ``invalidate_namespace`` act on the engine of the configured settings."""
    runs = Counter()

    @multilevel_cached(tags=["t"], namespace="module-level")
    async def value(x: int) -> int:
        runs.calls.append(x)
        return x

    await value(1)
    await cachelayers.invalidate_tags("t")
    await value(1)
    await cachelayers.invalidate_namespace("module-level")
    await value(1)
    await value(1)
    assert runs.calls == [1, 1, 1]


# -- statistics ----------------------------------------------------------------------------------------------


async def test_cache_info_counts(clock: FakeClock) -> None:
    """Hits, misses, hit rate, hits per tier and latencies add up."""
    cache, l1, _ = two_tiers(clock)

    @multilevel_cached(cache=cache)
    async def f(x: int) -> int:
        return x

    await f(1)
    await f(1)
    await f(2)
    l1.clear_now()
    await f(1)
    info = f.cache_info()
    assert (info.hits, info.misses) == (2, 2)
    assert info.hit_rate == 0.5
    assert info.hits_by_tier == {"l1": 1, "l2": 1}
    assert info.computed_p50 is not None
    assert info.cached_p50 is not None
    assert info.unstorable == 0
    assert info.errors == 0
    assert f.__qualname__ in "".join(stats())


@pytest.mark.parametrize(
    ("cost", "saved"),
    [(0.25, 0.75), (lambda result: len(result) / 100, 0.3)],
    ids=["number", "function-of-result"],
)
async def test_cost_saved(clock: FakeClock, cost: Any, saved: float) -> None:
    """Each hit adds the declared cost of the call it saved, a number or a function of the result."""

    @multilevel_cached(cache=memory_cache(clock), cost=cost)
    async def complete(prompt: str) -> str:
        return "ten chars!"

    for _ in range(4):
        await complete("p")
    assert complete.cache_info().cost_saved == pytest.approx(saved)


# -- decorator forms, methods --------------------------------------------------------------------------------


async def test_bare_and_with_arguments_keep_name_doc_and_signature() -> None:
    """Both forms return a function with the wrapped one's name, docstring, signature and ``__wrapped__``."""

    async def original(question: str, *, temperature: float = 0.0) -> str:
        """Answer a question."""
        return question

    for decorated in (multilevel_cached(original), multilevel_cached(ttl="1h")(original)):
        assert decorated.__name__ == "original"
        assert decorated.__doc__ == "Answer a question."
        assert inspect.signature(decorated) == inspect.signature(original)
        assert decorated.__wrapped__ is original
        assert inspect.iscoroutinefunction(decorated)
        assert await decorated("q", temperature=0.5) == "q"


async def test_methods_with_ignored_self(clock: FakeClock) -> None:
    """With ``ignore=("self",)`` instances share entries (the instance is not part of the key)."""
    cache = memory_cache(clock)
    runs = Counter()

    class Client:
        @multilevel_cached(cache=cache, ignore=("self",))
        async def embed(self, text: str) -> int:
            runs.calls.append(text)
            return len(text)

    assert await Client().embed("four") == 4
    assert await Client().embed(text="four") == 4
    assert runs.calls == ["four"]
    await Client.embed.invalidate(Client(), "four")
    assert await Client().embed("four") == 4
    assert runs.calls == ["four", "four"]


async def test_methods_keyed_by_cache_key(clock: FakeClock) -> None:
    """Instances with a ``__cache_key__`` share entries when their keys are equal, never otherwise."""
    cache = memory_cache(clock)
    runs = Counter()

    class Tenant:
        def __init__(self, tenant_id: str) -> None:
            self.tenant_id = tenant_id

        def __cache_key__(self) -> str:
            return self.tenant_id

        @multilevel_cached(cache=cache)
        async def quota(self, resource: str) -> str:
            runs.calls.append((self.tenant_id, resource))
            return f"{self.tenant_id}:{resource}"

    assert await Tenant("a").quota("gpu") == "a:gpu"
    assert await Tenant("a").quota("gpu") == "a:gpu"
    assert await Tenant("b").quota("gpu") == "b:gpu"
    assert runs.calls == [("a", "gpu"), ("b", "gpu")]


# -- settings in force ---------------------------------------------------------------------------------------


async def test_embedded_default_needs_no_configuration() -> None:
    """With no settings at all, a decorated function caches in a bounded memory tier."""
    runs = Counter()

    @multilevel_cached
    async def f(x: int) -> int:
        runs.calls.append(x)
        return x

    assert await f(1) == 1
    assert await f(1) == 1
    assert runs.calls == [1]
    assert f.cache.cache.local is not None
    assert f.cache.cache.local.max_entries == 10_000
    assert get_settings() == Settings()


async def test_configure_rebinds_functions_decorated_before() -> None:
    """Functions decorated before ``configure()`` use the new settings on their next call."""
    runs = Counter()

    @multilevel_cached
    async def f(x: int) -> int:
        runs.calls.append(x)
        return x

    await f(1)
    await f(1)
    assert len(runs) == 1
    configure(Settings(tiers={"small": "memory://?max_entries=1"}))
    await f(1)  # a new, empty engine
    await f(1)
    assert len(runs) == 2
    await f(2)  # evicts 1 from the one-entry tier of the new settings
    await f(1)
    assert runs.calls == [1, 1, 2, 1]
    assert f.cache.cache.local is not None
    assert f.cache.cache.local_name == "small"


async def test_configure_changes_apply_to_ttl() -> None:
    """``configure(default_ttl=...)`` changes the lifetime of entries of functions decorated before."""
    runs = Counter()

    @multilevel_cached
    async def f(x: int) -> int:
        runs.calls.append(x)
        return x

    configure(default_ttl="1m")
    assert get_settings().default_ttl == 60.0
    cache = f.cache.cache
    await f(1)
    assert cache.local is not None
    [slot] = cache.local.slots.values()
    assert slot[EXPIRES_AT] is not None
    assert slot[EXPIRES_AT] - cache.clock() == pytest.approx(60, abs=1)


async def test_explicit_cache_is_kept_across_configure(clock: FakeClock) -> None:
    """A function given ``cache=`` keeps it whatever the settings in force."""
    cache = memory_cache(clock)
    runs = Counter()

    @multilevel_cached(cache=cache)
    async def f(x: int) -> int:
        runs.calls.append(x)
        return x

    await f(1)
    configure(default_ttl="1s")
    await f(1)
    assert f.cache.cache is cache
    assert runs.calls == [1]



async def test_memory_tier_hits_never_go_down_when_functions_go_or_move(clock: FakeClock) -> None:
    """The memory tier's ``hits`` count what its functions' hit paths counted: kept when a function is collected
    or moves to another engine (settings changed), so the figure only grows."""
    cache = TieredCache(Settings(), clock=clock)

    def make() -> Any:
        @multilevel_cached(cache=cache, name="tier_hits.f")
        async def f(x: int) -> int:
            return x

        return f

    f = make()
    for _ in range(4):
        await f(1)  # 1 miss, 3 hits
    assert cache.tier_stats()["memory"]["hits"] == 3
    del f
    gc.collect()
    assert cache.tier_stats()["memory"]["hits"] == 3
    g = make()
    await g(1)  # the entry f left: a hit of g's
    assert cache.tier_stats()["memory"]["hits"] == 4

    @multilevel_cached(name="tier_hits.moving")
    async def moving(x: int) -> int:
        return x

    await moving(1)
    await moving(1)
    first = moving.cache.cache
    assert first.tier_stats()["memory"]["hits"] == 1
    configure(default_ttl="1h")  # a new default engine: `moving` stores there from its next call
    await moving(1)
    await moving(1)
    second = moving.cache.cache
    assert second is not first
    assert first.tier_stats()["memory"]["hits"] == 1
    assert second.tier_stats()["memory"]["hits"] == 1
    assert moving.cache_info().hits == 2


async def test_tags_are_plain_strings_never_split_letters(clock: FakeClock) -> None:
    """A ``tags=`` function returning one string is an error (counted; the result is returned, not stored), not
    a tag per letter; `StrEnum` tags work as their values."""
    cache = TieredCache(Settings(), clock=clock)

    class Tag(enum.StrEnum):
        USERS = "users"

    runs = Counter()

    @multilevel_cached(cache=cache, tags=lambda x: "users")
    async def split(x: int) -> int:
        runs.calls.append(x)
        return x

    assert await split(1) == 1
    assert await split(1) == 1
    assert runs.calls == [1, 1]
    assert split.cache_info().errors == 2

    @multilevel_cached(cache=cache, tags=[Tag.USERS])
    async def tagged(x: int) -> int:
        runs.calls.append(x)
        return x

    await tagged(2)
    await tagged(2)
    assert runs.calls == [1, 1, 2]
    await cache.invalidate_tags("users")
    await tagged(2)
    assert runs.calls == [1, 1, 2, 2]
    with pytest.raises(TypeError, match="not one string"):
        await cache.set("k", 1, tags="users")
    assert await cache.set("k", 1, tags=[Tag.USERS]) is True
    await cache.invalidate_tags("users")
    assert await cache.get("k", "gone") == "gone"


def test_stable_list_retries_a_collection_changed_during_iteration() -> None:
    """A weak collection another thread changes while it is listed raises: it is read again, from the start
    (a generator such as ``WeakKeyDictionary.items()`` could not be restarted)."""
    from cachelayers.metrics import stable_list

    tries = []

    def items() -> Any:
        tries.append(1)
        yield 1
        if len(tries) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        yield 2

    assert stable_list(items) == [1, 2]
    assert len(tries) == 2
