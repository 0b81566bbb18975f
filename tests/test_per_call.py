"""Per-call control of `@multilevel_cached`: bypass and refresh (methods and blocks), ``cache_if=``, ``ttl=`` as a
function of the result, and `explain()` / `last_lookup()` reporting which tier answered an exact call."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachelayers
from cachelayers import (
    CachedFunction,
    ConfigError,
    Settings,
    TieredCache,
    explain,
    last_lookup,
    multilevel_cached,
    semantic_cached,
)
from cachelayers.engines.sync import run
from cachelayers.engines.tiered.control import WATCHING
from tests.conftest import FakeClock
from tests.semantic_helpers import AngleEmbedder
from tests.tier_factories import skip_unless_supported

pytestmark = pytest.mark.anyio

KINDS = [pytest.param("memory", marks=pytest.mark.memory), pytest.param("disk", marks=pytest.mark.disk),
         pytest.param("redis", marks=pytest.mark.redis)]


def tiers_of(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    skip_unless_supported(kind, request)
    if kind == "memory":
        return {"memory": "memory://"}
    if kind == "redis":
        return {"memory": "memory://", "redis": str(request.getfixturevalue("redis_url"))}
    return {"memory": "memory://", "disk": f"disk://{tmp_path / 'disk'}"}


@pytest.fixture
async def caches() -> AsyncIterator[list[TieredCache]]:
    """Caches made by a test, closed after it."""
    made: list[TieredCache] = []
    yield made
    for cache in made:
        await cache.aclose()


class Versioned:
    """A function whose every computation returns a new version of its answer."""

    def __init__(self) -> None:
        self.computed = 0

    async def __call__(self, x: int) -> tuple[int, int]:
        self.computed += 1
        return (x, self.computed)


# -- bypass and refresh ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_bypass_neither_reads_nor_stores_and_refresh_overwrites_every_tier(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, caches: list[TieredCache]) -> None:
    """``fn.bypass`` computes without touching any tier; ``fn.refresh`` computes and overwrites the entry in
    every tier, so an engine with an empty memory over the same lower tier reads the refreshed value."""
    tiers = tiers_of(kind, request, tmp_path)
    source = Versioned()

    async def f(x: int) -> tuple[int, int]:
        return await source(x)

    caches.append(TieredCache(Settings(tiers=tiers, tier_timeout="5s")))
    fn = multilevel_cached(cache=caches[-1], name="per-call.f")(f)
    assert await fn(1) == (1, 1)
    assert await fn.bypass(1) == (1, 2)
    assert await fn(1) == (1, 1)  # the bypass stored nothing
    assert await fn.bypass(2) == (2, 3)
    assert await fn(2) == (2, 4)  # ... and read nothing
    assert await fn.refresh(1) == (1, 5)
    assert await fn(1) == (1, 5)
    assert fn.cache.bypassed == 2
    assert fn.cache.refreshed == 1
    if kind != "memory":
        caches.append(TieredCache(Settings(tiers=tiers, tier_timeout="5s")))
        other = multilevel_cached(cache=caches[-1], name="per-call.f")(f)
        assert await other(1) == (1, 5)
        assert other.cache_info().hits_by_tier == {kind: 1}


async def test_blocks_cover_the_calls_of_this_task_and_its_children_only() -> None:
    """``with cachelayers.bypass():`` applies to calls made in the block, however deep, and to tasks started
    in it; a concurrent task outside the block still gets hits."""
    source = Versioned()
    fn = multilevel_cached(cache=TieredCache(Settings()))(source)

    async def deep(x: int) -> tuple[int, int]:
        return await fn(x)

    assert await fn(1) == (1, 1)
    outside: list[tuple[int, int]] = []
    inside: list[tuple[int, int]] = []
    entered, leave = anyio.Event(), anyio.Event()

    async def bystander() -> None:
        await entered.wait()
        outside.append(await fn(1))
        leave.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(bystander)
        with cachelayers.bypass():
            entered.set()
            inside.append(await deep(1))
            async with anyio.create_task_group() as children:
                children.start_soon(lambda: _append(inside, deep(1)))
            await leave.wait()
    assert inside == [(1, 2), (1, 3)]
    assert outside == [(1, 1)]
    with cachelayers.refresh():
        assert await deep(1) == (1, 4)
    assert await fn(1) == (1, 4)
    assert WATCHING[0] == 0


async def _append(into: list[Any], call: Any) -> None:
    into.append(await call)


async def test_a_function_decorated_inside_a_block_obeys_it_and_is_cached_after() -> None:
    """A function made while a block is open starts with its hit path's switch on, and turns it off with the
    others when the block closes."""
    source = Versioned()
    with cachelayers.bypass():
        fn = multilevel_cached(cache=TieredCache(Settings()))(source)
        assert [await fn(1), await fn(1)] == [(1, 1), (1, 2)]
    assert [await fn(1), await fn(1)] == [(1, 3), (1, 3)]
    assert fn.cache_info().hits_by_tier == {"memory": 1}


async def test_the_switch_is_off_again_after_blocks_that_raise() -> None:
    """The hit path's switch counts open blocks and is back to zero after they close, by error or not."""
    def fail() -> None:
        with cachelayers.bypass(), cachelayers.refresh(), explain():
            assert WATCHING[0] == 3
            raise ValueError

    with pytest.raises(ValueError):
        fail()
    assert WATCHING[0] == 0


