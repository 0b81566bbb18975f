"""The tiered cache engine: read-through over ordered tiers, back-fill, single-flight, fail-open writes.

`TieredCache` owns the tiers of one `Settings` (the first may be the in-process memory tier, which holds live
objects; every other tier holds sealed envelopes) and offers a key/value API. `CachedFunction` is the engine
of one decorated function: it builds keys, serves hits, runs the function once per key on a miss, and stores
the result in every tier. The decorators only construct these.

Rules kept here, each tested:

* an entry's expiry is absolute and travels with it; back-filling an upper tier keeps the remaining lifetime;
* a tier that raises or times out is a miss on read and skipped on write, and its circuit breaker stops
  calling it for a while; the call itself never fails and never loses its result because of the cache
  (unless ``strict``). A tier that failed while a call was reading is not written by that call either, so a
  hung tier costs one timeout per call, not two;
* an entry that fails its integrity check is a miss, is deleted, and is counted;
* invalidation removes from every tier and, through a tier with `PubSubSupport` (Redis), from the memory tier
  of every other process; a value read or computed while an invalidation went by is returned but not cached;
* with ``lock=``, processes that miss one key compute it once (a leased lock in a `LockSupport` tier);
  with ``stale=``, an expired entry is served for a grace period while exactly one background refresh runs.

Cross-process coordination rides on one pub/sub channel per key prefix (``<prefix>~events``): messages are
msgpack ``[sender, kind, items]`` with kind ``"k"`` (storage keys), ``"t"`` (tags), ``"c"`` (clear) or ``"l"``
(a lock was released). Tags are kept in shared tiers under ``<prefix>~tag:<tag>``, locks under
``<prefix>~lock:<key>``, so applications with different prefixes never touch each other's entries.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
import typing
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, NamedTuple, ParamSpec, TypeVar, cast

import anyio
import msgpack
import numpy as np

from cachelayers import settings as _settings_module
from cachelayers.backends import Backend, StoreItem, create_backend
from cachelayers.backends.base import ClearPrefixSupport, Clock, DeadlineSupport, LockSupport, PubSubSupport
from cachelayers.backends.memory import MISSING, MemoryBackend, Slot
from cachelayers.codec import Codec
from cachelayers.durations import parse_duration
from cachelayers.engines.background import BackgroundTasks, current_loop_token
from cachelayers.engines.breaker import CircuitBreaker
from cachelayers.errors import BackendError, ConfigError, SerializationError
from cachelayers.keys import FAST_TYPES, KeyBuilder
from cachelayers.metrics import CacheInfo, FunctionStats, StateLog, TierStats, logger, register_stats_source
from cachelayers.settings import Settings, get_settings

__all__ = ["BatchFunctionCache", "FunctionCache", "TieredCache", "default_cache", "namespace_tag"]

P = ParamSpec("P")
T = TypeVar("T")

_NAMESPACE_TAG: Final = "ns\x1f"
DEFAULT_LOCK_LEASE: Final = 30.0
_LOCK_FIRST_WAIT: Final = 0.02  # first back-off of a lock waiter; doubles up to _LOCK_MAX_WAIT
_LOCK_MAX_WAIT: Final = 1.0
_LISTEN_MAX_BACKOFF: Final = 5.0


def namespace_tag(namespace: str) -> str:
    """The tag every entry of ``namespace`` carries, so a namespace is invalidated like a tag."""
    return _NAMESPACE_TAG + namespace


class _Tier:
    """A tier below memory as the engine uses it: timeout, circuit breaker, counters, fail-open."""

    __slots__ = ("backend", "breaker", "log", "name", "stats", "strict", "timeout")

    def __init__(self, name: str, backend: Backend, settings: Settings, log: StateLog,
                 monotonic: Callable[[], float]) -> None:
        self.name = name
        self.backend = backend
        self.timeout: float = settings.tier_timeout
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown, monotonic)
        self.stats = TierStats(name)
        self.log = log
        self.strict = settings.strict

    async def call(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        """Run ``op`` under the tier's timeout and breaker; on failure count, log and return ``default``."""
        if not self.breaker.allow():
            self.stats.skipped += 1
            return default
        try:
            with anyio.fail_after(self.timeout):
                result = await op()
        except TimeoutError as exc:
            self.stats.timeouts += 1
            self._failed(exc, f"timed out after {self.timeout:g}s")
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}")
        else:
            if self.breaker.success():
                self.log.recovered(f"tier {self.name!r}")
            return result
        return default

    def _failed(self, exc: BaseException, message: str) -> None:
        opened = self.breaker.failure()
        self.log.failure(f"tier {self.name!r}", message + (" (circuit breaker open)" if opened else ""))
        if self.strict:
            raise BackendError(f"tier {self.name!r} {message}") from exc

    async def get(self, key: str) -> bytes | None:
        missing: list[bytes | None] = [None]
        result = await self.call(lambda: self.backend.get_many([key]), missing)
        return result[0]

    async def set(self, items: Sequence[StoreItem]) -> None:
        async def op() -> bool:
            await self.backend.set_many(items)
            return True

        if await self.call(op, False):
            self.stats.writes += len(items)

    async def delete(self, keys: Sequence[str]) -> None:
        async def op() -> None:
            await self.backend.delete_many(keys)

        await self.call(op, None)

    async def delete_tags(self, tags: Sequence[str]) -> None:
        async def op() -> None:
            await self.backend.delete_tags(tags)

        await self.call(op, None)


