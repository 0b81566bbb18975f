"""The decorators: thin, typed constructors of the engines in `cachelayers.engines`."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, Self, TypeVar, cast, final, overload

from cachelayers.engines.batcher import Batcher, BatchInfo, QueueFullPolicy, Rows
from cachelayers.engines.limiter import Adaptive, LimitedFunction, RateLimiter
from cachelayers.engines.semantic import SemanticCacheInfo, SemanticFunction, Verifier
from cachelayers.engines.tiered import BatchFunctionCache, FunctionCache, TieredCache
from cachelayers.metrics import CacheInfo

__all__ = ["BatchedFunction", "CachedFunction", "RateLimitedFunction", "SemanticCachedFunction", "batched",
           "multilevel_cached", "rate_limited", "semantic_cached"]

P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co")
X = TypeVar("X")
Y = TypeVar("Y")


class CachedFunction(Protocol[P, T_co]):
    """What `multilevel_cached` returns: the function, same signature, plus cache management.

    At run time it is a plain ``async def`` function, so it binds as a method like the function it wraps.
    """

    __wrapped__: Callable[P, Awaitable[T_co]]
    __name__: str
    __qualname__: str
    cache: FunctionCache[P, Any]
    """The engine behind the function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...

    def cache_info(self) -> CacheInfo:
        """Hits, misses, hit rate, hits per tier, cached and computed latency, time and cost saved."""
        ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Remove the entry of these arguments from every tier (for a method, pass the instance first)."""
        ...

    async def invalidate_all(self) -> None:
        """Remove every entry of the function's namespace from every tier."""
        ...

    async def cache_clear(self) -> None:
        """Same as `invalidate_all`."""
        ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None, /) -> Self: ...

    @overload
    def __get__(
        self, instance: object, owner: type[Any] | None = None, /
    ) -> Callable[..., Coroutine[Any, Any, T_co]]: ...

    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Any: ...


@overload
def multilevel_cached(fn: Callable[P, Awaitable[T]], /) -> CachedFunction[P, T]: ...


@overload
def multilevel_cached(
    *,
    ttl: float | str | timedelta | None = None,
    tags: Callable[..., Iterable[str]] | Iterable[str] | None = None,
    key: Callable[..., Any] | None = None,
    namespace: str | None = None,
    version: str | int = 0,
    ignore: Iterable[str] = (),
    name: str | None = None,
    cost: float | Callable[[Any], float] | None = None,
    cache: TieredCache | None = None,
    stale: float | str | timedelta | None = None,
    lock: bool | float | str | timedelta = False,
    batch: bool | str = False,
) -> Callable[[Callable[P, Awaitable[T]]], CachedFunction[P, T]]: ...


def multilevel_cached(
    fn: Callable[P, Awaitable[T]] | None = None,
    /,
    *,
    ttl: float | str | timedelta | None = None,
    tags: Callable[..., Iterable[str]] | Iterable[str] | None = None,
    key: Callable[..., Any] | None = None,
    namespace: str | None = None,
    version: str | int = 0,
    ignore: Iterable[str] = (),
    name: str | None = None,
    cost: float | Callable[[Any], float] | None = None,
    cache: TieredCache | None = None,
    stale: float | str | timedelta | None = None,
    lock: bool | float | str | timedelta = False,
    batch: bool | str = False,
) -> CachedFunction[P, T] | Callable[[Callable[P, Awaitable[T]]], CachedFunction[P, T]]:
    """Cache an async function's results over the configured tiers (memory → Redis → disk).

    Usable bare (``@multilevel_cached``) or with arguments. Equal calls — after normalising arguments
    through the signature — share one entry; ``None`` is cached, exceptions are not. Concurrent calls with
    the same arguments run the function once. A cache failure never fails the call.

    Args:
        fn: The function, when used bare.
        ttl: Lifetime of entries (seconds, ``"90s"``, ``"1h"``, a timedelta); the settings' ``default_ttl``
            when omitted. The expiry is absolute: a copy found in a lower tier keeps its remaining lifetime.
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
            to return ``np.ndarray``). Not combined with ``stale`` or ``lock``.

    Returns:
        A `CachedFunction`: the wrapped function's signature, plus ``cache_info()``,
        ``invalidate(*args, **kwargs)``, ``invalidate_all()`` and ``cache_clear()``.

    Raises:
        ConfigError: ``ttl`` is malformed or negative, ``namespace`` invalid, or ``ignore`` names an
            unknown parameter.
        TypeError: ``fn`` is not an async function. At call time, an argument that cannot be keyed raises
            `UnkeyableArgumentError` (a ``TypeError``) naming it.
    """

    def decorate(f: Callable[P, Awaitable[T]]) -> CachedFunction[P, T]:
        options: dict[str, Any] = {"ttl": ttl, "tags": tags, "key": key, "namespace": namespace, "version": version,
                                   "ignore": ignore, "name": name, "cost": cost, "cache": cache}
        if batch is not False:
            engine: FunctionCache[P, T] = BatchFunctionCache(f, batch=batch, stale=stale, lock=lock, **options)
        else:
            engine = FunctionCache(f, stale=stale, lock=lock, **options)
        return cast(CachedFunction[P, T], engine.wrapper)

    return decorate if fn is None else decorate(fn)


