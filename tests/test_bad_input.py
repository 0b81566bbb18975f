"""Bad input: each a clear error at the right moment — and cache failures never fail the call.

Configuration errors are `ConfigError`s naming the field, raised when the configuration is made (settings,
decoration). Argument errors are raised at call time, before the function runs. A value that cannot be stored,
a tier that raises or hangs: the decorated call still returns its result, and the failure is counted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import anyio
import numpy as np
import pytest

from cachelayers import (
    Backend,
    BackendError,
    BackendURL,
    ConfigError,
    InvalidationError,
    MemoryBackend,
    SerializationError,
    Settings,
    StoreItem,
    SyncCachedFunction,
    TieredCache,
    UnkeyableArgumentError,
    configure,
    multilevel_cached,
    semantic_cached,
)
from tests.conftest import FakeClock

# -- configuration: tiers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "field", "message"),
    [
        pytest.param("couchbase://localhost", "tiers['t']", "unknown scheme 'couchbase'", id="unknown-scheme"),
        pytest.param("://nothing", "tiers['t']", "unknown scheme", id="empty-scheme"),
        pytest.param("localhost:6379", "tiers['t']", "expected a URL", id="no-scheme"),
        pytest.param("", "tiers['t']", "expected a URL", id="empty"),
        pytest.param("redis://host:port", "tiers['t']", "malformed URL", id="malformed-port"),
        pytest.param("redis://localhost:99999", "tiers['t']", "malformed URL", id="port-out-of-range"),
        pytest.param("redis://localhost/zero", "tiers['t']", "database number", id="bad-database"),
        pytest.param("memory://#fragment", "tiers['t']", "fragment", id="fragment"),
        pytest.param("memory://host", "tiers['t']", "no host or path", id="memory-with-host"),
        pytest.param("memory://?ttl=5", "tiers['t']?ttl", "unknown option", id="unknown-option"),
        pytest.param("memory://?max_entries=1&max_entries=2", "tiers['t']?max_entries", "given twice",
                     id="option-twice"),
        pytest.param("memory://?max_entries=0", "tiers['t']?max_entries", "positive", id="zero-entries"),
        pytest.param("memory://?max_entries=-5", "tiers['t']?max_entries", "positive", id="negative-entries"),
        pytest.param("memory://?max_entries=many", "tiers['t']?max_entries", "positive", id="word-entries"),
        pytest.param("memory://?max_bytes=0", "tiers['t']?max_bytes", "positive", id="zero-bytes"),
        pytest.param("memory://?max_bytes=-1MiB", "tiers['t']?max_bytes", "malformed size", id="negative-bytes"),
        pytest.param("memory://?max_bytes=1.5.3", "tiers['t']?max_bytes", "malformed size", id="malformed-bytes"),
        pytest.param("disk:///tmp/cl?max_bytes=0", "tiers['t']?max_bytes", "positive", id="disk-zero-bytes"),
        pytest.param("redis://localhost/0?max_connections=-1", "tiers['t']?max_connections", "positive",
                     id="redis-negative-option"),
    ],
)
def test_bad_tier_urls(url: str, field: str, message: str) -> None:
    """A bad tier URL fails when the settings are made, naming the tier (and option) and the value."""
    with pytest.raises(ConfigError, match=message) as info:
        Settings(tiers={"t": url})
    assert info.value.field == field
    assert field in str(info.value)


def test_passwords_in_bad_urls_are_redacted() -> None:
    """The error about a URL with a password does not show the password."""
    with pytest.raises(ConfigError) as info:
        Settings(tiers={"t": "redis://:hunter2@localhost/0?bogus=1"})
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        pytest.param([], "at least one tier", id="none"),
        pytest.param(42, "expected URLs", id="wrong-type"),
        pytest.param([("a", "memory://"), ("a", "memory://")], "unique", id="duplicate-names"),
        pytest.param({"t": 5}, "expected a URL string", id="url-not-a-string"),
    ],
)
def test_bad_tier_lists(tiers: Any, message: str) -> None:
    """The tier list itself is checked."""
    with pytest.raises(ConfigError, match=message):
        Settings(tiers=tiers)


# -- configuration: durations, breaker, other settings ---------------------------------------------------------

BAD_DURATIONS = [
    pytest.param(-1, "must be positive", id="negative"),
    pytest.param(0, "must be positive", id="zero"),
    pytest.param(-0.5, "must be positive", id="negative-float"),
    pytest.param("-5s", "malformed", id="negative-string"),
    pytest.param("5 parsecs", "malformed", id="unknown-unit"),
    pytest.param("soon", "malformed", id="word"),
    pytest.param("", "malformed", id="empty"),
    pytest.param(float("nan"), "finite", id="nan"),
    pytest.param(float("inf"), "finite", id="infinite"),
    pytest.param(True, "bool", id="bool"),
    pytest.param([5], "expected a duration", id="list"),
    pytest.param(timedelta(seconds=-1), "must be positive", id="negative-timedelta"),
]


@pytest.mark.parametrize(("ttl", "message"), BAD_DURATIONS)
def test_bad_ttl_fails_at_decoration(ttl: Any, message: str) -> None:
    """``ttl=`` is checked when the function is decorated, not at its first call."""

    async def f(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match=message) as info:
        multilevel_cached(ttl=ttl)(f)
    assert info.value.field == "ttl"


@pytest.mark.parametrize(("ttl", "message"), BAD_DURATIONS)
@pytest.mark.parametrize("field", ["default_ttl", "tier_timeout", "breaker_cooldown"])
def test_bad_durations_in_settings(field: str, ttl: Any, message: str) -> None:
    """Durations in settings are checked when the settings are made."""
    with pytest.raises(ConfigError, match=message) as info:
        Settings(**{field: ttl})
    assert info.value.field == field


@pytest.mark.anyio
@pytest.mark.parametrize(("ttl", "message"), BAD_DURATIONS[:6])
async def test_bad_ttl_in_the_key_value_api(clock: FakeClock, ttl: Any, message: str) -> None:
    """``TieredCache.set(ttl=...)`` rejects a bad TTL and stores nothing."""
    cache = TieredCache(Settings(), clock=clock)
    with pytest.raises(ConfigError, match=message):
        await cache.set("k", "v", ttl=ttl)
    assert await cache.get("k", "absent") == "absent"


TOO_LONG = [
    pytest.param(1e30, id="1e30"),
    pytest.param(1000 * 365 * 86400 + 1, id="1000-years-and-1s"),
    pytest.param("53000w", id="weeks-string"),
    pytest.param(timedelta(days=400000), id="timedelta"),
]


@pytest.mark.parametrize("ttl", TOO_LONG)
def test_a_ttl_no_tier_can_store_fails_at_decoration(ttl: Any) -> None:
    """A TTL over 1000 years (Redis refuses ``PX`` of 1e33 ms: the function would silently never be cached
    there) fails at decoration, naming ``ttl`` and saying how to keep entries for ever."""

    async def f(x: int) -> int:
        return x

    for decorate in (multilevel_cached(ttl=ttl), semantic_cached(threshold=0.9, ttl=ttl)):
        with pytest.raises(ConfigError, match=r"at most 1000 years.*use ttl=None for entries that never expire") \
                as info:
            decorate(f)
        assert info.value.field == "ttl"


@pytest.mark.parametrize("ttl", TOO_LONG)
def test_a_default_ttl_no_tier_can_store_fails_when_the_settings_are_made(ttl: Any) -> None:
    with pytest.raises(ConfigError, match=r"at most 1000 years.*use default_ttl=None") as info:
        Settings(default_ttl=ttl)
    assert info.value.field == "default_ttl"
    with pytest.raises(ConfigError, match="at most 1000 years") as info:
        Settings.from_env({"CACHELAYERS_DEFAULT_TTL": "60000w"})
    assert info.value.field == "CACHELAYERS_DEFAULT_TTL"


@pytest.mark.parametrize(("options", "field"), [
    pytest.param({"ttl": 60, "stale": 1e30}, "stale", id="stale"),
    pytest.param({"ttl": 60, "stale": "60000w"}, "stale", id="stale-string"),
    pytest.param({"lock": 1e30}, "lock", id="lock-lease"),
])
def test_a_grace_period_or_lease_no_tier_can_store_fails_at_decoration(options: dict[str, Any], field: str) -> None:
    """``stale=`` extends the entry's lifetime in Redis, ``lock=`` is a Redis lease (``PX``): bounded alike."""

    async def f(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="at most 1000 years") as info:
        multilevel_cached(**options)(f)
    assert info.value.field == field