async def test_during_a_refresh_callers_get_the_old_entry_or_join_the_computation() -> None:
    """While a refresh computes a key, a caller finding the old entry gets it; a caller finding none waits for
    the refresh (single flight: one computation)."""
    release = anyio.Event()
    computed = 0

    @multilevel_cached(cache=TieredCache(Settings()))
    async def slow(x: int) -> tuple[int, int]:
        nonlocal computed
        computed += 1
        mine = computed
        await release.wait()
        return (x, mine)

    release.set()
    assert await slow(1) == (1, 1)
    release = anyio.Event()
    results: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(results, slow.refresh(1)))
        tg.start_soon(lambda: _append(results, slow.refresh(2)))
        await anyio.sleep(0.01)
        tg.start_soon(lambda: _append(results, slow(1)))
        tg.start_soon(lambda: _append(results, slow(2)))
        await anyio.sleep(0.01)
        assert results == [(1, 1)]  # the old entry, at once
        release.set()
    assert computed == 3
    by_key = sorted(results)
    assert by_key[0] == (1, 1)
    assert by_key[2] == by_key[3]  # the caller of 2 got the refresh's own result
    assert {by_key[1][1], by_key[2][1]} == {2, 3}
    assert await slow(1) == by_key[1]


# -- cache_if and ttl functions ------------------------------------------------------------------------------


OPS = st.lists(st.tuples(st.sampled_from(["call", "bypass", "refresh"]), st.integers(0, 4)), max_size=30)