@final
class BatchedFunction(Generic[X, P, Y]):
    """What `batched` returns: call it with *one* item (and the shared arguments) to get that item's result.

    ``await embed_one(text)`` puts ``text`` in the next batch and returns its own result;
    ``await embed_one.many(texts)`` submits several at once. The batch function itself is ``__wrapped__``.
    """

    __wrapped__: Callable[..., Awaitable[Any]]
    __name__: str
    __qualname__: str

    def __init__(self, batcher: Batcher[X, P, Y]) -> None:
        self.batcher = batcher
        """The engine behind the function."""
        functools.update_wrapper(self, batcher.fn, updated=())  # not the wrapped object's __dict__: ours is ours

    def __call__(self, item: X, /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, Y]:
        """Submit one item; the coroutine returns its result (see `Batcher.submit`)."""
        return self.batcher.submit(item, *args, **kwargs)

    def many(self, items: Iterable[X], /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, list[Y]]:
        """Submit several items sharing the same arguments; the coroutine returns their results in order."""
        return self.batcher.submit_many(items, *args, **kwargs)

    def flush(self) -> None:
        """Send every pending batch now, without waiting for ``max_wait``."""
        self.batcher.flush()

    async def aclose(self, *, flush: bool = True) -> None:
        """Close: send (or, with ``flush=False``, reject) what is pending; later calls raise."""
        await self.batcher.aclose(flush=flush)

    def batch_info(self) -> BatchInfo:
        """Batches, items, deduplicated and dropped items, fill ratio, waits and durations."""
        return self.batcher.info()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.batcher.aclose()

    def __repr__(self) -> str:
        return f"<batched {self.batcher.name}>"


@overload
def batched(fn: Callable[Concatenate[list[X], P], Awaitable[Rows[Y]]], /) -> BatchedFunction[X, P, Y]: ...


@overload
def batched(
    *,
    max_size: int = 64,
    max_wait: float | str | timedelta = 0.005,
    max_weight: float | None = None,
    weight: Callable[[Any], float] | None = None,
    max_concurrency: int | None = None,
    max_queue: int | None = None,
    queue_full: QueueFullPolicy = "wait",
    key: Callable[[Any], Hashable] | None = None,
    dedupe: bool = True,
    name: str | None = None,
) -> Callable[[Callable[Concatenate[list[X], P], Awaitable[Rows[Y]]]], BatchedFunction[X, P, Y]]: ...