@pytest.mark.anyio
async def test_a_ttl_no_tier_can_store_in_the_key_value_api(clock: FakeClock) -> None:
    cache = TieredCache(Settings(), clock=clock)
    with pytest.raises(ConfigError, match="use ttl=None") as info:
        await cache.set("k", "v", ttl=1e30)
    assert info.value.field == "ttl"
    assert await cache.get("k", "absent") == "absent"
    assert await cache.set("k", "v", ttl="365000d")  # the longest is stored
    assert await cache.get("k") == "v"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"breaker_threshold": 0}, "breaker_threshold", id="threshold-zero"),
        pytest.param({"breaker_threshold": -3}, "breaker_threshold", id="threshold-negative"),
        pytest.param({"breaker_threshold": 2.5}, "breaker_threshold", id="threshold-float"),
        pytest.param({"breaker_threshold": "five"}, "breaker_threshold", id="threshold-word"),
        pytest.param({"breaker_threshold": True}, "breaker_threshold", id="threshold-bool"),
        pytest.param({"key_prefix": "my app:"}, "key_prefix", id="prefix-with-space"),
        pytest.param({"secret": "short"}, "secret", id="secret-too-short"),
        pytest.param({"secret": "x" * 65}, "secret", id="secret-too-long"),
        pytest.param({"allow_pickle": "maybe"}, "allow_pickle", id="pickle-maybe"),
        pytest.param({"strict": 2}, "strict", id="strict-number"),
        pytest.param({"vector_index": "s3://bucket"}, "vector_index", id="vector-index-scheme"),
        pytest.param({"limits": {"llm": "lots"}}, "limits['llm']", id="limit-malformed"),
        pytest.param({"limits": ["3500/minute"]}, "limits", id="limits-not-a-mapping"),
    ],
)
def test_bad_settings_values(changes: dict[str, Any], field: str) -> None:
    """Every setting is validated when the settings are made; the error names it."""
    with pytest.raises(ConfigError) as info:
        Settings(**changes)
    assert info.value.field == field
    if field == "secret":
        assert changes["secret"] not in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Settings.from_mapping({"tier": "memory://"}), id="from-mapping"),
        pytest.param(lambda: Settings().with_(ttl=5), id="with"),
        pytest.param(lambda: configure(default_tll="1h"), id="configure-keyword"),
        pytest.param(lambda: configure({"tiers": ["memory://"], "retries": 3}), id="configure-mapping"),
    ],
)
def test_unknown_setting_names(make: Any) -> None:
    """A misspelt setting is an error listing the known ones, never silently ignored."""
    with pytest.raises(ConfigError, match=r"unknown setting; known: .*default_ttl"):
        make()