@given(ops=OPS, modulus=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_calls_bypasses_refreshes_and_cache_if_match_a_dict_model(ops: list[tuple[str, int]],
                                                                    modulus: int) -> None:
    """Property: against a dict model, every answer and the number of computations agree, for any sequence of
    calls, bypasses and refreshes under ``cache_if`` (a sync function, so the sync path is covered too)."""
    computed = 0

    def keep(value: tuple[int, int]) -> bool:
        return value[1] % modulus == 0

    @multilevel_cached(cache=TieredCache(Settings()), cache_if=keep)
    def f(x: int) -> tuple[int, int]:
        nonlocal computed
        computed += 1
        return (x, computed)

    model: dict[int, tuple[int, int]] = {}
    expected_computed = 0
    refused = 0
    for op, x in ops:
        if op == "call" and x in model:
            assert f(x) == model[x]
            continue
        expected_computed += 1
        value = (x, expected_computed)
        calls: dict[str, Callable[[int], tuple[int, int]]] = {"call": f, "bypass": f.bypass, "refresh": f.refresh}
        got = calls[op](x)
        assert got == value
        if op != "bypass":
            if keep(value):
                model[x] = value
            else:
                refused += 1  # (a refused refresh leaves the entry it did not replace)
    assert computed == expected_computed
    assert f.cache.not_stored == refused


async def test_cache_if_refused_results_are_returned_not_stored_and_counted() -> None:
    """A result failing ``cache_if`` reaches the caller; the next call computes again."""
    computed = 0

    @multilevel_cached(cache=TieredCache(Settings()), cache_if=lambda r: r["ok"])
    async def answer(q: str) -> dict[str, Any]:
        nonlocal computed
        computed += 1
        return {"ok": q != "bad", "q": q}

    assert await answer("bad") == {"ok": False, "q": "bad"}
    assert await answer("bad") == {"ok": False, "q": "bad"}
    assert await answer("good") == await answer("good")
    assert computed == 3
    assert answer.cache.not_stored == 2


async def test_ttl_as_a_function_of_the_result(clock: FakeClock) -> None:
    """Each entry lives as long as its result says; ``None`` is the default lifetime, zero is not stored."""
    computed: list[int] = []

    def lifetime(value: int) -> float | str | None:
        lifetimes: dict[int, float | str | None] = {1: 10.0, 2: "1m", 3: None}
        return lifetimes.get(value, 0)

    cache = TieredCache(Settings(default_ttl=300), clock=clock)

    @multilevel_cached(cache=cache, ttl=lifetime)
    async def f(x: int) -> int:
        computed.append(x)
        return x

    for x in (1, 2, 3, 4):
        await f(x)
    clock.advance(11)
    for x in (1, 2, 3, 4):
        await f(x)
    assert computed == [1, 2, 3, 4, 1, 4]  # 1 expired after 10 s, 4 was never stored
    clock.advance(50)
    await f(2)
    await f(3)
    assert computed == [1, 2, 3, 4, 1, 4, 2]  # 2 expired after a minute; 3 lives the default 300 s
    assert f.cache.not_stored == 2


async def test_a_failing_ttl_function_loses_no_result_and_is_raised_in_strict_mode() -> None:
    """A ``ttl`` function returning nonsense (or a ``cache_if`` that raises): the result is returned, not
    stored, counted as an error; in strict mode the failure is raised."""

    @multilevel_cached(cache=TieredCache(Settings()), ttl=lambda r: "soon")
    async def f(x: int) -> int:
        return x

    assert await f(1) == 1
    assert f.cache_info().errors == 1
    assert f.cache_info().misses == 1

    @multilevel_cached(cache=TieredCache(Settings(strict=True)), cache_if=lambda r: 1 / 0 > 0)
    async def g(x: int) -> int:
        return x

    with pytest.raises(ZeroDivisionError):
        await g(1)


def test_bad_per_result_options_are_config_errors_naming_the_field() -> None:
    """``ttl``/``cache_if`` functions that cannot take the result alone, or a ``cache_if`` that is not a
    function, fail at decoration."""

    async def f(x: int) -> int:
        return x

    for options, field in (({"ttl": lambda: 5}, "ttl"), ({"cache_if": lambda a, b: True}, "cache_if"),
                           ({"cache_if": True}, "cache_if")):
        with pytest.raises(ConfigError) as info:
            multilevel_cached(**options)(f)
        assert info.value.field == field


async def test_batch_functions_apply_cache_if_per_item() -> None:
    """With ``batch=``, each item's result is checked by ``cache_if``: refused items are computed again; the
    per-call methods are refused (they would key the whole list)."""
    seen: list[list[int]] = []

    @multilevel_cached(cache=TieredCache(Settings()), batch=True, cache_if=lambda r: r % 2 == 0)
    async def double_or_odd(xs: list[int]) -> list[int]:
        seen.append(list(xs))
        return [x * 2 if x < 3 else x for x in xs]

    assert await double_or_odd([1, 2, 3, 4]) == [2, 4, 3, 4]
    assert await double_or_odd([1, 2, 3, 4]) == [2, 4, 3, 4]
    assert seen == [[1, 2, 3, 4], [3]]
    with pytest.raises(TypeError, match="batch="):
        await double_or_odd.bypass([1])


# -- explain and last_lookup ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_explain_reports_which_tier_answered_an_exact_call(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, caches: list[TieredCache]) -> None:
    """computed, then exact from memory; from the lower tier for a fresh engine; bypass and refresh with
    their reasons; ``last_lookup`` inside the block gives the last one."""
    tiers = tiers_of(kind, request, tmp_path)
    source = Versioned()

    def make() -> CachedFunction[[int], tuple[int, int]]:
        caches.append(TieredCache(Settings(tiers=tiers, tier_timeout="5s")))
        return multilevel_cached(cache=caches[-1], name="per-call.explained")(source)

    fn, other = make(), make()
    with explain() as info:
        await fn(1)
        await fn(1)
        last = last_lookup()
        if kind != "memory":
            await other(1)
        await fn.bypass(1)
        with cachelayers.refresh():
            await fn(1)
    assert last is not None
    assert (last.level, last.tier) == ("exact", "memory")
    expected: list[tuple[str, str | None, str | None]] = [("computed", None, None), ("exact", "memory", None)]
    if kind != "memory":
        expected.append(("exact", kind, None))
    expected += [("uncached", None, "bypass"), ("computed", None, "refresh")]
    assert [(lookup.level, lookup.tier, lookup.reason) for lookup in info] == expected
    assert {lookup.function for lookup in info} == {"per-call.explained"}
    assert {lookup.decorator for lookup in info} == {"multilevel_cached"}
    assert info.levels() == {}  # levels() counts the semantic layer's lookups unless asked otherwise
    assert info.levels("multilevel_cached") == info.levels(None) == Counter(lookup[0] for lookup in expected)
    assert len({lookup.partition for lookup in info}) == 1


async def test_explain_reports_a_call_that_joined_a_computation_in_flight() -> None:
    """A second caller of a key being computed is reported as answered ``in-flight``."""
    release = anyio.Event()

    @multilevel_cached(cache=TieredCache(Settings()))
    async def slow(x: int) -> int:
        await release.wait()
        return x

    with explain() as info:
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow, 1)
            await anyio.sleep(0.01)
            tg.start_soon(slow, 1)
            await anyio.sleep(0.01)
            release.set()
    assert sorted((lookup.level, lookup.tier or "") for lookup in info) == [("computed", ""), ("exact", "in-flight")]


