"""`@multilevel_cached`: the exact cache over tiers, as a decorator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, Unpack, cast, final, overload

from cachelayers.decorators.wrapper import FunctionWrapper
from cachelayers.engines.sync import run
from cachelayers.engines.tiered import BatchFunctionCache, CacheOptions, FunctionCache
from cachelayers.metrics import CacheInfo
from cachelayers.validation import check_options

__all__ = ["CacheDecorator", "CachedFunction", "SyncCachedFunction", "multilevel_cached"]

P = ParamSpec("P")
T = TypeVar("T")


@final
class CachedFunction(FunctionWrapper[P, Coroutine[Any, Any, T]]):
    """What `multilevel_cached` returns for an ``async def``: the function, same signature, plus cache management.

    Calling it calls the engine's compiled hit path directly (see `FunctionWrapper`). It binds as a method like
    the function it wraps, and `inspect.iscoroutinefunction` is true of it.
    """

    def __init__(self, fn: Callable[P, Awaitable[T]], engine: FunctionCache[P, T]) -> None:
        super().__init__(fn, engine.wrapper)
        self.cache = engine
        """The engine behind the function."""
        engine.attach(self._use)

    def cache_info(self) -> CacheInfo:
        """Hits, misses, hit rate, hits per tier, cached and computed latency, time and cost saved."""
        return self.cache.cache_info()

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        """Call the function without the cache: nothing is read or stored (for a method, pass the instance
        first). ``with cachelayers.bypass():`` does the same for every cached call in a block."""
        return cast(Coroutine[Any, Any, T], self.cache.call_with("bypass", args, kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        """Call the function and overwrite the entry in every tier, whether or not one was cached (for a
        method, pass the instance first); callers finding no entry meanwhile wait for this computation.
        ``with cachelayers.refresh():`` does the same in a block."""
        return cast(Coroutine[Any, Any, T], self.cache.call_with("refresh", args, kwargs))

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, None]:
        """Remove the entry of these arguments from every tier (for a method, pass the instance first)."""
        return self.cache.invalidate(*args, **kwargs)

    def invalidate_all(self) -> Coroutine[Any, Any, None]:
        """Remove every entry of the function's namespace from every tier."""
        return self.cache.invalidate_all()

    def cache_clear(self) -> Coroutine[Any, Any, None]:
        """Same as `invalidate_all`."""
        return self.cache.invalidate_all()

    def __repr__(self) -> str:
        return f"<cached function {self.cache.identity}>"


@final
class SyncCachedFunction(FunctionWrapper[P, T]):
    """What `multilevel_cached` returns for a plain ``def``: the same engine, keys and entries, called from any
    thread (see the guide "Sync functions").

    A memory hit is answered in the calling thread; anything else blocks it while the library's loop looks in
    the other tiers; the function itself runs in the calling thread, once per key however many threads ask.
    `inspect.iscoroutinefunction` is false of it; the management methods block too.
    """

    def __init__(self, fn: Callable[P, T], engine: FunctionCache[P, T]) -> None:
        super().__init__(fn, engine.wrapper)
        self.cache = engine
        """The engine behind the function."""
        engine.attach(self._use)

    def cache_info(self) -> CacheInfo:
        """Hits, misses, hit rate, hits per tier, cached and computed latency, time and cost saved."""
        return self.cache.cache_info()

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function without the cache (see `CachedFunction.bypass`)."""
        return cast(T, self.cache.call_with("bypass", args, kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function and overwrite its entry (see `CachedFunction.refresh`)."""
        return cast(T, self.cache.call_with("refresh", args, kwargs))

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Remove the entry of these arguments from every tier (for a method, pass the instance first)."""
        run(lambda: self.cache.invalidate(*args, **kwargs))

    def invalidate_all(self) -> None:
        """Remove every entry of the function's namespace from every tier."""
        run(self.cache.invalidate_all)

    def cache_clear(self) -> None:
        """Same as `invalidate_all`."""
        run(self.cache.invalidate_all)

    def __repr__(self) -> str:
        return f"<cached function {self.cache.identity}>"


