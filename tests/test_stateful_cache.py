"""A `TieredCache` against a plain dict model, under a fake clock, over several tier configurations.

The machine drives the key/value API (set with and without TTL and tags, get, delete) and two functions
decorated with `multilevel_cached` (invalidation by arguments and by namespace), lets time pass, and checks
after every step that

* a call returns the model's value for *its* key, never another key's, and never an expired one;
* tiers the model can see into (memory tiers) hold exactly what the model predicts, in the model's LRU order,
  with the absolute expiry of the original write (back-fill keeps the *remaining* lifetime), and within both
  of their bounds;
* a function runs exactly when the model says the call misses every tier.

Tiers it cannot see into (a later Redis or disk tier) are modelled by what they *may* hold: a hit there must
be a live entry the model wrote, a miss teaches the model it is gone. Adding such a tier is one `TierSpec`
line in `TIER_CONFIGS`.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from cachelayers import Backend, MemoryBackend, Settings, TieredCache, multilevel_cached
from cachelayers.backends import create_backend
from cachelayers.backends.memory import EXPIRES_AT, SIZE, STORAGE_KEY, VALUE, Slot
from cachelayers.codec import Codec
from cachelayers.durations import parse_duration
from cachelayers.engines import namespace_tag
from cachelayers.keys import KeyBuilder
from tests.conftest import FakeClock
from tests.strategies import durations, payload_sizes, tag_sets
from tests.tier_factories import REDIS_ON_TRIO

pytestmark = pytest.mark.anyio

# At least 500 examples of every configuration on asyncio (the CI requirement); trio replays the same machine
# with fewer, to show the engine is neutral to the event loop without doubling the suite's longest test.
EXAMPLES: Final = {"asyncio": 500, "trio": 100}
# Configurations with real Redis or disk tiers pay round trips and a fresh connection/database per example: the
# memory configurations keep the 500, these run fewer to keep the suite within its time budget.
EXAMPLES_WITH_REAL_TIERS: Final = {"asyncio": 120, "trio": 40}
STEPS: Final = 25
# Bookkeeping a tier may charge beyond an entry's encoded body (envelope header, mac, per-slot overhead).
# `payload_sizes` keeps every entry either this far below a tier's byte bound or above it.
SIZE_SLACK: Final = 160
KV_KEYS: Final = ("a", "b", "c", "d")
MISS: Final = object()


@dataclass(frozen=True)
class TierSpec:
    """One tier of a configuration.

    Args:
        name: Tier name (as in ``Settings.tiers``).
        url: URL the tier is built from.
        fixtures: Names of pytest fixtures the tier needs, resolved once per test (e.g. ``"redis_url"``).
        make: Builds the backend instead of the URL, from the fake clock and the fixtures' values.
        asyncio_only: The backend's driver cannot run under trio; the trio run of its configuration is skipped.

    A Redis tier, for example, is one line::

        TierSpec("redis", fixtures=("redis_url",), asyncio_only=True,
                 make=lambda clock, fx: create_backend(fx["redis_url"], clock=clock))

    Each example uses its own key prefix, so tiers shared by all the examples of a test need no flushing.
    """

    name: str
    url: str = "memory://"
    fixtures: tuple[str, ...] = ()
    make: Callable[[FakeClock, Mapping[str, Any]], Backend] | None = None
    asyncio_only: bool = False

    def build(self, clock: FakeClock, fixtures: Mapping[str, Any]) -> Backend:
        if self.make is not None:
            return self.make(clock, fixtures)
        return create_backend(self.url, clock=clock, field=f"tiers[{self.name!r}]")


def memory_tier(name: str, max_entries: int, max_bytes: int) -> TierSpec:
    """A memory tier with tight bounds, so that eviction happens all the time."""
    return TierSpec(name, f"memory://?max_entries={max_entries}&max_bytes={max_bytes}")


L1: Final = memory_tier("l1", 2, 1500)
REDIS: Final = TierSpec("redis", fixtures=("redis_url",),
                        make=lambda clock, fx: create_backend(fx["redis_url"], clock=clock))
DISK: Final = TierSpec("disk", fixtures=("tmp_path",),
                       make=lambda clock, fx: create_backend(f"disk://{fx['tmp_path']}/disk", clock=clock))
TIER_CONFIGS: Final = [
    # One tier: built by the engine from Settings(tiers=...), as applications do.
    pytest.param((L1,), id="memory"),
    # A second memory tier below the first stores sealed envelopes: a stand-in for Redis that the model can
    # see into, so back-fill of the upper tier with the remaining TTL is checked exactly.
    pytest.param((L1, memory_tier("l2", 10, 4000)), id="memory+memory"),
    # Real shared tiers below memory (Redis is asyncio-only: skipped under trio).
    pytest.param((L1, REDIS), id="memory+redis", marks=pytest.mark.redis),
    pytest.param((L1, DISK), id="memory+disk", marks=pytest.mark.disk),
    pytest.param((L1, REDIS, DISK), id="memory+redis+disk", marks=[pytest.mark.redis, pytest.mark.disk]),
]


@dataclass
class Entry:
    """What the model knows of one key: the last value written and how long it lives."""

    value: Any
    expires_at: float | None
    tags: frozenset[str]
    body_size: int  # encoded size, to decide whether the entry fits a tier

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass
class TierModel:
    """The model of one tier: exact (LRU order with sizes) for memory tiers, *may hold* for the others."""

    name: str
    backend: Backend
    exact: bool
    max_entries: int = 0
    max_bytes: int = 0
    order: OrderedDict[str, int] = field(default_factory=OrderedDict)  # storage key -> charged size, LRU first
    may_hold: set[str] = field(default_factory=set)
    # Names a memory slot by its storage key. A memory-only engine stores no storage key in its slots (nothing
    # outside the process names them), so the machine derives it from the local key.
    resolve: Callable[[Hashable, Slot], str] = lambda key, slot: slot[STORAGE_KEY] or str(key)

    def fits(self, entry: Entry) -> bool:
        if entry.body_size + SIZE_SLACK <= self.max_bytes:
            return True
        assert entry.body_size > self.max_bytes, f"ambiguous entry size {entry.body_size} for {self.name}"
        return False

    def contents(self) -> list[tuple[str, int]]:
        """The backend's entries as ``(storage key, charged size)``, least recently used first."""
        assert isinstance(self.backend, MemoryBackend)
        return [(self.resolve(key, slot), slot[SIZE]) for key, slot in self.backend.slots.items()]

    def holds(self, key: str) -> bool:
        return key in self.order if self.exact else key in self.may_hold

    def drop(self, key: str) -> None:
        self.order.pop(key, None)
        self.may_hold.discard(key)

    def touch(self, key: str) -> None:
        if self.exact:
            self.order.move_to_end(key)

    def stored(self, key: str, entry: Entry) -> None:
        """The engine stored ``entry`` under ``key``: predict the LRU evictions it causes."""
        self.drop(key)
        if not self.exact:
            self.may_hold.add(key)
            return
        actual = dict(self.contents())
        if not self.fits(entry):
            assert key not in actual, f"{self.name}: an entry of {entry.body_size} bytes is over the bound"
            return
        assert key in actual, f"{self.name}: an entry of {entry.body_size} bytes was not stored"
        self.order[key] = actual[key]
        while len(self.order) > self.max_entries or sum(self.order.values()) > self.max_bytes:
            self.order.popitem(last=False)