async def test_stacked_exact_over_semantic_reports_the_semantic_lookup_last() -> None:
    """A miss of the exact layer is reported before its function runs, so the semantic layer's lookup is the
    last one."""

    @multilevel_cached(cache=TieredCache(Settings()))
    @semantic_cached(embed=AngleEmbedder(), threshold=0.9)
    async def ask(question: str) -> str:
        return question

    await ask("c@0")
    with explain() as info:
        assert await ask("c@5") == "c@0"
        last = last_lookup()
    assert [lookup.level for lookup in info] == ["computed", "semantic"]
    assert last is not None
    assert last.level == "semantic"


def test_sync_functions_take_the_same_controls_from_their_thread() -> None:
    """For a sync function: the methods, the blocks opened in the calling thread, and explain()."""
    computed = 0

    @multilevel_cached(cache=TieredCache(Settings()))
    def f(x: int) -> int:
        nonlocal computed
        computed += 1
        return computed

    assert f(1) == 1
    assert f.bypass(1) == 2
    assert f.refresh(1) == 3
    assert f(1) == 3
    outcome: list[Any] = []

    def in_thread() -> None:
        with cachelayers.bypass():
            outcome.append(f(1))
        with explain() as info:
            f(1)
        outcome.append([(lookup.level, lookup.tier) for lookup in info])
        outcome.append(last_lookup())

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(30)
    assert outcome[:2] == [4, [("exact", "memory")]]
    assert (outcome[2].level, outcome[2].tier) == ("exact", "memory")  # last_lookup() in the calling thread
    assert f(1) == 3
    run(f.cache.invalidate_all)
