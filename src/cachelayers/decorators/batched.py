"""`@batched`: micro-batching, as a decorator."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, Self, TypeVar, Unpack, final, overload

from cachelayers.engines.batcher import Batcher, BatchInfo, BatchOptions, Rows
from cachelayers.engines.sync import is_async, run, to_async
from cachelayers.validation import check_options

__all__ = ["BatchDecorator", "BatchedFunction", "SyncBatchedFunction", "batched"]

P = ParamSpec("P")
X = TypeVar("X")
Y = TypeVar("Y")


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


@final
class SyncBatchedFunction(Generic[X, P, Y]):
    """What `batched` returns for a plain ``def`` batch function: ``f(item, *shared)`` blocks its thread until
    the item's batch is answered; calls from many threads are gathered into the same batches.

    The batches are formed on the library's loop and the batch function runs in a worker thread (one per batch
    in flight). The batch function itself is ``__wrapped__``.
    """

    __wrapped__: Callable[..., Any]
    __name__: str
    __qualname__: str

    def __init__(self, fn: Callable[..., Any], batcher: Batcher[X, P, Y]) -> None:
        self.batcher = batcher
        """The engine behind the function."""
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, item: X, /, *args: P.args, **kwargs: P.kwargs) -> Y:
        """Submit one item and wait for its result (see `Batcher.submit`)."""
        return run(lambda: self.batcher.submit(item, *args, **kwargs))

    def many(self, items: Iterable[X], /, *args: P.args, **kwargs: P.kwargs) -> list[Y]:
        """Submit several items sharing the same arguments and wait for their results, in order."""
        return run(lambda: self.batcher.submit_many(items, *args, **kwargs))

    def flush(self) -> None:
        """Send every pending batch now, without waiting for ``max_wait``."""
        run(self._flush)

    async def _flush(self) -> None:
        self.batcher.flush()

    def close(self, *, flush: bool = True) -> None:
        """Close: send (or, with ``flush=False``, reject) what is pending; later calls raise."""
        run(lambda: self.batcher.aclose(flush=flush))

    def batch_info(self) -> BatchInfo:
        """Batches, items, deduplicated and dropped items, fill ratio, waits and durations."""
        return self.batcher.info()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<batched {self.batcher.name}>"


class BatchDecorator(Protocol):
    """What ``batched(**options)`` returns: decorates an ``async def`` or a plain ``def`` batch function."""

    @overload
    def __call__(self, fn: Callable[Concatenate[list[X], P], Coroutine[Any, Any, Rows[Y]]], /
                 ) -> BatchedFunction[X, P, Y]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[list[X], P], Rows[Y]], /) -> SyncBatchedFunction[X, P, Y]: ...


@overload
def batched(fn: Callable[Concatenate[list[X], P], Coroutine[Any, Any, Rows[Y]]], /
            ) -> BatchedFunction[X, P, Y]: ...


@overload
def batched(fn: Callable[Concatenate[list[X], P], Rows[Y]], /) -> SyncBatchedFunction[X, P, Y]: ...


@overload
def batched(**options: Unpack[BatchOptions]) -> BatchDecorator: ...


def batched(fn: Callable[..., Any] | None = None, /, **options: Unpack[BatchOptions]) -> Any:
    """Turn a batch function into a per-item function whose calls are gathered into batches.

    Decorate ``async def fn(items: list[X], *shared) -> list[Y]`` (or an array with one row per item); callers
    then await ``fn(item, *shared)`` and get their own result. A batch goes when it has ``max_size`` items (or
    ``max_weight``), or ``max_wait`` after its first item; calls with different shared arguments never share a
    batch; identical pending items are sent once. Usable bare (``@batched``) or with arguments, from asyncio or
    trio, across repeated ``asyncio.run`` calls: nothing is bound to an event loop until the first call in it.
    A plain ``def`` batch function gives a `SyncBatchedFunction`: callers in many threads share batches, and
    the batch function runs in a worker thread (see the guide "Sync functions").
    The function must return a list, a tuple or an array with exactly one result per item, in order; anything
    else (a dict, a set, a string, a generator, a wrong length) fails every caller of the batch with
    `BatchError`, and no caller gets any of it.

    Args:
        fn: The batch function, when used bare.

    Keyword Args:
        max_size (int): Most items in one batch (default 64); a batch that reaches it goes at once.
        max_wait (float | str | timedelta): Longest a batch waits for more items after its first: seconds,
            ``"5ms"``, a timedelta (default 5 ms). Zero sends what arrived in the same scheduling round.
        max_weight (float | None): Most total weight in one batch (e.g. tokens); needs ``weight``. An item
            heavier than this goes in a batch of its own.
        weight (Callable[[X], float] | None): Weight of one item, e.g. ``lambda text: len(text) // 4``.
        max_concurrency (int | None): Most batches in flight at once (per event loop); ``None`` (the default)
            for no bound. A batch that is due while all slots are taken keeps accepting items until a slot
            frees.
        max_queue (int | None): Most items waiting to be sent (per event loop); ``None`` (the default) for no
            bound.
        queue_full (QueueFullPolicy): When the queue is full, ``"wait"`` for room (the default) or ``"raise"``
            `BatchQueueFullError`.
        key (Callable[[X], Hashable] | None): Function of an item giving the key under which identical pending
            (or in-flight) items are sent once; ``None`` for an item that must not be merged. By default the
            item itself when it is hashable (with its type, so ``1`` and ``1.0`` differ).
        dedupe (bool): ``False`` sends every item, even identical ones.
        name (str | None): Name used in errors and statistics instead of the function's ``module.qualname``.

    Returns:
        A `BatchedFunction`: ``await f(item, *shared)`` for one result, ``await f.many(items, *shared)`` for
        several, ``f.flush()``, ``await f.aclose()`` (or ``async with f:``), ``f.batch_info()``.

    Raises:
        ConfigError: A parameter is out of range or malformed (the error names it).
        TypeError: ``fn`` is not callable, or an option is not one of these.
    """
    check_options(options, BatchOptions, "batched")

    def decorate(f: Callable[..., Any]) -> BatchedFunction[Any, ..., Any] | SyncBatchedFunction[Any, ..., Any]:
        if not callable(f):
            raise TypeError(f"batched needs a function, got {f!r}")
        if is_async(f):
            return BatchedFunction(Batcher(f, **options))
        return SyncBatchedFunction(f, Batcher(to_async(f, in_caller=False), **options))

    return decorate if fn is None else decorate(fn)