class TieredCacheMachine(RuleBasedStateMachine):
    """Compares a `TieredCache` (and functions decorated on it) with the model above."""

    specs: tuple[TierSpec, ...] = ()
    fixtures: Mapping[str, Any] = {}
    run_id = ""
    examples = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        # Isolates examples (and runs) on tiers shared across them, such as one Redis server.
        prefix = f"sm{self.run_id}-{next(self.examples)}:"
        # A generous timeout: on a loaded machine a slow answer from a real server must not pass for a miss.
        settings = Settings(key_prefix=prefix, tier_timeout="5s")
        backends: dict[str, Backend]
        if len(self.specs) == 1 and self.specs[0].make is None:
            only = self.specs[0]
            self.cache = TieredCache(settings.with_(tiers={only.name: only.url}), clock=self.clock)
            assert self.cache.local is not None
            backends = {only.name: self.cache.local}
        else:
            backends = {spec.name: spec.build(self.clock, self.fixtures) for spec in self.specs}
            self.cache = TieredCache(settings, backends=backends, clock=self.clock)
        self.tiers = [
            TierModel(name, backend, True, backend.max_entries, backend.max_bytes)
            if isinstance(backend, MemoryBackend) else TierModel(name, backend, False)
            for name, backend in backends.items()
        ]
        self.codec = Codec()
        self.model: dict[str, Entry] = {}
        self.serial = itertools.count()
        self.computed = 0
        self.expected_computed = 0
        self.next_payload = b""
        self.prefix = prefix

        async def alpha(x: int) -> tuple[str, int, int, bytes]:
            self.computed += 1
            return ("alpha", x, next(self.serial), self.next_payload)

        async def beta(x: int, pad: int = 0) -> tuple[str, int, int, bytes]:
            self.computed += 1
            return ("beta", x + pad, next(self.serial), self.next_payload)

        self.alpha = multilevel_cached(namespace="alpha", cache=self.cache)(alpha)
        self.beta = multilevel_cached(namespace="beta", ttl="30s", tags=lambda x, **_: [f"parity:{x % 2}"],
                                      cache=self.cache)(beta)
        # Storage keys as documented: <prefix><namespace>:<digest of the normalised call>.
        self.fn_keys = {"alpha": KeyBuilder(alpha, namespace="alpha"), "beta": KeyBuilder(beta, namespace="beta")}
        for tier in self.tiers:
            tier.resolve = self.memory_key

    # -- helpers ------------------------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return anyio.from_thread.run(fn, *args)

    def teardown(self) -> None:
        # Connections, files and background tasks of the example's tiers end with it.
        self.run(self.cache.aclose)

    def kv_key(self, key: str) -> str:
        return f"{self.prefix}kv:{key}"

    def memory_key(self, local_key: Hashable, slot: Slot) -> str:
        """The storage key of a memory slot: recorded in it, or derived from a function's local key."""
        if slot[STORAGE_KEY] is not None:
            return slot[STORAGE_KEY]
        for name, builder in self.fn_keys.items():
            if isinstance(local_key, tuple) and local_key[0] == builder.token:
                return f"{self.prefix}{name}:{builder.storage_digest(local_key)}"
        return str(local_key)

    def fn_key(self, name: str, x: int) -> str:
        builder = self.fn_keys[name]
        return f"{self.prefix}{name}:{builder.storage_digest(builder.local((x,), {}))}"

    def hits_by_tier(self) -> dict[str, int]:
        return {name: snap["hits"] for name, snap in self.cache.tier_stats().items()}

    def entry(self, value: Any, ttl: float | None, tags: frozenset[str]) -> Entry:
        now = self.clock()
        return Entry(value, None if ttl is None else now + ttl, tags,
                     len(self.codec.pack_body(value, sorted(tags))))

    def lookup(self, key: str, served_by: str | None) -> Entry | None:
        """Check that the tier the engine answered from is the one the model predicts; update the model.

        Returns the entry that was served, or ``None`` on a miss of every tier.
        """
        entry = self.model.get(key)
        live = entry is not None and entry.live(self.clock())
        for index, tier in enumerate(self.tiers):
            if tier.exact and tier.holds(key) and live:
                assert served_by == tier.name, f"{key} is live in {tier.name}, served by {served_by}"
            if served_by == tier.name:
                assert entry is not None, f"{tier.name} served {key}, which was never written"
                assert live, f"{tier.name} served {key}, which is expired"
                assert tier.holds(key), f"{tier.name} served {key}, which the model says it cannot hold"
                tier.touch(key)
                for upper in self.tiers[:index]:
                    upper.stored(key, entry)
                return entry
            # Asked and missed (an expired entry is dropped on access by memory tiers, never served by any).
            tier.drop(key)
        assert served_by is None
        return None

    def served_by(self, before: dict[str, int]) -> str | None:
        after = self.hits_by_tier()
        served = [name for name in after if after[name] != before.get(name, 0)]
        assert len(served) <= 1, f"one lookup counted hits in several tiers: {served}"
        return served[0] if served else None

    def write(self, key: str, entry: Entry) -> None:
        self.model[key] = entry
        for tier in self.tiers:
            tier.stored(key, entry)

    def remove_where(self, predicate: Callable[[str, Entry], bool]) -> None:
        for key, entry in list(self.model.items()):
            if predicate(key, entry):
                del self.model[key]
                for tier in self.tiers:
                    tier.drop(key)

    # -- rules --------------------------------------------------------------------------------------------
    # Five rules of equal weight: writes, reads, calls, time and (rarer each) the kinds of invalidation.

    @rule(key=st.sampled_from(KV_KEYS), size=payload_sizes, ttl=st.none() | durations, tags=tag_sets)
    def set_value(self, key: str, size: int, ttl: Any, tags: frozenset[str]) -> None:
        value = (key, next(self.serial), bytes(size))
        ok = self.run(lambda: self.cache.set(key, value, ttl=ttl, tags=sorted(tags)))
        assert ok is True
        self.write(self.kv_key(key), self.entry(value, None if ttl is None else parse_duration(ttl, "ttl"), tags))

    @rule(key=st.sampled_from(KV_KEYS))
    def get_value(self, key: str) -> None:
        before = self.hits_by_tier()
        result = self.run(self.cache.get, key, MISS)
        entry = self.lookup(self.kv_key(key), self.served_by(before))
        if entry is None:
            assert result is MISS, f"get({key!r}) returned {result!r}; the model has no live entry"
        else:
            assert result == entry.value
            assert result[0] == key

    @rule(function=st.sampled_from(["alpha", "beta"]), x=st.integers(0, 2), size=payload_sizes,
          style=st.sampled_from(["positional", "keyword", "default"]))
    def call_function(self, function: str, x: int, size: int, style: str) -> None:
        # The spellings of one call share a key: f(x), f(x=x) and f(x, pad=<default>).
        invoke: Callable[[], Any]
        if function == "alpha":
            invoke = (lambda: self.alpha(x)) if style == "positional" else (lambda: self.alpha(x=x))
            ttl, tags = None, frozenset({namespace_tag("alpha")})
        else:
            invoke = {"positional": lambda: self.beta(x), "keyword": lambda: self.beta(x=x),
                      "default": lambda: self.beta(x, pad=0)}[style]
            ttl, tags = 30.0, frozenset({namespace_tag("beta"), f"parity:{x % 2}"})
        self.next_payload = bytes(size)
        before = self.hits_by_tier()
        result = self.run(invoke)
        key = self.fn_key(function, x)
        entry = self.lookup(key, self.served_by(before))
        if entry is None:
            self.expected_computed += 1
            assert result[:2] == (function, x)
            self.write(key, self.entry(result, ttl, tags))
        else:
            assert result == entry.value
        assert self.computed == self.expected_computed, "the function ran although a tier held a live entry"

    @rule(seconds=st.sampled_from([0.5, 1.0, 5.0, 29.0, 30.0, 31.0, 61.0, 120.0]))
    def advance_time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(how=st.one_of(
        st.tuples(st.just("key"), st.sampled_from(KV_KEYS)),
        st.tuples(st.just("arguments"), st.sampled_from(["0", "1", "2"])),
        st.tuples(st.just("tag"), st.sampled_from(["red", "green", "blue", "parity:0", "parity:1"])),
        st.tuples(st.just("namespace"), st.sampled_from(["alpha", "beta"])),
        st.tuples(st.just("clear"), st.just("")),
    ))
    def invalidate(self, how: tuple[str, str]) -> None:
        kind, what = how
        if kind == "key":
            self.run(self.cache.delete, what)
            sk = self.kv_key(what)
            self.remove_where(lambda key, _: key == sk)
        elif kind == "arguments":
            self.run(lambda: self.alpha.invalidate(int(what)))
            sk = self.fn_key("alpha", int(what))
            self.remove_where(lambda key, _: key == sk)
        elif kind == "tag":
            self.run(self.cache.invalidate_tags, what)
            self.remove_where(lambda _, entry: what in entry.tags)
        elif kind == "namespace":
            self.run(self.cache.invalidate_namespace, what)
            self.remove_where(lambda _, entry: namespace_tag(what) in entry.tags)
        else:
            self.run(self.cache.clear)
            self.remove_where(lambda _, __: True)

    # -- invariants ---------------------------------------------------------------------------------------

    @invariant()
    def memory_tiers_match_the_model(self) -> None:
        for tier in self.tiers:
            if not tier.exact:
                continue
            assert isinstance(tier.backend, MemoryBackend)
            contents = tier.contents()
            assert contents == list(tier.order.items()), f"{tier.name}: LRU contents differ from the model"
            assert len(contents) <= tier.max_entries
            assert tier.backend.bytes_used == sum(size for _, size in contents) <= tier.max_bytes

    @invariant()
    def stored_entries_are_the_models(self) -> None:
        for index, tier in enumerate(self.tiers):
            if not tier.exact:
                continue
            assert isinstance(tier.backend, MemoryBackend)
            for local_key, slot in tier.backend.slots.items():
                key = tier.resolve(local_key, slot)
                entry = self.model[key]
                # Absolute expiry: a back-filled copy keeps the original deadline, never a fresh TTL.
                assert slot[EXPIRES_AT] == entry.expires_at
                if index == 0:
                    assert slot[VALUE] == entry.value
                else:
                    envelope = self.codec.open(key, slot[VALUE])
                    assert envelope.value == entry.value
                    assert envelope.expires_at == entry.expires_at
                    assert set(envelope.tags) == entry.tags