@pytest.mark.parametrize(
    ("environ", "field"),
    [
        pytest.param({"CACHELAYERS_TIER": "memory://"}, "CACHELAYERS_TIER", id="unknown-variable"),
        pytest.param({"CACHELAYERS_DEFAULT_TTL": "-1"}, "CACHELAYERS_DEFAULT_TTL", id="bad-ttl"),
        pytest.param({"CACHELAYERS_TIERS": "memory://?max_entries=0"}, "CACHELAYERS_TIERS['memory']?max_entries",
                     id="bad-tier"),
        pytest.param({"CACHELAYERS_BREAKER_THRESHOLD": "0"}, "CACHELAYERS_BREAKER_THRESHOLD", id="bad-threshold"),
        pytest.param({"CACHELAYERS_STRICT": "perhaps"}, "CACHELAYERS_STRICT", id="bad-bool"),
    ],
)
def test_bad_environment_variables(environ: dict[str, str], field: str) -> None:
    """Environment errors name the variable as the user wrote it."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    assert info.value.field == field


# -- decoration ----------------------------------------------------------------------------------------------


def test_ignore_naming_an_unknown_parameter() -> None:
    """``ignore=`` with a parameter the function lacks fails at decoration, naming it."""

    async def fetch(client: object, url: str) -> str:
        return url

    with pytest.raises(ConfigError, match="clinet") as info:
        multilevel_cached(ignore=("clinet",))(fetch)
    assert info.value.field == "ignore"


def test_non_functions_are_refused_and_sync_functions_are_sync_cached_functions() -> None:
    """Decorating something that is not callable is a TypeError at decoration time; a plain function (welcome
    since issue 14, see tests/test_sync.py) gives a `SyncCachedFunction`, both bare and with options."""

    def sync(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="needs a function"):
        multilevel_cached(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="needs a function"):
        multilevel_cached(ttl=5)("f")  # type: ignore[call-overload]
    assert isinstance(multilevel_cached(sync), SyncCachedFunction)
    assert isinstance(multilevel_cached(ttl=5)(sync), SyncCachedFunction)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param({"namespace": "a:b"}, ConfigError, id="namespace-colon"),
        pytest.param({"namespace": ""}, ConfigError, id="namespace-empty"),
        pytest.param({"cost": -1.0}, TypeError, id="negative-cost"),
        pytest.param({"cost": "cheap"}, TypeError, id="cost-word"),
        pytest.param({"namespace": "a\x00b"}, ConfigError, id="namespace-nul"),
        pytest.param({"tags": [1, 2]}, TypeError, id="tags-not-strings"),
        pytest.param({"tags": "red"}, TypeError, id="tags-a-string"),
        pytest.param({"tags": ["ok", "ns\x1fother"]}, ConfigError, id="tags-reserved-prefix"),
    ],
)
def test_bad_decorator_options(options: dict[str, Any], error: type[Exception]) -> None:
    """Other decorator options are checked at decoration too."""

    async def f(x: int) -> int:
        return x

    with pytest.raises(error):
        multilevel_cached(**options)(f)


@pytest.mark.anyio
async def test_tags_in_the_namespace_form_are_refused_where_they_come_in(clock: FakeClock) -> None:
    """A tag starting as namespace tags do would confuse the two: refused by the key/value API at the call, and
    from a ``tags=`` function counted as an error while the call still returns its (unstored) result."""
    cache = TieredCache(Settings(), clock=clock)
    with pytest.raises(ValueError, match="reserved for namespace tags"):
        await cache.set("k", "v", tags=["ns\x1fsneaky"])
    assert await cache.get("k", "absent") == "absent"
    runs: list[int] = []

    @multilevel_cached(cache=cache, tags=lambda x: ["ns\x1fsneaky"])
    async def f(x: int) -> int:
        runs.append(x)
        return x

    assert await f(1) == 1
    assert await f(1) == 1
    assert runs == [1, 1]
    assert f.cache_info().errors == 2


# -- call time: arguments --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unkeyable_argument_fails_at_call_time_naming_it(clock: FakeClock) -> None:
    """An argument without a key raises a TypeError naming it, before the function runs; ``key=`` avoids it."""
    runs: list[Any] = []

    async def chat(messages: list[dict[str, Any]], model: str = "m") -> str:
        runs.append(messages)
        return "ok"

    cached = multilevel_cached(cache=TieredCache(Settings(), clock=clock))(chat)
    with pytest.raises(UnkeyableArgumentError, match=r"messages\[0\]\['meta'\]") as info:
        await cached([{"role": "user", "meta": object()}])
    assert isinstance(info.value, TypeError)
    assert info.value.argument == "messages[0]['meta']"
    assert runs == []
    with pytest.raises(TypeError, match="'model'"):
        await cached([], model=object())  # type: ignore[arg-type]

    keyed = multilevel_cached(cache=TieredCache(Settings(), clock=clock),
                              key=lambda messages, **_: [m["role"] for m in messages])(chat)
    assert await keyed([{"role": "user", "meta": object()}]) == "ok"
    assert await keyed([{"role": "user", "meta": object()}]) == "ok"
    assert len(runs) == 1


@pytest.mark.anyio
async def test_unkeyable_self_is_named(clock: FakeClock) -> None:
    """A method on an instance without ``__cache_key__`` names ``self`` and suggests ``ignore=``."""
    cache = TieredCache(Settings(), clock=clock)

    class Service:
        @multilevel_cached(cache=cache)
        async def get(self, x: int) -> int:
            return x

    with pytest.raises(UnkeyableArgumentError, match=r"'self'.*ignore="):
        await Service().get(1)


# -- call time: values that cannot be stored ---------------------------------------------------------------------


class Opaque:
    """A return value the codec cannot encode."""


@pytest.mark.anyio
async def test_unencodable_result_is_returned_and_counted(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """The caller gets the value; nothing is stored; ``unstorable`` counts it; the log says it once."""
    l2 = MemoryBackend(clock=clock)
    cache = TieredCache(Settings(), backends={"l1": MemoryBackend(clock=clock), "l2": l2}, clock=clock)
    made: list[Opaque] = []

    @multilevel_cached(cache=cache)
    async def build(x: int) -> Opaque:
        made.append(Opaque())
        return made[-1]

    with caplog.at_level(logging.WARNING, logger="cachelayers"):
        first = await build(1)
        second = await build(1)
    assert first is made[0]
    assert second is made[1]
    assert build.cache_info().unstorable == 2
    assert len(l2) == 0
    assert cache.local is not None
    assert len(cache.local) == 0
    assert len([r for r in caplog.records if "Opaque" in r.getMessage()]) == 1


@pytest.mark.anyio
async def test_unencodable_result_raises_in_strict_mode(clock: FakeClock) -> None:
    """Strict mode raises the cache failure instead (for tests and debugging)."""

    @multilevel_cached(cache=TieredCache(Settings(strict=True), clock=clock))
    async def build(x: int) -> Opaque:
        return Opaque()

    with pytest.raises(SerializationError):
        await build(1)


# -- call time: failing and hanging tiers ------------------------------------------------------------------------


class FailingBackend(Backend):
    """A lower tier whose every operation raises while ``failing`` is set (a test double)."""

    def __init__(self) -> None:
        super().__init__(BackendURL.parse("failing://"))
        self.failing = True
        self.calls = 0
        self.store = MemoryBackend()

    async def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("connection refused")

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        await self._maybe_fail()
        return await self.store.get_many(keys)

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        await self._maybe_fail()
        await self.store.set_many(items)

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self._maybe_fail()
        await self.store.delete_many(keys)

    async def delete_tags(self, tags: Sequence[str]) -> None:
        await self._maybe_fail()
        await self.store.delete_tags(tags)

    async def clear(self) -> None:
        await self._maybe_fail()
        await self.store.clear()


class HangingBackend(FailingBackend):
    """A lower tier whose every operation never returns (a test double)."""

    async def _maybe_fail(self) -> None:
        self.calls += 1
        await anyio.sleep_forever()


def cache_over(lower: Backend, clock: FakeClock, **settings: Any) -> TieredCache:
    return TieredCache(Settings(**settings), backends={"memory": MemoryBackend(clock=clock), "lower": lower},
                       clock=clock)


@pytest.mark.anyio
async def test_failing_tier_is_skipped_and_its_breaker_opens_then_closes(clock: FakeClock) -> None:
    """Calls return their values while the lower tier fails; after ``breaker_threshold`` failures the tier is
    not called any more; after the cooldown one probe goes through and, the tier being healthy, closes it."""
    lower = FailingBackend()
    cache = cache_over(lower, clock, breaker_threshold=3, breaker_cooldown="30s")
    runs: list[int] = []

    @multilevel_cached(cache=cache)
    async def double(x: int) -> int:
        runs.append(x)
        return 2 * x

    x = 0
    while cache.tier_stats()["lower"]["breaker"] != "open":
        x += 1
        assert await double(x) == 2 * x
        assert x < 10, "the breaker never opened"
    stats = cache.tier_stats()["lower"]
    assert stats["errors"] == 3
    assert lower.calls == 3
    assert await double(100) == 200  # breaker open: the tier is not called
    assert lower.calls == 3
    assert cache.tier_stats()["lower"]["skipped"] >= 1
    assert await double(1) == 2  # memory still serves
    assert runs == [*range(1, x + 1), 100]

    lower.failing = False
    clock.advance(30)
    assert await double(200) == 400  # the half-open probe succeeds and closes the breaker
    stats = cache.tier_stats()["lower"]
    assert stats["breaker"] == "closed"
    assert stats["errors"] == 3
    assert lower.calls > 3
    assert await double(201) == 402
    assert len(lower.store) == 2  # entries written since it recovered


@pytest.mark.anyio
async def test_failed_probe_reopens_the_breaker(clock: FakeClock) -> None:
    """A probe that fails opens the breaker for another cooldown."""
    lower = FailingBackend()
    cache = cache_over(lower, clock, breaker_threshold=1, breaker_cooldown=10)

    @multilevel_cached(cache=cache)
    async def ident(x: int) -> int:
        return x

    assert await ident(1) == 1
    assert cache.tier_stats()["lower"]["breaker"] == "open"
    calls = lower.calls
    clock.advance(10)
    assert await ident(2) == 2
    assert lower.calls == calls + 1  # one probe
    assert cache.tier_stats()["lower"]["breaker"] == "open"
    assert await ident(3) == 3
    assert lower.calls == calls + 1


@pytest.mark.anyio
async def test_hanging_tier_times_out(clock: FakeClock) -> None:
    """A tier that never answers costs at most ``tier_timeout`` per operation and counts as a timeout."""
    lower = HangingBackend()
    cache = cache_over(lower, clock, tier_timeout="20ms", breaker_threshold=2)

    @multilevel_cached(cache=cache)
    async def ident(x: int) -> int:
        return x

    with anyio.fail_after(5):
        assert await ident(1) == 1
        assert await ident(2) == 2
        assert await ident(3) == 3
    stats = cache.tier_stats()["lower"]
    assert stats["timeouts"] == 2
    assert stats["breaker"] == "open"
    assert await ident(1) == 1


@pytest.mark.anyio
async def test_failing_tier_in_strict_mode_raises(clock: FakeClock) -> None:
    """Strict mode turns a tier failure into a BackendError that keeps the driver's exception."""
    cache = cache_over(FailingBackend(), clock, strict=True)

    @multilevel_cached(cache=cache)
    async def ident(x: int) -> int:
        return x

    with pytest.raises(BackendError) as info:
        await ident(1)
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.anyio
async def test_failing_tier_does_not_break_the_key_value_api(clock: FakeClock) -> None:
    """get/set/delete/invalidate keep working on the healthy tiers; an invalidation the failing tier did not
    take is reported (`InvalidationError`, issue 11: never silently lost), after it was applied to the others."""
    cache = cache_over(FailingBackend(), clock)
    assert await cache.set("k", "v", tags=["t"]) is True
    assert await cache.get("k") == "v"
    with pytest.raises(InvalidationError, match="'lower'"):
        await cache.invalidate_tags("t")
    assert await cache.get("k", "gone") == "gone"
    await cache.set("k", "v")
    with pytest.raises(InvalidationError):
        await cache.delete("k")
    with pytest.raises(InvalidationError):
        await cache.clear()
    assert await cache.get("k", "gone") == "gone"


