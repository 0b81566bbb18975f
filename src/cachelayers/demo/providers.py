"""The demo's simulated providers, and how a stage call learns what reached them.

A `SimulatedProvider` sleeps like a remote API and charges like one. The stage call running in a task has a
`CallRecord` in `current_call`; a provider reached through the caches marks it `COMPUTED`.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Final

import anyio

__all__ = ["CACHED", "COMPUTED", "EXACT", "SEMANTIC", "SHARED", "CallRecord", "SimulatedProvider", "computing",
           "current_call"]

# Outcomes of one call of a stage. A stage that answers some other way (a semantic layer) adds its own.
COMPUTED: Final = "computed"  # this call ran the provider
CACHED: Final = "cached"  # answered from a cache tier
SHARED: Final = "shared"  # joined an identical call already in flight (single-flight)
SEMANTIC: Final = "semantic"  # answered by the semantic layer from a similar earlier question
EXACT: Final = "exact"  # answered by the semantic layer from an entry of this very text (outer cache missed)


class CallRecord:
    """What happened in one stage call; the provider marks it when the call reached it.

    ``sequence`` reads the number of stage calls started so far; the provider notes it when it finishes.
    """

    __slots__ = ("finished_at", "outcome", "sequence")

    def __init__(self, sequence: Callable[[], int]) -> None:
        self.sequence = sequence
        self.outcome: str | None = None
        self.finished_at = 0


# The record of the stage call running in this task. A provider reached through the cache marks it; a
# context variable holding a mutable record keeps working if an engine runs the computation in a child task.
current_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("cachelayers_demo_call",
                                                                                   default=None)


class SimulatedProvider:
    """A remote API stand-in: each call sleeps for its latency, is charged its cost, and is counted.

    Args:
        name: Shown in the report.
        latency_scale: Factor on every latency.
    """

    def __init__(self, name: str, *, latency_scale: float = 1.0) -> None:
        self.name = name
        self.latency_scale = latency_scale
        self.calls = 0
        self.items = 0
        self.cost = 0.0
        self.busy_seconds = 0.0

    async def call(self, *, latency: float, cost: float, items: int = 1, mark: bool = True) -> float:
        """Serve one call: mark the caller's record, sleep ``latency`` seconds (scaled), charge ``cost``.

        Args:
            latency: Simulated seconds the call takes before scaling.
            cost: Dollars the call costs.
            items: Items the call serves (a batch request serves several).
            mark: Mark the record of the stage call running in this context; a batch request runs in a
                context of its own, so its per-item callers mark theirs with `computing` instead.

        Returns:
            The seconds the call took.
        """
        record = current_call.get() if mark else None
        if record is not None:
            record.outcome = COMPUTED
        self.calls += 1
        self.items += items
        self.cost += cost
        started = time.perf_counter()
        try:
            await anyio.sleep(latency * self.latency_scale)
        finally:
            elapsed = time.perf_counter() - started
            self.busy_seconds += elapsed
            if record is not None:
                record.finished_at = record.sequence()
        return elapsed


class computing:
    """Marks the stage call running in this context as computed, and when its computation finished."""

    record: CallRecord | None = None

    def __enter__(self) -> None:
        self.record = current_call.get()
        if self.record is not None:
            self.record.outcome = COMPUTED

    def __exit__(self, *exc: object) -> None:
        if self.record is not None:
            self.record.finished_at = self.record.sequence()