@pytest.mark.parametrize("specs", TIER_CONFIGS)
async def test_tiered_cache_matches_dict_model(specs: tuple[TierSpec, ...], anyio_backend: str,
                                               request: pytest.FixtureRequest) -> None:
    """The cache agrees with the model after every step of every generated run.

    The machine runs in a worker thread; each rule calls back into this test's event loop.
    """
    if anyio_backend == "trio" and any("redis_url" in spec.fixtures for spec in specs):
        pytest.skip(REDIS_ON_TRIO)
    unsupported = [spec.name for spec in specs if spec.asyncio_only and anyio_backend != "asyncio"]
    if unsupported:
        pytest.skip(f"tiers {unsupported} run on asyncio only")
    examples = itertools.count()
    wanted = (EXAMPLES_WITH_REAL_TIERS if any(spec.fixtures for spec in specs) else EXAMPLES)[anyio_backend]
    fixtures = {name: request.getfixturevalue(name) for spec in specs for name in spec.fixtures}
    machine = type("Machine", (TieredCacheMachine,), {"specs": specs, "fixtures": fixtures, "examples": examples,
                                                      "run_id": secrets.token_hex(4)})
    hypothesis_settings = settings(max_examples=wanted, stateful_step_count=STEPS, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
    await anyio.to_thread.run_sync(lambda: run_state_machine_as_test(machine, settings=hypothesis_settings))
    # One machine per example: the run really was as long as promised.
    assert next(examples) >= wanted
