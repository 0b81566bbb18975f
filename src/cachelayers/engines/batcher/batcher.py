"""The micro-batching engine: single-item calls gathered into few calls of a batch function.

A `Batcher` wraps ``async def fn(items: list[X], *shared) -> list[Y]`` (or an array with one row per item).
Callers submit one item each and await their own result; the batcher sends a batch when it is full (``max_size``
items or ``max_weight``, e.g. a token budget) or ``max_wait`` after its first item, with at most
``max_concurrency`` batches in flight.

Rules kept here, each tested:

* **no polling**: a batch has one task, spawned with its first item, which waits on one timer (its deadline) or
  on the batch filling up, sends it, and ends. With nothing pending there is no task and no timer: an idle
  batcher never wakes the event loop;
* **isolation**: an exception returned for one item reaches only that item's callers; a failed batch, or a
  result of the wrong shape or length (`cachelayers.engines.batchrows`: a mapping, a set, a string, an iterator,
  ...), fails each of its callers with a `BatchError` (the cause kept) and gives no caller any of it;
* **cancellation**: a cancelled caller only stops waiting. Its item leaves the batch when every caller of it
  was cancelled before the batch was sent; nothing else is cancelled, nothing waits forever, and no future is
  left with an unretrieved exception (results travel in plain slots, signalled by one event per batch);
* **no loop binding**: nothing is created at construction. The state of each event loop (pending batches,
  in-flight count, queue) is made on first use in that loop and forgotten with it, so one batcher serves
  repeated ``asyncio.run`` calls, several threads' loops, and trio.

The batch's task is spawned natively (see `adapters`); everything it does inside uses anyio.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from asyncio import get_running_loop as _get_running_loop
from collections.abc import Awaitable, Callable, Hashable, Iterable
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, Unpack

import anyio

from cachelayers.durations import parse_duration
from cachelayers.engines.batcher.adapters import loop_adapters, trio_token
from cachelayers.engines.batcher.options import BatchOptions, QueueFullPolicy, default_key
from cachelayers.engines.batcher.records import (
    CLOSED,
    DONE,
    NO_VALUE,
    OPEN,
    SENT,
    Batch,
    BatchInfo,
    Entry,
    LoopState,
    Rows,
)
from cachelayers.engines.batchrows import batch_rows
from cachelayers.errors import BatcherClosedError, BatchError, BatchQueueFullError, ConfigError
from cachelayers.keys import canonical_bytes, function_identity
from cachelayers.metrics import LatencyRing, register_stats_source, stable_list
from cachelayers.validation import check_options, optional_positive_int, positive_int

__all__ = ["Batcher"]

X = TypeVar("X")
Y = TypeVar("Y")
P = ParamSpec("P")


class Batcher(Generic[X, P, Y]):
    """Gathers single items into batches for one call of ``fn`` per batch.

    ``fn`` takes a list of items, plus optional arguments shared by the whole batch, and returns one result
    per item in the same order: a list, or an array with one row per item. Calls with different shared
    arguments go in different batches. Nothing is bound to an event loop until the first call in it.

    Args:
        fn: The batch function, ``async def fn(items: list[X], *shared) -> list[Y]``.
        **options: The options of `cachelayers.batched` (`BatchOptions`), documented there.

    Raises:
        ConfigError: A parameter is out of range or malformed (the error names it).
        TypeError: ``fn`` is not an async function.
    """

    def __init__(self, fn: Callable[Concatenate[list[X], P], Awaitable[Rows[Y]]],
                 **options: Unpack[BatchOptions]) -> None:
        check_options(options, BatchOptions, "Batcher")
        max_size = options.get("max_size", 64)
        max_wait = options.get("max_wait", 0.005)
        max_weight = options.get("max_weight")
        weight = options.get("weight")
        max_concurrency = options.get("max_concurrency")
        max_queue = options.get("max_queue")
        queue_full = options.get("queue_full", "wait")
        key = options.get("key")
        dedupe = options.get("dedupe", True)
        name = options.get("name")
        if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inspect.unwrap(fn))
                or (callable(fn) and inspect.iscoroutinefunction(type(fn).__call__))):
            raise TypeError(f"batched needs an async function, got {fn!r}")
        self.fn = fn
        self.name = name if name is not None else function_identity(fn)
        self.max_size = positive_int(max_size, "max_size")
        self.max_wait = parse_duration(max_wait, "max_wait", allow_zero=True)
        if max_weight is not None:
            if isinstance(max_weight, bool) or not isinstance(max_weight, int | float) or not max_weight > 0 \
                    or max_weight == float("inf"):
                raise ConfigError("max_weight", max_weight, "must be a positive finite number or None")
            if weight is None:
                raise ConfigError("weight", weight, "max_weight needs a weight= function giving each item's weight")
        elif weight is not None:
            raise ConfigError("weight", weight, "weight= only matters with max_weight; set max_weight too")
        if weight is not None and not callable(weight):
            raise ConfigError("weight", weight, "must be a function of one item")
        self.max_weight = float(max_weight) if max_weight is not None else None
        self._weight = weight
        self.max_concurrency = optional_positive_int(max_concurrency, "max_concurrency")
        self._slots = self.max_concurrency if self.max_concurrency is not None else sys.maxsize
        self.max_queue = optional_positive_int(max_queue, "max_queue")
        if queue_full not in ("wait", "raise"):
            raise ConfigError("queue_full", queue_full, "must be 'wait' or 'raise'")
        self.queue_full: QueueFullPolicy = queue_full
        if key is not None and not callable(key):
            raise ConfigError("key", key, "must be a function of one item returning a hashable key")
        if not isinstance(dedupe, bool):
            raise ConfigError("dedupe", dedupe, "must be True or False")
        self._key: Callable[[Any], Hashable | None] | None = (key if key is not None
                                                               else default_key if dedupe else None)
        self._closed = False
        self._loops: weakref.WeakKeyDictionary[object, LoopState] = weakref.WeakKeyDictionary()
        self._last: LoopState | None = None
        # counters
        self._calls = 0
        self._deduplicated = 0
        self._dropped = 0
        self._rejected = 0
        self._batches = 0
        self._items = 0
        self._failed = 0
        self._waits = LatencyRing()
        self._durations = LatencyRing()
        register_stats_source(self)

    # -- per-loop state ------------------------------------------------------------------------------------

    def _loop(self) -> LoopState:
        library = "asyncio"
        try:
            native: object = _get_running_loop()
        except RuntimeError:
            native, library = trio_token(), "trio"
        state = self._last
        if state is not None and state.native() is native:
            return state
        state = self._loops.get(native)
        if state is None:
            state = self._loops[native] = LoopState(native, *loop_adapters(library))
        self._last = state
        return state

    # -- submitting ----------------------------------------------------------------------------------------

    async def submit(self, item: X, /, *args: P.args, **kwargs: P.kwargs) -> Y:
        """Add one item to a batch and return its result once the batch is done.

        Args:
            item: The item.
            *args: Arguments shared by the batch, passed to the function after the list of items.
            **kwargs: Keyword arguments shared by the batch. Calls whose shared arguments differ never share
                a batch.

        Returns:
            The item's result: its element of the list (or row of the array) the function returned.

        Raises:
            BatchError: The batch failed (the function's exception is ``__cause__``), returned something other
                than a list, a tuple or an array of one result per item (see `cachelayers.engines.batchrows`), or
                was cancelled.
            BatcherClosedError: The batcher is closed, or closed without flushing while the item was pending.
            BatchQueueFullError: The queue is full and ``queue_full="raise"``.
            Exception: Whatever exception object the function returned in this item's place, or what ``key=``
                or ``weight=`` raised for this item.
        """
        loop = self._loop()
        group = self._group(args, kwargs) if args or kwargs else None
        entry = self._enqueue(loop, item, group, args, kwargs)
        if entry is None:
            entry = await self._enqueue_when_room(loop, item, group, args, kwargs)
        try:
            await entry.batch.done.wait()
        except BaseException:
            self._abandon(loop, entry)
            raise
        if entry.error is None:
            return entry.value  # type: ignore[no-any-return]
        return entry.outcome()  # type: ignore[no-any-return]

    async def submit_many(self, items: Iterable[X], /, *args: P.args, **kwargs: P.kwargs) -> list[Y]:
        """Add several items (sharing the same arguments) and return their results in order.

        Cheaper than one `submit` per item: one wait per batch rather than per item. When an item fails, its
        error is raised and the items not yet sent whose only caller was this one are dropped.

        Returns:
            One result per item, in order.

        Raises:
            BatchError: As `submit`, for the first failing item in order.
            BatcherClosedError: As `submit`.
            BatchQueueFullError: As `submit`.
        """
        loop = self._loop()
        group = self._group(args, kwargs)
        entries: list[Entry] = []
        claimed = 0  # entries[:claimed] no longer count this call as a caller
        try:
            for item in items:
                entry = self._enqueue(loop, item, group, args, kwargs)
                if entry is None:
                    entry = await self._enqueue_when_room(loop, item, group, args, kwargs)
                entries.append(entry)
            results: list[Y] = []
            for entry in entries:
                done = entry.batch.done
                if not done.is_set():
                    await done.wait()
                claimed += 1
                results.append(entry.outcome())
            return results
        except BaseException:
            for entry in entries[claimed:]:
                self._abandon(loop, entry)
            raise

    def _group(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """The key that keeps calls with different shared arguments in different batches."""
        if not args and not kwargs:
            return None
        group = (args, tuple(sorted(kwargs.items()))) if kwargs else (args, ())
        try:
            hash(group)
        except TypeError:
            try:
                return canonical_bytes(group)
            except TypeError as exc:
                raise TypeError(f"the shared arguments of {self.name}() must be hashable or have a canonical "
                                f"encoding, since they decide which calls share a batch: {exc}") from None
        return group

    def _enqueue(self, loop: LoopState, item: Any, group: Hashable, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Entry | None:
        """Put ``item`` in a batch (or join an identical one); ``None`` when the queue is full."""
        if self._closed:
            self._rejected += 1
            raise BatcherClosedError(f"{self.name}(): the batcher is closed")
        self._calls += 1
        dkey: Hashable | None = None
        key_fn = self._key
        if key_fn is not None:
            dkey = key_fn(item)
            if dkey is not None:
                if group is not None:
                    dkey = (group, dkey)
                entry = loop.index.get(dkey)
                if entry is not None:
                    entry.callers += 1
                    self._deduplicated += 1
                    return entry
        if self.max_queue is not None and loop.queued >= self.max_queue:
            self._calls -= 1  # counted again when it gets in
            return None
        weight = 1.0
        if self._weight is not None:
            weight = self._weight(item)
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise ValueError(f"weight= of {self.name}() returned {weight!r} for an item; expected a "
                                 f"non-negative number")
        batch = loop.open.get(group)
        max_weight = self.max_weight
        if batch is not None and max_weight is not None and batch.weight + weight > max_weight and batch.size:
            self._close(loop, batch)
            batch = None
        if batch is None:
            batch = self._open(loop, group, args, kwargs)
        entry = Entry(item, dkey, weight, batch)
        batch.entries.append(entry)
        batch.size += 1
        batch.weight += weight
        loop.queued += 1
        if dkey is not None:
            loop.index[dkey] = entry
        if batch.size >= self.max_size or (max_weight is not None and batch.weight >= max_weight):
            self._close(loop, batch)
        return entry

    async def _enqueue_when_room(self, loop: LoopState, item: Any, group: Hashable, args: tuple[Any, ...],
                                 kwargs: dict[str, Any]) -> Entry:
        """The queue is full: wait for room or raise, as the policy says."""
        if self.queue_full == "raise":
            self._rejected += 1
            raise BatchQueueFullError(f"{self.name}(): {self.max_queue} items are already waiting to be sent "
                                      f"(max_queue={self.max_queue}, queue_full='raise')")
        while True:
            space = loop.space
            if space is None:
                space = loop.space = loop.event()
            await space.wait()
            entry = self._enqueue(loop, item, group, args, kwargs)
            if entry is not None:
                return entry

    def _open(self, loop: LoopState, group: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Batch:
        batch = Batch(group, args, kwargs, loop.clock() + self.max_wait, loop.event)

        async def run() -> None:
            await self._run(loop, batch)

        loop.spawn(run)  # first: a loop shutting down refuses new tasks, and no batch may exist without one
        loop.open[group] = batch
        loop.batches.add(batch)
        return batch

    def _close(self, loop: LoopState, batch: Batch) -> None:
        """Stop ``batch`` accepting items and let it go without waiting for its timer."""
        if loop.open.get(batch.group) is batch:
            del loop.open[batch.group]
        if batch.stage == OPEN:
            batch.stage = CLOSED
        self._due(loop, batch)
        batch.wake.set()

    def _due(self, loop: LoopState, batch: Batch) -> None:
        """``batch`` may go: give it a free slot, or queue it for one.

        Called the moment it is due (full, flushed, or its timer fired), not when its task next runs, so slots go
        to batches in the order they became due whatever order the scheduler runs tasks in.
        """
        if batch.due or not batch.size or batch.stage >= SENT:
            return
        batch.due = True
        if loop.in_flight < self._slots and not loop.waiting:
            loop.in_flight += 1
            batch.has_slot = True
        else:
            batch.go = loop.event()
            loop.waiting.append(batch)

    def _space_freed(self, loop: LoopState) -> None:
        space = loop.space
        if space is not None:
            loop.space = None
            space.set()

    def _abandon(self, loop: LoopState, entry: Entry) -> None:
        """A caller of ``entry`` stopped waiting; drop the item if it was the last and the batch is unsent."""
        entry.callers -= 1
        batch = entry.batch
        if entry.callers or batch.stage >= SENT:
            return
        batch.size -= 1
        batch.weight -= entry.weight
        loop.queued -= 1
        self._dropped += 1
        if entry.dkey is not None and loop.index.get(entry.dkey) is entry:
            del loop.index[entry.dkey]
        self._space_freed(loop)
        if batch.size == 0:
            self._close(loop, batch)
            if batch.go is not None:
                if batch in loop.waiting:  # else it was handed a slot already: its task passes the slot on
                    loop.waiting.remove(batch)
                batch.go.set()

    # -- sending -------------------------------------------------------------------------------------------

    async def _run(self, loop: LoopState, batch: Batch) -> None:
        """The task of one batch: wait for its timer or for it to fill, wait for a slot, send it, end."""
        try:
            if not batch.due:
                with anyio.CancelScope(deadline=batch.deadline):  # the batch's one timer
                    await batch.wake.wait()
                self._due(loop, batch)
            if batch.size == 0 or batch.stage == DONE:
                return
            if not batch.has_slot:
                assert batch.go is not None
                await batch.go.wait()
                if batch.size == 0 or batch.stage == DONE:
                    return
            await self._send(loop, batch)
        finally:
            if batch.stage < DONE:
                if batch.size == 0:  # every caller was cancelled before it was sent: nobody to answer
                    self._finish(loop, batch, None)
                else:  # cancelled before or while sending (the event loop is shutting down): nobody may wait on
                    self._finish(loop, batch, BatchError(self.name, batch.size, "was cancelled before it completed"))
            if batch.has_slot:
                batch.has_slot = False
                self._release(loop)
            loop.batches.discard(batch)
            if not loop.batches and loop.idle is not None:
                loop.idle.set()

    async def _send(self, loop: LoopState, batch: Batch) -> None:
        if loop.open.get(batch.group) is batch:
            del loop.open[batch.group]
        batch.stage = SENT
        live = [e for e in batch.entries if e.callers]
        batch.entries = live
        loop.queued -= len(live)
        self._space_freed(loop)
        self._batches += 1
        self._items += len(live)
        started = loop.clock()
        self._waits.add(max(0.0, started - (batch.deadline - self.max_wait)))
        try:
            results = await self.fn([e.item for e in live], *batch.args, **batch.kwargs)
        except Exception as exc:
            error = BatchError(self.name, len(live), f"failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._finish(loop, batch, error)
            return
        finally:
            self._durations.add(loop.clock() - started)
        try:
            rows = batch_rows(results, len(live), self.name)
        except BatchError as error:
            self._finish(loop, batch, error)
            return
        for entry, value in zip(live, rows, strict=True):
            if isinstance(value, Exception):
                entry.error = value
                entry.traceback = value.__traceback__
            else:
                entry.value = value
        self._finish(loop, batch, None)

    def _finish(self, loop: LoopState, batch: Batch, error: BatchError | BatcherClosedError | None) -> None:
        """Give every live entry of ``batch`` its outcome (``error`` when not None) and wake its callers."""
        if error is not None and isinstance(error, BatchError):
            self._failed += 1
        for entry in batch.entries:
            if error is not None and entry.value is NO_VALUE and entry.error is None:
                entry.error = error
                entry.traceback = None
            if entry.dkey is not None and loop.index.get(entry.dkey) is entry:
                del loop.index[entry.dkey]
        if batch.stage < SENT:
            loop.queued -= batch.size
            batch.size = 0
            self._space_freed(loop)
            if loop.open.get(batch.group) is batch:
                del loop.open[batch.group]
        batch.stage = DONE
        batch.done.set()

    def _release(self, loop: LoopState) -> None:
        """Hand a finished batch's slot to the oldest due batch, or free it."""
        waiting = loop.waiting
        while waiting:
            batch = waiting.popleft()
            if batch.size and batch.go is not None and batch.stage < SENT:
                batch.has_slot = True
                batch.go.set()
                return
        loop.in_flight -= 1

    # -- control -------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send every batch pending in the current event loop now, without waiting for its timer."""
        loop = self._loop()
        for batch in list(loop.open.values()):
            self._close(loop, batch)

    async def aclose(self, *, flush: bool = True) -> None:
        """Close the batcher: new calls raise `BatcherClosedError`; return when no caller is left waiting.

        Acts on the current event loop's pending items (a batcher is normally used from one loop at a time).

        Args:
            flush: Send the pending items now (``True``) or fail their callers with `BatcherClosedError`
                (``False``). Batches already in flight complete either way.
        """
        self._closed = True
        try:
            native: object = _get_running_loop()
        except RuntimeError:
            native = trio_token()
        loop = self._loops.get(native)
        if loop is None:
            return
        self._space_freed(loop)  # callers waiting for room wake and find the batcher closed
        for batch in list(loop.batches):
            if batch.stage >= SENT:
                continue
            if flush:
                self._close(loop, batch)
            else:
                if batch in loop.waiting:
                    loop.waiting.remove(batch)
                self._finish(loop, batch, BatcherClosedError(
                    f"{self.name}(): the batcher was closed without flushing before the item was sent"))
                batch.wake.set()
                if batch.go is not None:
                    batch.go.set()
        while loop.batches:
            idle = loop.idle = loop.event()
            await idle.wait()
        loop.idle = None

    @property
    def closed(self) -> bool:
        """Whether `aclose` was called."""
        return self._closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- introspection -------------------------------------------------------------------------------------

    def info(self) -> BatchInfo:
        """Counters, sizes, fill ratio, waits and durations of this batcher."""
        loops = stable_list(self._loops.values)
        mean = self._items / self._batches if self._batches else 0.0
        return BatchInfo(
            calls=self._calls,
            deduplicated=self._deduplicated,
            dropped=self._dropped,
            rejected=self._rejected,
            batches=self._batches,
            items=self._items,
            failed_batches=self._failed,
            mean_size=mean,
            fill_ratio=mean / self.max_size,
            wait_p50=self._waits.percentile(50),
            wait_p99=self._waits.percentile(99),
            batch_p50=self._durations.percentile(50),
            batch_p99=self._durations.percentile(99),
            pending=sum(loop.queued for loop in loops),
            in_flight=sum(loop.in_flight for loop in loops),
        )

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"{self.name} (batched)": self.info()._asdict()}

    def __repr__(self) -> str:
        return (f"<Batcher of {self.name} max_size={self.max_size} max_wait={self.max_wait:g}s"
                f"{' closed' if self._closed else ''}>")