def batched(
    fn: Callable[Concatenate[list[X], P], Awaitable[Rows[Y]]] | None = None,
    /,
    *,
    max_size: int = 64,
    max_wait: float | str | timedelta = 0.005,
    max_weight: float | None = None,
    weight: Callable[[Any], float] | None = None,
    max_concurrency: int | None = None,
    max_queue: int | None = None,
    queue_full: QueueFullPolicy = "wait",
    key: Callable[[Any], Hashable] | None = None,
    dedupe: bool = True,
    name: str | None = None,
) -> BatchedFunction[X, P, Y] | Callable[[Callable[Concatenate[list[X], P], Awaitable[Rows[Y]]]],
                                         BatchedFunction[X, P, Y]]:
    """Turn a batch function into a per-item function whose calls are gathered into batches.

    Decorate ``async def fn(items: list[X], *shared) -> list[Y]`` (or an array with one row per item); callers
    then await ``fn(item, *shared)`` and get their own result. A batch goes when it has ``max_size`` items (or
    ``max_weight``), or ``max_wait`` after its first item; calls with different shared arguments never share a
    batch; identical pending items are sent once. Usable bare (``@batched``) or with arguments, from asyncio or
    trio, across repeated ``asyncio.run`` calls: nothing is bound to an event loop until the first call in it.

    Args:
        fn: The batch function, when used bare.
        max_size: Most items in one batch.
        max_wait: Longest a batch waits for more items after its first: seconds, ``"5ms"``, a timedelta.
        max_weight: Most total weight in one batch (e.g. tokens); needs ``weight``.
        weight: Weight of one item, e.g. ``lambda text: len(text) // 4``.
        max_concurrency: Most batches in flight at once (per event loop); ``None`` for no bound.
        max_queue: Most items waiting to be sent (per event loop); ``None`` for no bound.
        queue_full: When the queue is full, ``"wait"`` for room or ``"raise"`` `BatchQueueFullError`.
        key: Function of an item giving its identity for deduplication (default: the item, when hashable).
        dedupe: ``False`` sends identical items separately.
        name: Name used in errors and statistics instead of ``module.qualname``.

    Returns:
        A `BatchedFunction`: ``await f(item, *shared)`` for one result, ``await f.many(items, *shared)`` for
        several, ``f.flush()``, ``await f.aclose()`` (or ``async with f:``), ``f.batch_info()``.

    Raises:
        ConfigError: A parameter is out of range or malformed (the error names it).
        TypeError: ``fn`` is not an async function.
    """

    def decorate(f: Callable[Concatenate[list[X], P], Awaitable[Rows[Y]]]) -> BatchedFunction[X, P, Y]:
        return BatchedFunction(Batcher(f, max_size=max_size, max_wait=max_wait, max_weight=max_weight,
                                       weight=weight, max_concurrency=max_concurrency, max_queue=max_queue,
                                       queue_full=queue_full, key=key, dedupe=dedupe, name=name))

    return decorate if fn is None else decorate(fn)


