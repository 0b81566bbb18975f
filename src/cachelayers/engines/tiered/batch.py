"""`BatchFunctionCache`: a list-to-list (or list-to-array) function cached per item (``batch=``)."""

from __future__ import annotations

import inspect
import time
import typing
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable
from typing import Any, Final, NamedTuple, ParamSpec, TypeVar, Unpack, cast

import numpy as np

from cachelayers.backends.base import MISSING
from cachelayers.engines.batchrows import batch_rows
from cachelayers.engines.flight import Flight
from cachelayers.engines.tiered.cache import TieredCache
from cachelayers.engines.tiered.function import FunctionCache
from cachelayers.engines.tiered.options import CacheOptions
from cachelayers.errors import BackendError, ConfigError, SerializationError
from cachelayers.keys import FAST_TYPES

__all__ = ["BatchFunctionCache"]

P = ParamSpec("P")
T = TypeVar("T")

_DIGEST_MEMO: Final = 1 << 16  # storage digests a batch function remembers before starting over


def _returns_array(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is annotated to return a numpy array (then batch results are stacked back)."""
    annotation = inspect.signature(fn).return_annotation
    if annotation is inspect.Signature.empty:
        return False
    if isinstance(annotation, str):
        try:
            annotation = typing.get_type_hints(fn).get("return", annotation)
        except Exception:
            return "ndarray" in annotation or "NDArray" in annotation
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, np.ndarray)


class _BatchCall(NamedTuple):
    """One call of a batch function taken apart: its items and how to rebuild the call around other items."""

    items: list[Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    position: int | None  # where the items are among ``args``; ``None`` when passed by name

    def with_items(self, items: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.position is not None:
            return (*self.args[:self.position], items, *self.args[self.position + 1:]), self.kwargs
        return self.args, {**self.kwargs, name: items}


class BatchFunctionCache(FunctionCache[P, T]):
    """The engine of a list-to-list (or list-to-array) function cached per item: ``multilevel_cached(batch=True)``.

    Each item is keyed with the other arguments as if the function took that one item. A call looks its items
    up in memory, then the rest with one multi-get per tier, calls the function once with only the items still
    missing (in their input order, duplicates once), stores each result under its item's key and returns the
    results in input order: a list, or a numpy array stacked from the rows when the function is annotated to
    return one. Items computed by a concurrent call are waited for, not computed twice.

    The function must return a list, a tuple or an array (first dimension: the items) of exactly one result per
    item it was given; anything else (a mapping, a set, a string, an iterator, a wrong length) raises
    `BatchError` from the call, and nothing of that result is stored (`cachelayers.engines.batchrows`).

    Args:
        fn: The batch function.
        **options: The options of `multilevel_cached` (see there); ``batch`` is the name of the parameter holding
            the items, ``True`` (the default here) for the first parameter; ``lock`` and ``stale`` are not
            supported here.

    Raises:
        ConfigError: ``batch`` names no parameter, or ``lock``/``stale`` was given.
        BatchError: (from a call) the function returned a result of the wrong shape or length.
    """

    def __init__(self, fn: Callable[P, Awaitable[T]], /, **options: Unpack[CacheOptions]) -> None:
        batch = options.pop("batch", True)
        params = list(inspect.signature(fn).parameters.values())
        if batch is True:
            if not params or params[0].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ConfigError("batch", batch, f"{fn!r} has no first parameter to take the items")
            batch = params[0].name
        if not isinstance(batch, str) or batch not in {p.name for p in params}:
            raise ConfigError("batch", batch, "expected True or the name of the parameter that holds the items")
        for option in ("lock", "stale"):
            if options.get(option) not in (None, False):
                raise ConfigError(option, options.get(option), "not supported with batch=")
        self._batch_name = batch
        # Items recur (that is why they are cached): their storage digests are remembered, within a bound.
        self._digests: dict[Hashable, str] = {}
        index = next(i for i, p in enumerate(params) if p.name == batch)
        self._batch_index = index if params[index].kind is not inspect.Parameter.KEYWORD_ONLY else None
        self._array_output = _returns_array(fn)
        super().__init__(fn, **options)

    def _build_wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        engine = self

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await engine._call_batch(args, kwargs)

        if self._cache is not None:
            self._bind(self._cache)
        return wrapper

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _BatchCall:
        position = self._batch_index
        if position is not None and position < len(args):
            items = args[position]
        elif self._batch_name in kwargs:
            items, position = kwargs[self._batch_name], None
        else:
            raise TypeError(f"{self.identity}() missing the items argument {self._batch_name!r}")
        if isinstance(items, str | bytes) or not isinstance(items, Iterable):
            raise TypeError(f"{self.identity}(): {self._batch_name!r} must be a list of items, got "
                            f"{type(items).__qualname__}")
        return _BatchCall(list(items), args, kwargs, position)

    def _output(self, rows: list[Any]) -> T:
        if self._array_output:
            return cast(T, np.stack(rows) if rows else np.empty((0,)))
        return cast(T, rows)

    async def _call_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        cache = self.cache
        call = self._split(args, kwargs)
        if not call.items:
            return await self._fn(*args, **kwargs)
        name = self._batch_name
        local_of = self._keys.local
        if self._keys.fast_arity == 1 and call.position == 0 and len(args) == 1 and not kwargs:
            # The items are the only argument: a scalar item's key is what KeyBuilder.local makes, built here.
            token = self._keys.token
            keys = [(token, item) if type(item) in FAST_TYPES else local_of((item,), {}) for item in call.items]
        else:
            keys = [local_of(*call.with_items(item, name)) for item in call.items]
        first: dict[Hashable, Any] = {}
        for key, item in zip(keys, call.items, strict=True):
            first.setdefault(key, item)
        values: dict[Hashable, Any] = {}
        stats = self.stats
        local = cache.local
        if local is not None:
            peek = local.peek
            for key in first:
                value = peek(key)
                if value is not MISSING:
                    values[key] = value
            cache.local_stats.misses += len(first) - len(values)
        stats.hits += len(values)
        if len(values) < len(first):
            await self._fill(cache, call, first, values)
        rows = [values[key] for key in keys]
        if self._cost is not None:
            for key in values:
                self._count_cost(values[key])
        return self._output(rows)

    async def _fill(self, cache: TieredCache, call: _BatchCall, first: dict[Hashable, Any],
                    values: dict[Hashable, Any]) -> None:
        """Find the missing items in the lower tiers, compute the rest in one call, store them.

        The items this call looks up are registered as in flight (one shared `Flight` whose ``value`` is a
        dict by key), so a concurrent call wanting one of them waits for it instead of computing it again.
        """
        stats = self.stats
        await cache.follow_invalidations()
        epoch, since = cache.epoch, cache.failures
        inflight = cache.inflight
        mine: list[Hashable] = []
        theirs: dict[Hashable, Flight] = {}
        flight = Flight(epoch)
        results: dict[Hashable, Any] = {}
        flight.value = results
        for key in first:
            if key in values:
                continue
            other = inflight.get(key)
            if other is not None and self._joinable(cache, other, key, *call.with_items(first[key], self._batch_name)):
                theirs[key] = other
            else:
                inflight[key] = flight
                mine.append(key)
        try:
            if mine and cache.tiers:
                prefix, digests, digest_of = self._prefix, self._digests, self._keys.storage_digest
                if len(digests) > _DIGEST_MEMO:
                    digests.clear()
                storage = []
                for key in mine:
                    digest = digests.get(key)
                    if digest is None:
                        digest = digests[key] = digest_of(key)
                    storage.append(prefix + digest)
                started = time.perf_counter()
                found = await cache.read_lower_many(mine, storage, stats, epoch=epoch, codec=self._codec)
                if found:
                    stats.hits += len(found)
                    stats.cached_latency.add(time.perf_counter() - started)
                for i, value in found.items():
                    values[mine[i]] = value
            todo = [key for key in mine if key not in values]
            if todo:
                await self._compute_items(cache, call, first, todo, values, epoch, since)
            for key in mine:
                results[key] = values[key]
            flight.done = True
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        finally:
            for key in mine:
                if inflight.get(key) is flight:
                    del inflight[key]
            flight.finish()
        retry: list[Hashable] = []
        for key, other in theirs.items():
            if not other.done:
                await other.wait()
            value = other.value.get(key, MISSING) if isinstance(other.value, dict) else MISSING
            if other.done and other.error is None and value is not MISSING:
                values[key] = value
                stats.hits += 1
                stats.hits_by_tier["in-flight"] = stats.hits_by_tier.get("in-flight", 0) + 1
            else:
                retry.append(key)
        if retry:
            # The concurrent call that was computing these failed or was cancelled: compute them here.
            await self._compute_items(cache, call, first, retry, values, cache.epoch, cache.failures)

    async def _compute_items(self, cache: TieredCache, call: _BatchCall, first: dict[Hashable, Any],
                             todo: list[Hashable], values: dict[Hashable, Any], epoch: int, since: int) -> None:
        stats = self.stats
        stats.misses += len(todo)
        f_args, f_kwargs = call.with_items([first[key] for key in todo], self._batch_name)
        started = time.perf_counter()
        result = await self._fn(*f_args, **f_kwargs)
        stats.computed_latency.add(time.perf_counter() - started)
        rows = batch_rows(result, len(todo), self.identity)  # a BatchError before anything is stored
        ttl = self._expiry_default
        expires_at = cache.clock() + ttl if ttl is not None else None
        entries: list[tuple[Hashable, str, Any, float | None, tuple[str, ...]]] = []
        for key, row in zip(todo, rows, strict=True):
            values[key] = row
            row_expires_at = expires_at if not self.per_result else self.expiry_of(cache, row)
            if row_expires_at is False:  # cache_if= refused it, or ttl= gave zero
                continue
            item_args, item_kwargs = call.with_items(first[key], self._batch_name)
            try:
                tags = self._tags(item_args, item_kwargs)
            except Exception as exc:
                stats.errors += 1
                cache.log.failure(f"tags= of {self.identity}", exc)
                if cache.strict:
                    raise
                continue
            digest = self._digests.get(key)
            storage_key = self._prefix + (digest if digest is not None else self._keys.storage_digest(key))
            if not cache.invalidated_since(epoch, storage_key, tags):
                entries.append((key, storage_key, row, row_expires_at, tags))
        try:
            await cache.write_many(entries, stats, since=since, codec=self._codec)
        except (SerializationError, BackendError):
            if cache.strict:
                raise

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Remove the entries of the items of this call (same arguments as the function) from every tier."""
        cache = self.cache
        call = self._split(args, kwargs)
        keys = list(dict.fromkeys(self._keys.local(*call.with_items(item, self._batch_name))
                                  for item in call.items))
        await cache.remove(keys, [self._prefix + self._keys.storage_digest(key) for key in keys])