class CacheDecorator(Protocol):
    """What ``multilevel_cached(**options)`` returns: decorates an ``async def`` or a plain ``def``."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> CachedFunction[P, T]: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, fn: Callable[P, T], /) -> SyncCachedFunction[P, T]: ...


@overload
def multilevel_cached(fn: Callable[P, Coroutine[Any, Any, T]], /) -> CachedFunction[P, T]: ...  # type: ignore[overload-overlap]


@overload
def multilevel_cached(fn: Callable[P, T], /) -> SyncCachedFunction[P, T]: ...


@overload
def multilevel_cached(**options: Unpack[CacheOptions]) -> CacheDecorator: ...


def multilevel_cached(fn: Callable[P, Any] | None = None, /, **options: Unpack[CacheOptions]) -> Any:
    """Cache a function's results over the configured tiers (memory → Redis → disk).

    Usable bare (``@multilevel_cached``) or with arguments. Equal calls — after normalising arguments
    through the signature — share one entry; ``None`` is cached, exceptions are not. Concurrent calls with
    the same arguments run the function once. A cache failure never fails the call. A plain ``def`` is cached
    too, with the same keys and entries, from any thread (see the guide "Sync functions").

    Args:
        fn: The function, when used bare.
        ttl: Lifetime of entries (seconds, ``"90s"``, ``"1h"``, a timedelta); the settings' ``default_ttl``
            when omitted. The expiry is absolute: a copy found in a lower tier keeps its remaining lifetime. Or a
            function of the result returning one of those (``None``: the default; ``0``: not stored).
        cache_if: Function of the result: a result for which it is false is returned but not stored (counted
            in ``fn.cache.not_stored``), e.g. ``cache_if=lambda r: r["finish_reason"] == "stop"``.
        tags: Tags of each entry, or a function of the call's arguments (by name) returning them; invalidate
            them with ``cachelayers.invalidate_tags``.
        key: Function of the call's arguments (by name) whose result is keyed instead of the arguments.
        namespace: Group of entries, invalidatable as a whole; defaults to the function's identity.
        version: Bump it when the function's output changes meaning, to stop reading old entries.
        ignore: Parameters left out of the key, e.g. ``("client",)`` or ``("self",)``.
        name: Identity used in keys instead of ``module.qualname`` (keep keys when moving code).
        cost: Cost of one computed call (e.g. dollars), or a function of the result; summed per hit as
            ``cost_saved`` in ``cache_info()``.
        cache: Engine to use instead of the one made from the settings in force.
        stale: Grace period after expiry during which the old value is still served while exactly one
            background refresh per key runs (stale-while-revalidate).
        lock: Single-flight across processes: ``True`` (30s lease) or a lease such as ``"2m"``. Processes
            missing the same key take a lock in the Redis tier; one computes, the others are woken when it
            is done (or back off exponentially). A crashed holder's lock expires with its lease.
        batch: Cache a list-to-list (or list-to-array) function per item: ``True`` when the items are the
            first parameter, or the parameter's name. The function is called once with only the missing
            items; results come back in input order (stacked into an array when the function is annotated
            to return ``np.ndarray``). The function must return a list, a tuple or an array with exactly one
            result per item it was given; anything else (a dict, a set, a string, a generator, a wrong length)
            is a `BatchError` and nothing of it is cached. Not combined with ``stale`` or ``lock``.

    Returns:
        A `CachedFunction` (a `SyncCachedFunction` for a plain ``def``): the wrapped function's signature, plus
        ``cache_info()``, ``bypass(*args, **kwargs)``, ``refresh(*args, **kwargs)``,
        ``invalidate(*args, **kwargs)``, ``invalidate_all()`` and ``cache_clear()``.

    Raises:
        ConfigError: ``ttl`` is malformed or negative, ``cache_if`` not a function, ``namespace`` invalid, or
            ``ignore`` names an unknown parameter.
        TypeError: ``fn`` is not callable, or an option is unknown. At call time, an argument that
            cannot be keyed raises `UnkeyableArgumentError` (a ``TypeError``) naming it.
    """
    check_options(options, CacheOptions, "multilevel_cached")

    def decorate(f: Callable[P, Any]) -> CachedFunction[P, Any] | SyncCachedFunction[P, Any]:
        engine: FunctionCache[P, Any]
        if options.get("batch", False) is not False:
            engine = BatchFunctionCache(f, **options)
        else:
            engine = FunctionCache(f, **options)
        return SyncCachedFunction(f, engine) if engine.sync else CachedFunction(f, engine)

    return decorate if fn is None else decorate(fn)