class SemanticCachedFunction(Protocol[P, T_co]):
    """What `semantic_cached` returns: the function, same signature, plus cache management.

    At run time it is a plain ``async def`` function. How a call was answered is told by
    `cachelayers.explain` / `cachelayers.last_lookup`, never by the return value.
    """

    __wrapped__: Callable[P, Awaitable[T_co]]
    cache: SemanticFunction[P, Any]
    """The engine behind the function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...

    def cache_info(self) -> SemanticCacheInfo:
        """Hits per level, misses, entries, evictions, errors, verifier outcomes, latencies."""
        ...

    async def cache_clear(self) -> None:
        """Remove every entry of the function (every process's, when shared)."""
        ...

    async def invalidate_all(self) -> None:
        """Same as `cache_clear`."""
        ...

    async def save(self) -> None:
        """Persist the index now (disk mode)."""
        ...

    async def aclose(self) -> None:
        """Save and close the store."""
        ...


def semantic_cached(
    *,
    embed: Callable[[list[str]], Any] | None = None,
    threshold: float | None = None,
    text: str | Callable[..., str] | None = None,
    partition: Callable[..., Any] | None = None,
    ignore: Iterable[str] = (),
    ttl: float | str | timedelta | None = None,
    max_entries: int = 10_000,
    verifier: Verifier | None = None,
    max_candidates: int = 4,
    namespace: str | None = None,
    version: str | int = 0,
    name: str | None = None,
    cache: TieredCache | None = None,
    cache_embeddings: bool = True,
    vector_index: str | None = None,
    clock: Callable[[], float] | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], SemanticCachedFunction[P, T]]:
    """Answer calls from a *similar* earlier call of the same partition.

    The semantic text (one argument) is embedded and looked up among earlier calls whose other arguments —
    the partition — are equal; the stored result of the nearest one is returned when its cosine similarity
    is at least ``threshold``. Otherwise the function runs and its result is stored.

    Args:
        embed: Embedder, sync or async ``list[str] -> (n, d)`` array; the built-in offline
            `cachelayers.embedders.HashingEmbedder` by default (near-duplicates only: see its docs).
        threshold: Least similarity for a hit, in [0, 1]; the embedder's calibrated ``default_threshold``
            when omitted. Measure yours with ``cachelayers calibrate``.
        text: Name of the argument holding the text (the first parameter by default), or a function of the
            arguments (by name) returning it, e.g. ``lambda messages, **_: messages[-1]["content"]``.
        partition: Function of the arguments (by name) returning what must be *equal* for two calls to share
            an answer; by default every argument except the text and ``ignore``. Required with a ``text``
            function. Include the tenant.
        ignore: Arguments left out of the default partition (clients, ``self``).
        ttl: Lifetime of entries (seconds, ``"1h"``, a timedelta); a hit never extends it.
        max_entries: Capacity of each partition (LRU eviction removes vector and payload).
        verifier: ``async (text, candidate) -> bool``: a second stage that must accept a candidate before it
            is served (e.g. a cross-encoder or an LLM judge). If it raises, the candidate is rejected.
        max_candidates: Candidates above the threshold offered to the verifier, best first.
        namespace: Group of entries; the function's identity by default.
        version: Bump it to stop serving entries stored by older code.
        name: Identity used instead of ``module.qualname``.
        cache: Tiered cache for embeddings; the default cache of the settings in force when omitted.
        cache_embeddings: Set to ``False`` not to cache embeddings.
        vector_index: Where entries live, overriding ``Settings.vector_index`` (``memory://``,
            ``usearch:///dir``, ``redis://host:port/db``).
        clock: Wall-clock time source for expiry (tests).

    Returns:
        A decorator making a `SemanticCachedFunction`.

    Raises:
        ConfigError: At decoration time: ``threshold`` outside [0, 1] (or missing with an uncalibrated
            embedder), ``text`` naming no parameter, a ``text`` function without ``partition``, a bad
            ``ttl``, ``max_entries`` or ``vector_index``.
        TypeError: The function is not async. At call time, a semantic text that is not a ``str``, or a
            partition argument that cannot be keyed (`UnkeyableArgumentError`).
    """

    def decorate(f: Callable[P, Awaitable[T]]) -> SemanticCachedFunction[P, T]:
        engine = SemanticFunction(f, embed=embed, threshold=threshold, text=text, partition=partition,
                                  ignore=ignore, ttl=ttl, max_entries=max_entries, verifier=verifier,
                                  max_candidates=max_candidates, namespace=namespace, version=version, name=name,
                                  cache=cache, cache_embeddings=cache_embeddings, vector_index=vector_index,
                                  clock=clock)
        return cast(SemanticCachedFunction[P, T], engine.wrapper)

    return decorate


