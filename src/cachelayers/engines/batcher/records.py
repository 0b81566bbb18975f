"""The batcher's records: what a batch function returns, the counters, and the state of batches and loops."""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from cachelayers.engines.batcher.adapters import Event, Spawn

__all__ = ["CLOSED", "DONE", "NO_VALUE", "OPEN", "SENT", "Batch", "BatchInfo", "Entry", "LoopState", "Rows"]

Y_co = TypeVar("Y_co", covariant=True)

# Stages of a batch. A batch accepts items while OPEN; CLOSED means full (or flushed) but not sent yet.
OPEN: Final = 0
CLOSED: Final = 1
SENT: Final = 2
DONE: Final = 3

NO_VALUE: Final[Any] = object()


class Rows(Protocol[Y_co]):
    """What a batch function returns: a sequence with one result per item (a list, a tuple, or an array's rows).

    Checked when the batch returns (`cachelayers.engines.batchrows.batch_rows`): a mapping, a string, bytes or
    a wrong length also have ``len`` and ``[]``, but are a `BatchError` to every caller of the batch.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Y_co: ...


class BatchInfo(NamedTuple):
    """What `Batcher.info()` tells about one batcher.

    Attributes:
        calls: Items submitted by callers (a caller of ``many()`` counts once per item).
        deduplicated: Calls answered by an identical item already pending or in flight.
        dropped: Items taken out of their batch because every caller of them was cancelled before it was sent.
        rejected: Calls refused because the queue was full (policy ``"raise"``) or the batcher was closed.
        batches: Batches sent to the function.
        items: Items sent to the function.
        failed_batches: Batches that raised, returned a result of the wrong shape or length, or were cancelled.
        mean_size: ``items / batches``.
        fill_ratio: ``mean_size / max_size``.
        wait_p50: Median time from a batch's first item to the batch being sent, in seconds.
        wait_p99: 99th percentile of the same.
        batch_p50: Median duration of one call of the batch function, in seconds.
        batch_p99: 99th percentile of the same.
        pending: Items waiting to be sent now, over every event loop.
        in_flight: Batches running now, over every event loop.
    """

    calls: int
    deduplicated: int
    dropped: int
    rejected: int
    batches: int
    items: int
    failed_batches: int
    mean_size: float
    fill_ratio: float
    wait_p50: float | None
    wait_p99: float | None
    batch_p50: float | None
    batch_p99: float | None
    pending: int
    in_flight: int


class Entry:
    """One distinct item of a batch, the callers waiting for it, and its outcome once the batch is done."""

    __slots__ = ("batch", "callers", "dkey", "error", "item", "traceback", "value", "weight")

    def __init__(self, item: Any, dkey: Hashable | None, weight: float, batch: Batch) -> None:
        self.item = item
        self.dkey = dkey
        self.weight = weight
        self.batch = batch
        self.callers = 1
        self.value: Any = NO_VALUE
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None

    def outcome(self) -> Any:
        error = self.error
        if error is not None:
            # Several callers may raise the same object: reset its traceback each time, as a Future does, so
            # tracebacks do not pile up across tasks.
            raise error.with_traceback(self.traceback)
        return self.value


class Batch:
    """Items gathered for one call of the batch function, with the same shared arguments."""

    __slots__ = ("args", "deadline", "done", "due", "entries", "go", "group", "has_slot", "kwargs", "size",
                 "stage", "wake", "weight")

    def __init__(self, group: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float,
                 event: Callable[[], Event]) -> None:
        self.group = group
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline
        self.entries: list[Entry] = []
        self.size = 0  # live entries: those dropped by cancellation are not counted
        self.weight = 0.0
        self.stage = OPEN
        self.wake = event()  # full, flushed, emptied or closed: stop waiting for the timer
        self.done = event()  # every live entry has its outcome
        self.due = False  # full, flushed or timed out: holds a concurrency slot or waits in line for one
        self.go: Event | None = None  # set when a slot is handed over (or the batch was emptied or rejected)
        self.has_slot = False


class LoopState:
    """The batcher's state in one event loop."""

    __slots__ = ("__weakref__", "batches", "clock", "event", "idle", "in_flight", "index", "native", "open",
                 "queued", "space", "spawn", "waiting")

    def __init__(self, native: object, clock: Callable[[], float],
                 spawn: Spawn, event: Callable[[], Event]) -> None:
        self.native = weakref.ref(native)
        self.clock = clock
        self.spawn = spawn
        self.event = event
        self.open: dict[Hashable, Batch] = {}  # per group of shared arguments: the batch accepting items
        self.index: dict[Hashable, Entry] = {}  # dedupe key -> entry not answered yet (pending or in flight)
        self.batches: set[Batch] = set()  # every batch whose task has not ended
        self.waiting: deque[Batch] = deque()  # due batches waiting for a concurrency slot, oldest first
        self.queued = 0  # live items not sent yet
        self.in_flight = 0
        self.space: Event | None = None  # set when queued items leave the queue
        self.idle: Event | None = None  # set when the last batch ends