@pytest.mark.parametrize(("decorator", "options", "field"), [
    pytest.param(multilevel_cached, {"version": [1]}, "version", id="multilevel-version-list"),
    pytest.param(multilevel_cached, {"version": {"a": 1}}, "version", id="multilevel-version-dict"),
    pytest.param(multilevel_cached, {"cache": 5}, "cache", id="multilevel-cache"),
    pytest.param(semantic_cached, {"version": [1]}, "version", id="semantic-version-list"),
    pytest.param(semantic_cached, {"version": True}, "version", id="semantic-version-bool"),
    pytest.param(semantic_cached, {"clock": 5}, "clock", id="semantic-clock"),
    pytest.param(semantic_cached, {"cache": 5}, "cache", id="semantic-cache"),
])
def test_engine_options_of_the_wrong_kind_fail_at_decoration(decorator: Any, options: dict[str, Any],
                                                             field: str) -> None:
    """Before, each was accepted: a clock of 5 made every store write fail (nothing ever cached), a cache of 5
    failed every embedding-cache read, a list version went into the keys as its text."""

    async def f(x: str) -> str:
        return x

    with pytest.raises(ConfigError) as info:
        decorator(**options)(f)
    assert info.value.field == field


@pytest.mark.parametrize("version", [0, 3, "v2", "", 1.5, np.int64(3), uuid.UUID(int=7)])
def test_a_str_number_or_uuid_version_is_accepted(version: Any) -> None:
    async def f(x: str) -> str:
        return x

    multilevel_cached(version=version)(f)
    semantic_cached(version=version)(f)


@pytest.mark.parametrize(("env", "field"), [
    ({"CACHELAYERS_BREAKER_THRESHOLD": "²"}, "CACHELAYERS_BREAKER_THRESHOLD"),  # a digit for str.isdigit, not int()
    ({"CACHELAYERS_SEMANTIC_MAX_ENTRIES": "5²"}, "CACHELAYERS_SEMANTIC_MAX_ENTRIES"),
    ({"CACHELAYERS_TIERS": "memory://?max_entries=²"}, "max_entries"),
    ({"CACHELAYERS_TIERS": "memory://?max_bytes=" + "9" * 400}, "max_bytes"),  # float() of it is infinite
])
def test_hostile_numbers_in_the_environment_are_config_errors(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert field in str(info.value.field)