class RateLimitedFunction(Protocol[P, T_co]):
    """What `rate_limited` returns: the function, same signature, waiting for its limits before each call.

    At run time it is a plain ``async def`` function, so it binds as a method like the function it wraps.
    """

    __wrapped__: Callable[P, Awaitable[T_co]]
    rate_limit: LimitedFunction[P, Any]
    """The engine behind the function (``.limiter`` is the `RateLimiter` it waits in)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None, /) -> Self: ...

    @overload
    def __get__(
        self, instance: object, owner: type[Any] | None = None, /
    ) -> Callable[..., Coroutine[Any, Any, T_co]]: ...

    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Any: ...


def rate_limited(
    *limits: str,
    cost: int | Callable[..., int | float] | Mapping[str, int | Callable[..., int | float]] | None = None,
    key: Callable[..., Any] | None = None,
    timeout: float | str | timedelta | None = None,
    strategy: str | None = None,
    storage: str | None = None,
    limiter: RateLimiter | None = None,
    retries: int = 0,
    backoff: float | str | timedelta = 1.0,
    max_backoff: float | str | timedelta = 60.0,
    adaptive: Adaptive | bool = False,
    rate_limit_error: Callable[[BaseException], bool | float | None] | None = None,
    actual: Callable[[Any], int | float] | Mapping[str, Callable[[Any], int | float]] | None = None,
    name: str | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], RateLimitedFunction[P, T]]:
    """Wait, fairly, until named limits admit each call of an async function.

    ``@rate_limited("llm-rpm", "llm-tpm", cost=count_tokens, key=lambda model, **_: model, timeout=30)``
    admits a call when both limits (named in ``Settings.limits``, or inline like ``"3500/minute"``) have room
    for it under the call's key; callers wait in FIFO order per key and process, so a large cost is never
    starved by small ones. With Redis storage the limits hold across processes.

    Args:
        limits: Limit names from the settings, or inline limits (``"3500/minute"``, ``"10 per 2 seconds"``,
            ``"10/second;500/minute"``). An inline limit belongs to this function; a named one is shared by
            every function using the name.
        cost: Units a call takes: a number, or a function of the call's arguments (by name, like ``key``;
            it is given only the arguments it names unless it takes ``**kwargs``). With one limit it weighs
            that limit; with several, the first counts calls (cost 1) and ``cost`` weighs the others, as in
            ``@rate_limited("llm-rpm", "llm-tpm", cost=count_tokens)``. A mapping gives each limit its cost by
            name (unnamed limits cost 1).
        key: Function of the call's arguments returning what limits are counted per (a tenant, a model).
        timeout: Longest wait for admission (seconds, ``"500ms"``); ``None`` waits as long as needed, ``0``
            never waits. A call that cannot be admitted in time raises `RateLimitExceeded` — as soon as that is
            known (e.g. the window resets after the deadline), at the latest at the deadline.
        strategy: ``"moving-window"`` (default, exact), ``"sliding-window-counter"`` or ``"fixed-window"``.
        storage: Storage URL (``"memory://"``, ``"redis://host:6379/0"``), overriding the settings' choice
            (the first Redis tier, else memory).
        limiter: Engine to wait in, instead of the one of the settings in force.
        retries: Retries after a rate-limit error from the function, each waiting for the Retry-After pause
            and an exponential back-off with jitter.
        backoff: First back-off (doubling per retry); also the pause when the error gives no Retry-After.
        max_backoff: Longest back-off.
        adaptive: Lower the effective limits on rate-limit errors and raise them back after sustained
            success (AIMD): ``True`` or an `Adaptive` with its parameters.
        rate_limit_error: ``exc -> bool | float | None`` deciding what is a rate-limit error (a number is its
            Retry-After in seconds; ``None`` leaves it to the default: HTTP 429 on the exception or its
            ``response``, or a class named like ``RateLimitError``).
        actual: Function of the result returning the units really used (e.g. tokens from the response), or
            a mapping of them by limit; the difference to ``cost`` is charged (or returned) after the call.
        name: Identity of the function in inline limits' keys, instead of ``module.qualname``.

    Returns:
        A decorator making a `RateLimitedFunction`.

    Raises:
        ConfigError: At decoration time: no limits, a malformed inline limit (e.g. ``"3500/minuet"``), a bad
            name, ``cost`` mapping, ``timeout``, ``strategy``, ``storage``, ``retries`` or ``adaptive``, or a
            fixed cost larger than an inline limit. A name missing from the settings raises it at call time.
        TypeError: The function is not async, or the decorator is used bare.
        RateLimitExceeded: At call time, when the call is not admitted within ``timeout`` or its cost is
            larger than a limit (``retry_after`` is ``None``: it can never fit).
    """
    if limits and callable(limits[0]):
        raise TypeError("rate_limited needs its limits: use @rate_limited('3500/minute') or "
                        "@rate_limited('llm-rpm'), not bare @rate_limited")

    def decorate(f: Callable[P, Awaitable[T]]) -> RateLimitedFunction[P, T]:
        engine = LimitedFunction(f, limits, cost=cost, key=key, timeout=timeout, strategy=strategy,
                                 storage=storage, limiter=limiter, retries=retries, backoff=backoff,
                                 max_backoff=max_backoff, adaptive=adaptive, rate_limit_error=rate_limit_error,
                                 actual=actual, name=name)
        return cast(RateLimitedFunction[P, T], engine.wrapper)

    return decorate
