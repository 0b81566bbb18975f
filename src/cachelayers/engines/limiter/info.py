"""The engine's counters: what `RateLimiter.info` reports and `cachelayers.stats()` collects."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["LimiterInfo", "Stats"]


class LimiterInfo(NamedTuple):
    """Counters of a `RateLimiter`.

    Attributes:
        admitted: Acquisitions granted.
        immediate: Of those, granted without waiting.
        waited: Acquisitions that had to queue or sleep.
        timeouts: Acquisitions that gave up (``timeout=``), including those known hopeless early.
        cancelled: Waiters cancelled while waiting (they took nothing).
        storage_calls: Calls to the storage: hits, window stats, refunds, pause reads and writes.
        calls_per_admission: ``storage_calls / admitted``.
        pause_reads: Of the storage calls, reads of the pause flags other processes may have set (at most one
            per ``pause_check`` seconds per busy key: a constant load, whatever the rate).
        window_calls_per_admission: ``(storage_calls - pause_reads) / admitted``: the window's own work.
        refusals: Hits the storage refused.
        refunds: Units returned to windows (rollbacks, cancellations, corrections).
        rate_limit_errors: Rate-limit errors raised by limited calls.
        retries: Calls retried after a rate-limit error.
        pauses: Pauses set (locally noticed or received from other processes).
    """

    admitted: int
    immediate: int
    waited: int
    timeouts: int
    cancelled: int
    storage_calls: int
    calls_per_admission: float
    pause_reads: int
    window_calls_per_admission: float
    refusals: int
    refunds: int
    rate_limit_errors: int
    retries: int
    pauses: int


class Stats:
    """The mutable counters behind `LimiterInfo`."""

    __slots__ = ("admitted", "cancelled", "immediate", "pause_reads", "pauses", "rate_limit_errors", "refunds",
                 "refusals", "retries", "storage_calls", "timeouts", "waited")

    def __init__(self) -> None:
        self.admitted = self.immediate = self.waited = self.timeouts = self.cancelled = 0
        self.storage_calls = self.pause_reads = self.refusals = self.refunds = 0
        self.rate_limit_errors = self.retries = self.pauses = 0

    def info(self) -> LimiterInfo:
        """A snapshot of the counters."""
        return LimiterInfo(
            admitted=self.admitted, immediate=self.immediate, waited=self.waited, timeouts=self.timeouts,
            cancelled=self.cancelled, storage_calls=self.storage_calls,
            calls_per_admission=self.storage_calls / self.admitted if self.admitted else 0.0,
            pause_reads=self.pause_reads,
            window_calls_per_admission=(self.storage_calls - self.pause_reads) / self.admitted if self.admitted
            else 0.0,
            refusals=self.refusals, refunds=self.refunds, rate_limit_errors=self.rate_limit_errors,
            retries=self.retries, pauses=self.pauses)