class _Flight:
    """One computation in progress that concurrent callers of the same key wait for."""

    __slots__ = ("done", "error", "event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class TieredCache:
    """The tiers of one configuration, with a key/value API and the machinery cached functions share.

    Args:
        settings: Configuration; the settings in force when omitted.
        backends: Backends to use instead of those the settings name (test doubles, custom stores), fastest
            first, as a list or a ``name -> backend`` mapping. A `MemoryBackend` in first place is used as
            the in-process object tier.
        clock: Wall-clock time source for expiry (``time.time``); tests pass a fake clock.
        monotonic: Monotonic time source for breakers; defaults to ``clock`` when a fake clock is given.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backends: Sequence[Backend] | Mapping[str, Backend] | None = None,
        clock: Clock = time.time,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else get_settings()
        self.clock = clock
        self.codec = Codec(secret=self.settings.secret, allow_pickle=self.settings.allow_pickle)
        self.log = StateLog()
        if backends is None:
            named: list[tuple[str, Backend]] = [
                (name, create_backend(url, clock=clock, field=f"tiers[{name!r}]")) for name, url in self.settings.tiers
            ]
        elif isinstance(backends, Mapping):
            named = list(backends.items())
        else:
            named = [(getattr(b, "name", None) or f"{type(b).__name__.lower()}{i}", b) for i, b in enumerate(backends)]
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self.local: MemoryBackend | None = None
        self.local_name = ""
        self.local_stats = TierStats("memory")
        if named and isinstance(named[0][1], MemoryBackend):
            self.local_name, local = named.pop(0)
            self.local = cast(MemoryBackend, local)
            self.local_stats = TierStats(self.local_name)
        self.tiers = [_Tier(name, backend, self.settings, self.log, monotonic) for name, backend in named]
        self.strict = self.settings.strict
        self._inflight: dict[Hashable, _Flight] = {}
        self.functions: weakref.WeakSet[FunctionCache[Any, Any]] = weakref.WeakSet()
        register_stats_source(self)

    # -- key/value API -----------------------------------------------------------------------------------

    def storage_key(self, key: str) -> str:
        """The key under which the key/value API stores ``key`` in every tier."""
        return f"{self.settings.key_prefix}kv:{key}"

    async def get(self, key: str, default: Any = None) -> Any:
        """Return the value under ``key`` from the first tier that has it, back-filling the tiers above."""
        sk = self.storage_key(key)
        if self.local is not None:
            value = self.local.lookup(sk)
            if value is not MISSING:
                self.local_stats.hits += 1
                return value
            self.local_stats.misses += 1
        value = await self.read_lower(sk, sk)
        return default if value is MISSING else value

    async def set(self, key: str, value: Any, *, ttl: float | str | None = None, tags: Iterable[str] = ()) -> bool:
        """Store ``value`` under ``key`` in every tier; return whether it could be encoded.

        Raises:
            ConfigError: ``ttl`` is malformed or negative.
        """
        seconds = parse_duration(ttl, "ttl") if ttl is not None else self.settings.default_ttl
        expires_at = self.clock() + seconds if seconds is not None else None
        sk = self.storage_key(key)
        return await self.write(sk, sk, value, expires_at, tuple(tags))

    async def delete(self, *keys: str) -> None:
        """Remove keys from every tier."""
        sks = [self.storage_key(k) for k in keys]
        await self.remove(sks, sks)

    async def invalidate_tags(self, *tags: str) -> None:
        """Remove every entry carrying any of ``tags`` from every tier."""
        if self.local is not None:
            self.local.remove_tags(tags)
        async with anyio.create_task_group() as tg:
            for tier in self.tiers:
                tg.start_soon(tier.delete_tags, tags)

    async def invalidate_namespace(self, namespace: str) -> None:
        """Remove every entry of ``namespace`` (by default, of one function) from every tier."""
        await self.invalidate_tags(namespace_tag(namespace))

    async def clear(self) -> None:
        """Remove everything from every tier."""
        if self.local is not None:
            self.local.clear_now()
        for tier in self.tiers:
            async def op(tier: _Tier = tier) -> None:
                await tier.backend.clear()

            await tier.call(op, None)

    async def aclose(self) -> None:
        """Close the backends' connections and files."""
        for tier in self.tiers:
            await tier.backend.aclose()
        if self.local is not None:
            await self.local.aclose()

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every tier, by tier name."""
        out: dict[str, dict[str, Any]] = {}
        if self.local is not None:
            snap: dict[str, Any] = self.local_stats.snapshot()
            snap["hits"] += sum(fn.memory_hits() for fn in list(self.functions))
            snap.update(entries=len(self.local), bytes=self.local.bytes_used, evictions=self.local.evictions)
            out[self.local_name] = snap
        for tier in self.tiers:
            tier_snap: dict[str, Any] = tier.stats.snapshot()
            tier_snap["breaker"] = tier.breaker.state
            snap = tier_snap
            out[tier.name] = snap
        return out

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"tiers@{id(self):x}": self.tier_stats()}

    # -- machinery shared with cached functions -----------------------------------------------------------

    async def read_lower(self, local_key: Hashable, storage_key: str,
                         fstats: FunctionStats | None = None) -> Any:
        """Look ``storage_key`` up in the tiers below memory, back-filling the tiers above a hit."""
        for index, tier in enumerate(self.tiers):
            blob = await tier.get(storage_key)
            if blob is None:
                tier.stats.misses += 1
                continue
            try:
                envelope = self.codec.open(storage_key, blob)
            except SerializationError as exc:
                tier.stats.corrupt += 1
                self.log.failure(f"integrity of tier {tier.name!r}", exc)
                await tier.delete([storage_key])
                if self.strict:
                    raise
                continue
            if envelope.expires_at is not None and envelope.expires_at <= self.clock():
                tier.stats.misses += 1
                continue
            tier.stats.hits += 1
            if fstats is not None:
                fstats.hits_by_tier[tier.name] = fstats.hits_by_tier.get(tier.name, 0) + 1
            if self.local is not None:
                self.local.store(local_key, envelope.value, size=len(blob), expires_at=envelope.expires_at,
                                 tags=envelope.tags, storage_key=storage_key)
            if index:
                item = StoreItem(storage_key, blob, envelope.expires_at, envelope.tags)
                async with anyio.create_task_group() as tg:
                    for upper in self.tiers[:index]:
                        tg.start_soon(upper.set, [item])
            return envelope.value
        return MISSING

    async def write(self, local_key: Hashable, storage_key: str, value: Any, expires_at: float | None,
                    tags: tuple[str, ...], fstats: FunctionStats | None = None) -> bool:
        """Store ``value`` in every tier; return ``False`` when it cannot be encoded (nothing is stored)."""
        try:
            body = self.codec.pack_body(value, tags)
        except SerializationError as exc:
            if fstats is not None:
                fstats.unstorable += 1
            self.log.failure(f"encoding values of type {type(value).__qualname__}", exc)
            if self.strict:
                raise
            return False
        if self.local is not None:
            self.local.store(local_key, value, size=len(body), expires_at=expires_at, tags=tags,
                             storage_key=storage_key)
            self.local_stats.writes += 1
        if self.tiers:
            item = StoreItem(storage_key, self.codec.seal_body(storage_key, body, expires_at), expires_at, tags)
            if len(self.tiers) == 1:
                await self.tiers[0].set([item])
            else:
                async with anyio.create_task_group() as tg:
                    for tier in self.tiers:
                        tg.start_soon(tier.set, [item])
        return True

    async def remove(self, local_keys: Sequence[Hashable], storage_keys: Sequence[str]) -> None:
        """Remove entries from every tier."""
        if self.local is not None:
            for key in local_keys:
                self.local.remove(key)
        async with anyio.create_task_group() as tg:
            for tier in self.tiers:
                tg.start_soon(tier.delete, storage_keys)


_default: TieredCache | None = None
_default_generation = -1
_functions: weakref.WeakSet[FunctionCache[Any, Any]] = weakref.WeakSet()


def _on_settings_change() -> None:
    for fn in list(_functions):
        fn._unbind()


_settings_module.on_change(_on_settings_change)


def default_cache() -> TieredCache:
    """The engine of the settings in force, made on first use and remade when the settings change."""
    global _default, _default_generation
    settings = get_settings()  # first, so that reading the environment bumps the generation before we look
    generation = _settings_module.settings_generation()
    cache = _default
    if cache is None or _default_generation != generation:
        cache = _default = TieredCache(settings)
        _default_generation = generation
    return cache


class FunctionCache(Generic[P, T]):
    """The engine of one function decorated with `multilevel_cached`.

    `wrapper` is the function handed to users: a plain ``async def`` (so it binds as a method and calls
    as fast as Python allows) whose hit path is inlined: no task, no string formatting, no signature
    binding. Its attributes ``cache_info``, ``invalidate``, ``invalidate_all``, ``cache_clear`` and
    ``cache`` (this object) come from here.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        *,
        ttl: float | str | Any = None,
        tags: Callable[..., Iterable[str]] | Iterable[str] | None = None,
        key: Callable[..., Any] | None = None,
        namespace: str | None = None,
        version: str | int = 0,
        ignore: Iterable[str] = (),
        name: str | None = None,
        cost: float | Callable[[T], float] | None = None,
        cache: TieredCache | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"multilevel_cached needs an async function, got {fn!r}")
        self._fn = fn
        self._keys = KeyBuilder(fn, namespace=namespace, version=version, key=key, ignore=ignore, name=name)
        self.identity = self._keys.identity
        self._ttl = parse_duration(ttl, "ttl") if ttl is not None else None
        if tags is None or callable(tags):
            self._tags_fn: Callable[..., Iterable[str]] | None = tags
            self._static_tags: tuple[str, ...] = ()
        else:
            self._tags_fn = None
            self._static_tags = tuple(tags)
            if not all(isinstance(t, str) for t in self._static_tags):
                raise TypeError("tags must be strings or a function returning strings")
        if cost is not None and not callable(cost) and (not isinstance(cost, int | float) or cost < 0):
            raise TypeError(f"cost must be a non-negative number or a function of the result, got {cost!r}")
        self._cost = cost
        self._explicit_cache = cache
        self._cache: TieredCache | None = cache
        self._generation = -1
        self._set_memory: Callable[[OrderedDict[Hashable, Slot] | None, Clock], None] | None = None
        self._prefix = ""
        self._expiry_default: float | None = None
        self.stats = FunctionStats()
        self._namespace_tags = (namespace_tag(self._keys.namespace),)
        self.wrapper = self._build_wrapper()
        _functions.add(self)
        register_stats_source(self)

    # -- binding to the engine of the settings in force -------------------------------------------------

    def _bind(self, cache: TieredCache) -> TieredCache:
        self._cache = cache
        if self._set_memory is not None:
            self._set_memory(cache.local.slots if cache.local is not None else None, cache.clock)
        self._prefix = f"{cache.settings.key_prefix}{self._keys.namespace}:"
        self._expiry_default = self._ttl if self._ttl is not None else cache.settings.default_ttl
        self._generation = _settings_module._generation
        cache.functions.add(self)
        return cache

    def _unbind(self) -> None:
        """Forget the engine (the settings changed): the next call misses the hit path and rebinds."""
        if self._explicit_cache is None and self._set_memory is not None:
            self._set_memory(None, time.time)

    def _rebind(self) -> TieredCache:
        """Follow the settings in force (a no-op for a function given an explicit cache)."""
        if self._explicit_cache is not None:
            self._generation = _settings_module._generation
            return self._explicit_cache
        return self._bind(default_cache())

    @property
    def cache(self) -> TieredCache:
        """The engine this function stores in now."""
        if self._cache is None or self._generation != _settings_module._generation:
            return self._rebind()
        return self._cache

    # -- calls --------------------------------------------------------------------------------------------

    def _build_wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        """Compile the function handed to users, with the hit path inlined.

        When the function's parameters allow (no ``*args``/``**kwargs``, no ``key=``), the wrapper gets the
        function's own parameter list: Python's call machinery then binds the arguments and applies the
        defaults, so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` arrive as the same locals and the key is
        one tuple of them (the tuple `KeyBuilder.local` builds for such calls). Otherwise the wrapper takes
        ``*args, **kwargs`` and asks `KeyBuilder.local`. What the hit path reads lives in closure cells,
        the fastest loads Python has; `_bind` updates them through ``set_memory``.
        """
        params = self._keys.parameters
        namespace: dict[str, Any] = {}
        if params is not None and not any(p.name.startswith("_cl_") for p in params):
            signature: list[str] = []
            kind = None
            for i, p in enumerate(params):
                if p.kind is p.KEYWORD_ONLY and kind is not p.KEYWORD_ONLY:
                    signature.append("*")
                elif kind is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY:
                    signature.append("/")
                kind = p.kind
                if p.default is p.empty:
                    signature.append(p.name)
                else:
                    namespace[f"_cl_default_{i}"] = p.default
                    signature.append(f"{p.name}=_cl_default_{i}")
            if kind is inspect.Parameter.POSITIONAL_ONLY:
                signature.append("/")
            keyed = [p.name for p in params if p.name not in self._keys.ignored]
            args = "(" + "".join(f"{p.name}, " for p in params if p.kind is not p.KEYWORD_ONLY) + ")"
            kwargs = "{" + ", ".join(f"{p.name!r}: {p.name}" for p in params if p.kind is p.KEYWORD_ONLY) + "}"
            key = f"""if {" and ".join(f"type({n}) in _cl_fast" for n in keyed) or "True"}:
            _cl_key = (_cl_token, ({"".join(f"{n}, " for n in keyed)}))
        else:
            _cl_key = _cl_local_key_of({args}, {kwargs})"""
        else:
            signature = ["*args", "**kwargs"]
            args, kwargs = "args", "kwargs"
            key = "_cl_key = _cl_local_key_of(args, kwargs)"
        source = f"""
def _cl_make(_cl_local_key_of, _cl_token, _cl_fast, _cl_stats, _cl_miss, _cl_count_cost):
    _cl_slots = None
    _cl_clock = None

    def set_memory(slots, clock):
        nonlocal _cl_slots, _cl_clock
        _cl_slots, _cl_clock = slots, clock

    async def wrapper({", ".join(signature)}):
        {key}
        if _cl_slots is not None:
            _cl_slot = _cl_slots.get(_cl_key)
            if _cl_slot is not None:
                _cl_expires_at = _cl_slot.expires_at
                if _cl_expires_at is None or _cl_expires_at > _cl_clock():
                    _cl_slots.move_to_end(_cl_key)
                    _cl_stats.hits += 1
                    if _cl_count_cost is not None:
                        _cl_count_cost(_cl_slot.value)
                    return _cl_slot.value
        return await _cl_miss(_cl_key, {args}, {kwargs})

    return wrapper, set_memory
"""
        exec(compile(source, f"<cachelayers wrapper of {self.identity}>", "exec"), namespace)
        wrapper, self._set_memory = namespace["_cl_make"](
            self._keys.local, self._keys.token, FAST_TYPES, self.stats, self._miss,
            self._count_cost if self._cost is not None else None)
        if self._cache is not None:
            self._bind(self._cache)
        functools.update_wrapper(wrapper, self._fn)
        wrapper.cache = self
        wrapper.cache_info = self.cache_info
        wrapper.invalidate = self.invalidate
        wrapper.invalidate_all = self.invalidate_all
        wrapper.cache_clear = self.invalidate_all
        return wrapper  # type: ignore[no-any-return]

    def _count_cost(self, value: Any) -> None:
        cost = self._cost
        self.stats.cost_saved += cost(value) if callable(cost) else cost  # type: ignore[operator]

    async def _miss(self, local_key: Hashable, args: Any, kwargs: Any) -> T:
        cache = self.cache
        if cache.local is not None:
            cache.local_stats.misses += 1
        inflight = cache._inflight
        while True:
            flight = inflight.get(local_key)
            if flight is None:
                break
            await flight.event.wait()
            if flight.done:
                if flight.error is not None:
                    raise flight.error
                self.stats.hits += 1
                self.stats.hits_by_tier["in-flight"] = self.stats.hits_by_tier.get("in-flight", 0) + 1
                return cast(T, flight.value)
            # The computing caller was cancelled: one of the waiters takes over.
        flight = inflight[local_key] = _Flight()
        try:
            value = await self._load(cache, local_key, args, kwargs)
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        else:
            flight.value = value
            flight.done = True
            return value
        finally:
            if inflight.get(local_key) is flight:
                del inflight[local_key]
            flight.event.set()

    async def _load(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any) -> T:
        stats = self.stats
        storage_key = self._prefix + self._keys.storage_digest(local_key)
        if cache.tiers:
            started = time.perf_counter()
            value = await cache.read_lower(local_key, storage_key, stats)
            if value is not MISSING:
                stats.hits += 1
                stats.cached_latency.add(time.perf_counter() - started)
                if self._cost is not None:
                    self._count_cost(value)
                return cast(T, value)
        stats.misses += 1
        started = time.perf_counter()
        result = await self._fn(*args, **kwargs)
        stats.computed_latency.add(time.perf_counter() - started)
        try:
            tags = self._tags(args, kwargs)
        except Exception as exc:  # a failing tags= function must not lose the result
            stats.errors += 1
            cache.log.failure(f"tags= of {self.identity}", exc)
            if cache.strict:
                raise
            return result
        ttl = self._expiry_default
        expires_at = cache.clock() + ttl if ttl is not None else None
        try:
            await cache.write(local_key, storage_key, result, expires_at, tags, stats)
        except (SerializationError, BackendError):
            if cache.strict:
                raise
        return result

    def _tags(self, args: Any, kwargs: Any) -> tuple[str, ...]:
        if self._tags_fn is None:
            return self._namespace_tags + self._static_tags
        produced = tuple(self._tags_fn(**self._keys.arguments(args, kwargs)))
        if not all(isinstance(t, str) for t in produced):
            raise TypeError(f"tags= of {self.identity} must return strings, got {produced!r}")
        return self._namespace_tags + produced

    # -- management ---------------------------------------------------------------------------------------

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Remove the entry of these arguments from every tier (for a method, pass the instance first)."""
        cache = self.cache
        local_key = self._keys.local(args, kwargs)
        await cache.remove([local_key], [self._prefix + self._keys.storage_digest(local_key)])

    async def invalidate_all(self) -> None:
        """Remove every entry of this function's namespace from every tier."""
        await self.cache.invalidate_namespace(self._keys.namespace)

    def cache_info(self) -> CacheInfo:
        """Hits, misses, hit rate, per-tier hits, latencies of cached and computed calls, cost saved."""
        info = self.stats.info()
        tiers = dict(info.hits_by_tier)
        memory_hits = info.hits - sum(tiers.values())
        if memory_hits:
            name = self._cache.local_name if self._cache is not None else "memory"
            tiers = {name: memory_hits, **tiers}
        return info._replace(hits_by_tier=tiers)

    def memory_hits(self) -> int:
        """Hits served by the memory tier."""
        return self.stats.hits - sum(self.stats.hits_by_tier.values())

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {self.identity: self.cache_info()._asdict()}

    @property
    def namespace(self) -> str:
        """The namespace of this function's entries."""
        return self._keys.namespace

    def __repr__(self) -> str:
        return f"<FunctionCache of {self.identity}>"
