"""The FIFO queue: the windows of one limits-and-key combination, and the callers waiting in line for them.

Only the queue's head talks to the storage; the others wait on an event until the turn passes to them.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Final

import anyio

from cachelayers.engines.limiter.limits import Strategy

__all__ = ["SWEEP_AT", "Queue", "Waiter", "Window", "apply_pause"]

SWEEP_AT: Final = 10_000
"""Queues per limited function (and `RateLimiter.acquire` calls remembered) before idle ones are dropped."""


class Window:
    """One window of one limit for one key: what limits' strategies see as the rate-limit item.

    limits asks an item for ``key_for()``, ``amount`` and ``get_expiry()`` only; this one returns a key
    computed once, and an ``amount`` that adaptive mode can lower without changing the key.
    """

    __slots__ = ("amount", "changed_at", "debt", "decreased_at", "expiry", "fraction", "key", "label", "nominal",
                 "paused_until", "queues")

    def __init__(self, key: str, amount: int, expiry: int, label: str) -> None:
        self.key = key
        self.amount = amount
        self.nominal = amount
        self.expiry = expiry
        self.label = label
        self.fraction = 1.0
        self.changed_at = 0.0
        self.decreased_at = 0.0
        self.debt = 0  # units used beyond the estimate that did not fit yet; charged with the next call
        self.paused_until = 0.0
        self.queues: list[Queue] = []

    def key_for(self, *identifiers: object) -> str:
        """The storage key (limits' item protocol)."""
        return self.key

    def get_expiry(self) -> int:
        """The window's length in seconds (limits' item protocol)."""
        return self.expiry

    def widened(self, amount: int) -> Window:
        """A copy allowing ``amount``: a call costing more than the lowered effective amount still fits."""
        other = Window(self.key, amount, self.expiry, self.label)
        other.nominal = self.nominal
        return other


class Queue:
    """The callers waiting under one combination of windows (limits and key) in this process."""

    __slots__ = ("blocked_until", "held", "key", "label", "member", "next_sync", "order", "paused_until",
                 "reported", "single", "strategy", "waiters", "windows")

    def __init__(self, windows: tuple[Window, ...], strategy: Strategy, key: str, label: str,
                 next_sync: float) -> None:
        self.windows = windows
        self.single = windows[0] if len(windows) == 1 else None  # the only window (the usual case)
        self.strategy = strategy
        self.key = key
        self.label = label
        self.order = list(range(len(windows)))  # the window that refused last comes first
        self.waiters: deque[Waiter] = deque()
        self.held = False  # someone is talking to the storage for this queue (the head, or a fast path)
        self.blocked_until = 0.0  # the head's cost cannot fit before this (from the window stats)
        self.paused_until = max((w.paused_until for w in windows), default=0.0)
        self.next_sync = next_sync  # when to read the shared pause flags again
        self.member = ""  # its name in the fair lines of its windows in Redis (set on first use)
        self.reported = 0  # the calls waiting here that the fair line was last told of (0: no fair line)

    def pass_turn(self) -> None:
        """Give the turn to the first waiter, if nobody holds it."""
        if self.waiters and not self.held:
            nxt = self.waiters[0]
            nxt.turn = True
            self.held = True
            nxt.event.set()

    def leave(self, waiter: Waiter, granted: bool) -> None:
        """Remove ``waiter`` (admitted or not); if it held the turn, pass it on."""
        waiters = self.waiters
        if waiters and waiters[0] is waiter:
            waiters.popleft()
        else:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
        if waiter.turn:
            waiter.turn = False
            self.held = False
            if not granted:
                self.blocked_until = 0.0  # it was computed for this waiter's cost; the next may need less
            self.pass_turn()

    def kick(self) -> None:
        """Wake the head early (units were returned): its reset time may be out of date."""
        self.blocked_until = 0.0
        if self.waiters and self.waiters[0].turn:
            self.waiters[0].event.set()

    def expire_hopeless(self, gate: float, now: float) -> None:
        """Fail the waiters whose deadline comes before the head can even be admitted (FIFO: they can't be)."""
        for waiter in self.waiters:
            if not waiter.turn and not waiter.expired and waiter.deadline < gate:
                waiter.expired = True
                waiter.retry_after = gate - now
                waiter.event.set()


class Waiter:
    """One caller waiting in a `Queue`: its costs, its deadline and the event that wakes it."""

    __slots__ = ("costs", "deadline", "event", "expired", "retry_after", "turn")

    def __init__(self, costs: tuple[int, ...], deadline: float) -> None:
        self.costs = costs
        self.deadline = deadline
        self.event = anyio.Event()
        self.turn = False
        self.expired = False
        self.retry_after: float | None = None


def apply_pause(windows: Sequence[Window], until: float) -> None:
    """Pause ``windows``, and every queue using them, until ``until`` (wall clock)."""
    for window in windows:
        window.paused_until = max(window.paused_until, until)
        for queue in window.queues:
            queue.paused_until = max(queue.paused_until, until)
