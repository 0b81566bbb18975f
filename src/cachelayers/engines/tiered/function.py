"""`FunctionCache`: the engine of one function decorated with `multilevel_cached`.

It binds the function to the engine of the settings in force (or the one given), answers hits through the
compiled hit path, runs the function once per key on a miss (single-flight in the process, and across
processes with ``lock=``), serves stale entries while one background refresh runs (``stale=``), and stores the
result in every tier.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar, Unpack, cast

from cachelayers import audit
from cachelayers.backends.base import MISSING
from cachelayers.backends.memory import MemoryBackend
from cachelayers.codec import Codec, allowed_types
from cachelayers.durations import parse_duration
from cachelayers.engines.flight import Flight
from cachelayers.engines.sync import is_async, run, to_async
from cachelayers.engines.tiered.cache import TieredCache, default_cache
from cachelayers.engines.tiered.control import Mode, Trace, current_mode, on_switch, only_sampling, switch_now
from cachelayers.engines.tiered.hitpath import compile_hit_path
from cachelayers.engines.tiered.locks import compute_locked, refresh_locked
from cachelayers.engines.tiered.options import CacheOptions, lease, result_lifetime, ttl_options
from cachelayers.engines.tiered.tags import namespace_tag, user_tags
from cachelayers.engines.tiered.tier import Stale
from cachelayers.errors import BackendError, ConfigError, SerializationError
from cachelayers.keys import KeyBuilder, KeyFunctionError, claim_identity
from cachelayers.metrics import CacheInfo, FunctionStats, register_stats_source, stable_list
from cachelayers.settings import tracker
from cachelayers.validation import check_options

__all__ = ["FunctionCache"]


P = ParamSpec("P")
T = TypeVar("T")


class FunctionCache(Generic[P, T]):
    """The engine of one function decorated with `multilevel_cached`.

    `wrapper` is the compiled hit path (see `compile_hit_path`): an ``async def`` with the function's
    parameters that answers a memory hit inline and calls back here for everything else. The decorator's
    `CachedFunction` calls it. For a sync function (`sync`), `wrapper` is a plain ``def`` callable from any
    thread: a memory hit is answered in the calling thread, everything else on the library's loop
    (`cachelayers.engines.sync`), with the function itself run in the calling thread.

    Args:
        fn: The function, async or sync.
        **options: The options of `multilevel_cached`, documented there, but ``batch`` (a batch function is
            cached by `BatchFunctionCache`).

    Raises:
        TypeError: ``fn`` is not callable, an option is unknown, or ``cost`` (or ``cache_if``) is not a
            non-negative number or a function.
        ConfigError: An option is malformed.
    """

    _watched: Callable[..., Any] | None = None  # the compiled hit path's watched twin (see `control`)

    def __init__(self, fn: Callable[P, Awaitable[T]], /, **options: Unpack[CacheOptions]) -> None:
        check_options(options, CacheOptions, "multilevel_cached")
        if not callable(fn):
            raise TypeError(f"multilevel_cached needs a function, got {fn!r}")
        batch = options.get("batch", False)
        if batch is not False:
            raise ConfigError("batch", batch, "a batch function is cached by BatchFunctionCache")
        self.sync = not is_async(fn)
        """Whether the function is a plain ``def`` (then `wrapper` is one too)."""
        self._fn: Callable[..., Awaitable[T]] = to_async(cast(Callable[..., T], fn)) if self.sync else fn
        if options.get("cache") is not None and not isinstance(options.get("cache"), TieredCache):
            raise ConfigError("cache", options.get("cache"), "expected a TieredCache (an engine made from Settings)")
        namespace = options.get("namespace")
        self._keys = KeyBuilder(fn, namespace=namespace, version=options.get("version", 0), key=options.get("key"),
                                ignore=options.get("ignore", ()), name=options.get("name"))
        self.identity = self._keys.identity
        if options.get("name") is None:  # entries meet only in one engine's tiers: the engine is the scope
            explicit = options.get("cache")
            claim_identity(self._keys.token, fn, scope="" if explicit is None else f"engine@{id(explicit):x}")
        self._ttl, self._ttl_fn, self._cache_if = ttl_options(options.get("ttl"), options.get("cache_if"))
        self.per_result = self._cache_if is not None or self._ttl_fn is not None
        """Whether what is stored depends on the result (``cache_if=``, or ``ttl=`` as a function): then
        `expiry_of` decides for each result."""
        self.not_stored = 0
        """Results not stored because ``cache_if`` refused them (or a ``ttl`` function gave zero)."""
        self.bypassed = 0
        """Calls that skipped the cache (``bypass``)."""
        self.refreshed = 0
        """Calls that recomputed and overwrote their entry (``refresh``)."""
        tags = options.get("tags")
        if tags is None or callable(tags):
            self._tags_fn: Callable[..., Iterable[str]] | None = tags
            self._static_tags: tuple[str, ...] = ()
        else:
            self._tags_fn = None
            try:
                self._static_tags = user_tags(tags, "tags")
            except ValueError as exc:
                raise ConfigError("tags", tags, str(exc)) from None
        cost = options.get("cost")
        if cost is not None and not callable(cost) and (not isinstance(cost, int | float) or cost < 0):
            raise TypeError(f"cost must be a non-negative number or a function of the result, got {cost!r}")
        self._cost = cost
        self._lease = lease(options.get("lock"))
        stale = options.get("stale")
        self._grace = parse_duration(stale, "stale", stored=True) if stale is not None else 0.0
        self.refreshes = 0
        """Background refreshes of stale entries completed (``stale=``)."""
        cache = options.get("cache")
        self._explicit_cache = cache
        self._cache: TieredCache | None = cache
        self._generation = -1
        self._set_parts: Callable[[tuple[Any, ...]], None] | None = None
        self._prefix = ""
        self._types = allowed_types(fn)
        self._codec: Codec | None = None
        self._expiry_default: float | None = None
        self.stats = FunctionStats()
        self._namespace_tags = (namespace_tag(self._keys.namespace),)
        self._fixed_tags = self._namespace_tags + self._static_tags
        wrapper = self._build_wrapper()
        if self.sync and inspect.iscoroutinefunction(wrapper):  # a subclass's async call path
            async_wrapper = wrapper
            wrapper = functools.wraps(fn)(lambda *args, **kwargs: run(lambda: async_wrapper(*args, **kwargs)))
        self.wrapper: Callable[..., Any] = wrapper
        """The function that answers calls: the compiled hit path (``await engine.wrapper(*args)``, or
        ``engine.wrapper(*args)`` for a sync function). It checks no control block: `attach` a caller to
        have its call path switched while one is open."""
        self.watched: Callable[..., Any] = self._watched or wrapper
        """`wrapper`'s twin for while a control block is open: same parameters, every call through the
        context-reading path."""
        self._faces: list[Callable[[Callable[..., Any]], None]] = []
        _functions.add(self)
        register_stats_source(self)

    # -- binding to the engine of the settings in force -------------------------------------------------

    def _bind(self, cache: TieredCache) -> TieredCache:
        if self._cache is not None and self._cache is not cache:
            self._cache.release(self)
        self._cache = cache
        if self._set_parts is not None:
            local = cache.local
            # A memory tier of another layout is read by the miss path, through its peek.
            inlined = local is not None and type(local).INLINE_PEEK == MemoryBackend.INLINE_PEEK
            self._set_parts(local.peek_parts() if local is not None and inlined else MemoryBackend.idle_peek_parts())
        self._check_effective(cache)
        self._prefix = f"{cache.settings.key_prefix}{self._keys.namespace}:"
        self._codec = cache.codec.with_types(self._types) if self._types else cache.codec
        self._expiry_default = self._ttl if self._ttl is not None else cache.settings.default_ttl
        self._generation = tracker.generation
        cache.adopt(self)
        return cache

    def _check_effective(self, cache: TieredCache) -> None:
        """Refuse options that would do nothing with this engine (checked when the function binds to it: at
        decoration with ``cache=``, else at the first call under the settings in force)."""
        if self._grace and self._ttl is None and self._ttl_fn is None and cache.settings.default_ttl is None:
            raise ConfigError("stale", self._grace, "has no effect without a TTL: pass ttl= (or set "
                                                    "Settings.default_ttl)")
        if self._lease is not None and cache.lock_tier is None:
            raise ConfigError("lock", self._lease, "needs a tier that can hold locks shared by processes (Redis); "
                                                   f"the tiers are {', '.join(cache.settings.tier_urls) or 'none'}")

    def _unbind(self) -> None:
        """Forget the engine (the settings changed): the next call misses the hit path and rebinds."""
        if self._explicit_cache is None and self._set_parts is not None:
            self._set_parts(MemoryBackend.idle_peek_parts())

    def _rebind(self) -> TieredCache:
        """Follow the settings in force (a no-op for a function given an explicit cache)."""
        if self._explicit_cache is not None:
            self._generation = tracker.generation
            return self._explicit_cache
        return self._bind(default_cache())

    @property
    def cache(self) -> TieredCache:
        """The engine this function stores in now."""
        if self._cache is None or self._generation != tracker.generation:
            return self._rebind()
        return self._cache

    # -- calls --------------------------------------------------------------------------------------------

    def _build_wrapper(self) -> Callable[..., Any]:
        """Compile the hit path (`compile_hit_path`) and bind it to the engine, if one was given."""
        sync = self.sync
        wrapper, self._watched, self._set_parts = compile_hit_path(
            self._keys, self.stats, self._miss_sync if sync else self._miss,
            self._count_cost if self._cost is not None else None, MemoryBackend,
            self._key_failed_sync if sync else self._key_failed, self._controlled_sync if sync else self._controlled,
            sync=sync)
        if self._cache is not None:
            self._bind(self._cache)
        return wrapper

    def attach(self, use: Callable[[Callable[..., Any]], None]) -> None:
        """Give ``use`` the call path to call: `wrapper` now and whenever the last control block closes,
        `watched` while one is open anywhere (`cachelayers.bypass`, `cachelayers.refresh`, `explain`). The
        decorators' wrapper classes attach themselves, so the hit path pays nothing for control."""

        def first(watching: bool) -> None:
            self._faces.append(use)
            use(self.watched if watching else self.wrapper)

        switch_now(first)

    def _switch(self, watching: bool) -> None:
        path = self.watched if watching else self.wrapper
        for use in self._faces:
            use(path)

    async def _key_failed(self, error: KeyFunctionError, args: Any, kwargs: Any) -> T:
        """A ``key=`` function raised: like a failing ``tags=``, the call runs uncached, counted and logged once
        (in strict mode, what the function raised is raised)."""
        self.stats.errors += 1
        cache = self.cache
        cache.log.failure(f"key= of {self.identity}", error)
        if cache.strict and error.__cause__ is not None:
            raise error.__cause__
        return await self._fn(*args, **kwargs)

    def _key_failed_sync(self, error: KeyFunctionError, args: Any, kwargs: Any) -> T:
        return run(lambda: self._key_failed(error, args, kwargs))

    def _miss_sync(self, local_key: Hashable, args: Any, kwargs: Any) -> T:
        # Another thread may have stored the entry since this one looked: the miss path looks again.
        return run(lambda: self._miss(local_key, args, kwargs, False))

    def _controlled_sync(self, local_key: Hashable, args: Any, kwargs: Any) -> T:
        return run(lambda: self._controlled(local_key, args, kwargs))

    def _count_cost(self, value: Any) -> None:
        cost = self._cost
        self.stats.cost_saved += cost(value) if callable(cost) else cost  # type: ignore[operator]

    async def _miss(self, local_key: Hashable, args: Any, kwargs: Any, looked: bool = True,
                    trace: Trace | None = None) -> T:
        """Answer a call the compiled hit path could not: memory had no fresh entry, or it is not bound (first
        call, or the settings just changed, which unbinds it at once): then this looks in memory again (as it
        does when not ``looked``). ``trace`` is told which tier answered, or that the function runs."""
        cache = self._cache  # the `cache` property, inlined: every miss passes here
        if cache is None or self._generation != tracker.generation:
            cache = self._rebind()
            looked = False  # what the hit path saw was another engine's memory, or none
        local = cache.local
        if local is not None:
            if not looked:
                value = local.peek(local_key)
                if value is not MISSING:
                    self._served(value, None, trace, cache.local_name)
                    return value  # type: ignore[no-any-return]
            if self._grace:  # a stale entry within its grace period is still served
                value = local.peek_stale(local_key, self._grace)
                if value is not MISSING:
                    self._served(value, "stale", trace)
                    self._refresh_soon(cache, local_key, args, kwargs)
                    return value  # type: ignore[no-any-return]
            cache.local_stats.misses += 1
        inflight = cache.inflight
        while True:
            flight = inflight.get(local_key)
            if flight is None or not self._joinable(cache, flight, local_key, args, kwargs):
                break  # none, or begun before an invalidation of this call: its value is not for this caller
            await flight.wait()
            if flight.done:
                if flight.error is not None:
                    raise flight.waiter_error()
                self._served(flight.value, "in-flight", trace)
                return flight.value  # type: ignore[no-any-return]
            # The computing caller was cancelled: one of the waiters takes over.
        flight = inflight[local_key] = Flight(cache.epoch)
        try:
            if cache.tiers or cache.listener is not None:
                value = await self._load(cache, local_key, args, kwargs, trace)
            else:  # memory only: compute right here (one coroutine less on the miss path)
                epoch = cache.epoch
                if trace is not None:
                    trace.computing()
                started = time.perf_counter()
                value = await self._fn(*args, **kwargs)
                plan = self._storable(cache, local_key, None, args, kwargs, epoch, time.perf_counter() - started,
                                      value)
                if plan is not None:
                    cache.remember(local_key, value, plan[1], plan[0], self.stats, self._codec)
            stale = type(value) is Stale
            if stale:
                value = value.value
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        else:
            flight.value = value
            flight.done = True
        finally:
            if inflight.get(local_key) is flight:
                del inflight[local_key]
            flight.finish()
        if stale:
            self._refresh_soon(cache, local_key, args, kwargs)
        result: T = value  # not typing.cast: a function call on every miss
        return result

    def _served(self, value: Any, source: str | None, trace: Trace | None = None, name: str = "memory") -> None:
        """Count a hit not served by the compiled hit path (``source`` names where it came from; ``None`` for
        the memory tier, called ``name``)."""
        if trace is not None:
            trace.hit(source or name)
        stats = self.stats
        stats.hits += 1
        if source is not None:
            stats.hits_by_tier[source] = stats.hits_by_tier.get(source, 0) + 1
        # The declared cost counts hits served from a tier; a caller that joined a running computation shared
        # its cost rather than saved it.
        if self._cost is not None and source != "in-flight":
            self._count_cost(value)

    async def _load(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any,
                    trace: Trace | None = None) -> Any:
        """Read the lower tiers, else compute (under the distributed lock, if asked) and store."""
        storage_key = self._prefix + self._keys.storage_digest(local_key)
        epoch, since = cache.epoch, cache.failures
        if cache.listener is not None and cache.local is not None:
            await cache.listener.follow()
        if cache.tiers:
            value = await self._read(cache, local_key, storage_key, epoch, trace)
            if value is not MISSING:
                return value
            if self._lease is not None and cache.lock_tier is not None:
                return await compute_locked(
                    cache, storage_key, self._lease, lambda: self._read(cache, local_key, storage_key, epoch, trace),
                    lambda: self._compute(cache, local_key, storage_key, args, kwargs, epoch, since, trace))
        return await self._compute(cache, local_key, storage_key, args, kwargs, epoch, since, trace)

    async def _read(self, cache: TieredCache, local_key: Hashable, storage_key: str, epoch: int,
                    trace: Trace | None = None) -> Any:
        started = time.perf_counter()
        stats = self.stats
        probe = stats if trace is None else FunctionStats()  # which tier answered, when asked
        value = await cache.read_lower(local_key, storage_key, probe, grace=self._grace, epoch=epoch,
                                       codec=self._codec)
        if probe is not stats:
            for tier, hits in probe.hits_by_tier.items():
                stats.hits_by_tier[tier] = stats.hits_by_tier.get(tier, 0) + hits
                trace.hit(tier)  # type: ignore[union-attr]
        if value is not MISSING:
            stats.hits += 1
            stats.cached_latency.add(time.perf_counter() - started)
            if self._cost is not None:
                self._count_cost(value.value if type(value) is Stale else value)
        return value

    def _storable(self, cache: TieredCache, local_key: Hashable, storage_key: str | None, args: Any,
                  kwargs: Any, epoch: int, seconds: float, result: Any) -> tuple[tuple[str, ...], float | None] | None:
        """Count a computation that took ``seconds``; return the ``(tags, expires_at)`` to store its ``result``
        with, or ``None`` when it must not be stored (``cache_if=`` refused it, ``tags=`` failed, or an
        invalidation of the entry went by since ``epoch``: the result may be what was just invalidated).
        ``storage_key`` is derived only when that check needs it (a memory-only engine has none)."""
        stats = self.stats
        stats.misses += 1
        stats.computed_latency.add(seconds)
        try:
            tags = self._fixed_tags if self._tags_fn is None else self._tags(args, kwargs)
        except Exception as exc:  # a failing tags= function must not lose the result
            stats.errors += 1
            cache.log.failure(f"tags= of {self.identity}", exc)
            if cache.strict:
                raise
            return None
        if epoch != cache.epoch and cache.invalidated_since(
                epoch, storage_key or self._prefix + self._keys.storage_digest(local_key), tags):
            return None
        if not self.per_result:
            ttl = self._expiry_default
            return tags, (cache.clock() + ttl if ttl is not None else None)
        expires_at = self.expiry_of(cache, result)
        return None if expires_at is False else (tags, expires_at)

    def expiry_of(self, cache: TieredCache, result: Any) -> float | bool | None:
        """When an entry of ``result`` stored now expires (``None``: never), or ``False`` when it must not be
        stored: ``cache_if=`` refused it or a ``ttl=`` function gave zero (counted in `not_stored`). A failing
        ``cache_if``/``ttl`` function is counted and logged, and the result is not stored (raised in strict
        mode)."""
        try:
            ttl = result_lifetime(self._cache_if, self._ttl_fn, self._expiry_default, result)
        except Exception as exc:
            self.stats.errors += 1
            cache.log.failure(f"cache_if=/ttl= of {self.identity}", exc)
            if cache.strict:
                raise
            return False
        if ttl is False:
            self.not_stored += 1
            return False
        return cache.clock() + ttl if ttl is not None else None

    async def _compute(self, cache: TieredCache, local_key: Hashable, storage_key: str, args: Any, kwargs: Any,
                       epoch: int, since: int, trace: Trace | None = None) -> T:
        if trace is not None:
            trace.computing()
        started = time.perf_counter()
        result = await self._fn(*args, **kwargs)
        plan = self._storable(cache, local_key, storage_key, args, kwargs, epoch, time.perf_counter() - started,
                              result)
        if plan is None:
            return result
        tags, expires_at = plan
        try:
            await cache.write(local_key, storage_key, result, expires_at, tags, self.stats, grace=self._grace,
                              codec=self._codec,
                              since=since)
        except (SerializationError, BackendError):
            if cache.strict:
                raise
        return result

    def _refresh_soon(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any) -> None:
        """Start a background refresh of a stale entry unless one (or any computation of it) is running."""
        inflight = cache.inflight
        if local_key in inflight:
            return
        flight = inflight[local_key] = Flight(cache.epoch)
        cache.background.start_soon(self._refresh, cache, local_key, args, kwargs, flight)

    async def _refresh(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any,
                       flight: Flight) -> None:
        try:
            storage_key = self._prefix + self._keys.storage_digest(local_key)
            epoch, since = cache.epoch, cache.failures

            def compute() -> Awaitable[T]:
                return self._compute(cache, local_key, storage_key, args, kwargs, epoch, since)

            if self._lease is not None and cache.lock_tier is not None:
                # Across processes too, one refresh: whoever holds the lock refreshes, the others keep serving.
                value = await refresh_locked(cache, storage_key, self._lease, compute)
                if value is MISSING:
                    return
            else:
                value = await compute()
            flight.value = value
            flight.done = True
            self.refreshes += 1
        except Exception as exc:
            flight.error = exc
            flight.done = True
            self.stats.errors += 1
            cache.log.failure(f"background refresh of {self.identity}", exc)
        finally:
            if cache.inflight.get(local_key) is flight:
                del cache.inflight[local_key]
            flight.finish()

    # -- per-call control ---------------------------------------------------------------------------------

    async def _controlled(self, local_key: Hashable, args: Any, kwargs: Any) -> T:
        """Answer a call while a bypass, refresh or explain block is open somewhere in the process."""
        mode = current_mode()
        if mode is None and only_sampling():  # watched for access sampling only: draw first
            if not audit.sampled():
                return await self._miss(local_key, args, kwargs, False)
            return await self._answer(local_key, args, kwargs, None, True)
        return await self._answer(local_key, args, kwargs, mode)

    async def _answer(self, local_key: Hashable, args: Any, kwargs: Any, mode: Mode | None,
                      sampled: bool | None = None) -> T:
        """Answer a call as ``mode`` asks (``None``: as usual), reporting how to `report` (and to the audit log
        when ``sampled``; ``None``: draw it)."""
        if sampled is None:
            sampled = audit.sampled()
        trace = Trace(self.identity, self._keys.storage_digest(local_key), mode,
                      self._keys.namespace if sampled else None)
        if mode == "bypass":
            self.bypassed += 1
            trace.computing()
            return await self._fn(*args, **kwargs)
        if mode == "refresh":
            return await self._recompute(local_key, args, kwargs, trace)
        return await self._miss(local_key, args, kwargs, False, trace)

    async def _recompute(self, local_key: Hashable, args: Any, kwargs: Any, trace: Trace) -> T:
        """Compute and overwrite the entry; callers of the key meanwhile wait for this computation."""
        cache = self.cache
        self.refreshed += 1
        inflight = cache.inflight
        flight = inflight[local_key] = Flight(cache.epoch)
        try:
            storage_key = self._prefix + self._keys.storage_digest(local_key)
            value = await self._compute(cache, local_key, storage_key, args, kwargs, cache.epoch, cache.failures,
                                        trace)
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        else:
            flight.value = value
            flight.done = True
        finally:
            if inflight.get(local_key) is flight:
                del inflight[local_key]
            flight.finish()
        return value

    def call_with(self, mode: Mode, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call the function as ``mode`` says: ``"bypass"`` (no cache) or ``"refresh"`` (recompute and
        overwrite). Returns a coroutine for an async function, the result for a sync one.

        Raises:
            UnkeyableArgumentError: An argument cannot be keyed.
            TypeError: A ``batch=`` function (per-call control is per item key; not available there).
        """
        if self._watched is None:
            raise TypeError(f"{self.identity}: bypass() and refresh() are not available with batch=")
        try:
            local_key = self._keys.local(args, kwargs)
        except KeyFunctionError as error:
            if self.sync:
                return self._key_failed_sync(error, args, kwargs)
            return self._key_failed(error, args, kwargs)
        if self.sync:
            return run(lambda: self._answer(local_key, args, kwargs, mode))
        return self._answer(local_key, args, kwargs, mode)

    def _joinable(self, cache: TieredCache, flight: Flight, local_key: Hashable, args: Any, kwargs: Any) -> bool:
        """Whether a caller may wait for ``flight``: no invalidation since it began covers this call (its key, its
        tags, its namespace, or everything). Unrelated invalidations keep one computation."""
        if flight.epoch == cache.epoch:  # none since: the usual case, without tags or a digest
            return True
        try:
            tags = self._tags(args, kwargs)
        except Exception:  # counted where the result is stored; here, computing anew is the safe answer
            return False
        return not cache.invalidated_since(flight.epoch, self._prefix + self._keys.storage_digest(local_key), tags)

    def _tags(self, args: Any, kwargs: Any) -> tuple[str, ...]:
        if self._tags_fn is None:
            return self._fixed_tags
        return self._namespace_tags + user_tags(self._tags_fn(**self._keys.arguments(args, kwargs)),
                                                f"tags= of {self.identity}")

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
        memory_hits = self.stats.memory_hits
        if memory_hits:
            name = self._cache.local_name if self._cache is not None else "memory"
            tiers = {name: memory_hits, **tiers}
        return info._replace(hits_by_tier=tiers)

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {self.identity: self.cache_info()._asdict()}

    @property
    def namespace(self) -> str:
        """The namespace of this function's entries."""
        return self._keys.namespace

    def __repr__(self) -> str:
        return f"<FunctionCache of {self.identity}>"


_functions: weakref.WeakSet[FunctionCache[Any, Any]] = weakref.WeakSet()


def _on_settings_change() -> None:
    for fn in stable_list(lambda: _functions):
        fn._unbind()


def _on_switch(watching: bool) -> None:
    for fn in stable_list(lambda: _functions):
        fn._switch(watching)


tracker.subscribe(_on_settings_change)
on_switch(_on_switch)
