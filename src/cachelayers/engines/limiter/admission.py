"""Admission: binding the limits storage, and admitting calls in FIFO order without holding units while waiting.

`Admission` is the storage-facing half of `RateLimiter`: the fast path (one storage call when nobody waits),
the slow path (queue, sleep until the window's reset, lead), the cancellation-safe attempt, returning units,
shared pauses and corrections. `RateLimiter` adds named limits, the registry of queues and the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import anyio.lowlevel
from limits.aio.storage import Storage

from cachelayers.backends.limits_fair import RedisFairLine
from cachelayers.backends.limits_storage import MemoryLimitStorage, RedisLimitExtras, create_limits_storage
from cachelayers.durations import LONGEST
from cachelayers.engines.limiter.adaptive import Adaptive, decrease, increase
from cachelayers.engines.limiter.info import Stats
from cachelayers.engines.limiter.limits import Strategy
from cachelayers.engines.limiter.queue import Queue, Waiter, Window, apply_pause
from cachelayers.errors import BackendError, CacheLayersError, ConfigError, RateLimitExceeded
from cachelayers.loops import running_asyncio_loop
from cachelayers.metrics import StateLog

__all__ = ["Admission"]

_MARGIN: Final = 0.001  # past a reset time, so the freed unit is strictly outside the (closed) window


class Admission:
    """The storage-facing half of `RateLimiter` (see there): storage binding and the acquisition algorithm.

    Args:
        storage: A storage URL (validated by the caller) or a limits async storage object.
        clock: Wall-clock time source.
        pause_check: Seconds between reads of the pause flags other processes set.
        fail_open: Let calls through when the storage fails.
        key_prefix: Prefix of the storage's keys in Redis.
    """

    def __init__(self, storage: str | Storage, *, clock: Callable[[], float], pause_check: float,
                 fail_open: bool, key_prefix: str) -> None:
        self._clock = clock
        self._pause_check = pause_check
        self.fail_open = fail_open
        self._key_prefix = key_prefix
        self.storage_url: str | None = storage if isinstance(storage, str) else None
        self._given: Storage | None = None if isinstance(storage, str) else storage
        self._storage: Storage | None = None
        self._memory: MemoryLimitStorage | None = None
        self._extras: RedisLimitExtras | None = None
        self._fair: RedisFairLine | None = None  # fair grants across processes (Redis, not a cluster)
        self._member = uuid.uuid4().hex[:12]  # this engine's name in the lines of waiting processes
        self._loop: object = None
        self._per_loop = False  # a Redis client is bound to the event loop it first ran on
        self._suspends = True  # its calls may suspend (and so be interrupted)
        self._strategies: dict[str, Strategy] = {}
        self._queues: dict[tuple[str, tuple[str, ...]], Queue] = {}
        self.stats = Stats()
        self.log = StateLog()

    # -- storage ------------------------------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        """The limits storage (made on first use)."""
        if self._storage is None:
            self._bind_storage()
        assert self._storage is not None
        return self._storage

    def _bind_storage(self) -> None:
        if self._given is not None:
            storage = self._given
        else:
            assert self.storage_url is not None
            scheme = self.storage_url.split("://", 1)[0].lower()
            if scheme != "memory" and running_asyncio_loop() is None:
                raise ConfigError("storage", self.storage_url,
                                  "Redis rate-limit storage needs asyncio; under trio use memory://")
            storage = create_limits_storage(self.storage_url, key_prefix=self._key_prefix,
                                            clock=self._clock)
        self._storage = storage
        self._memory = storage if isinstance(storage, MemoryLimitStorage) else None
        self._suspends = not getattr(storage, "never_suspends", False)
        self._extras = RedisLimitExtras(storage) if RedisLimitExtras.usable(storage) else None
        self._fair = RedisFairLine(storage) if RedisFairLine.usable(storage) else None
        self._per_loop = self._given is None and self._memory is None
        if self._per_loop:
            self._loop = asyncio.get_running_loop()
        for strategy in self._strategies.values():
            strategy.bind(storage)
        next_sync = 0.0 if self._extras is not None else math.inf
        for queue in self._queues.values():
            queue.next_sync = next_sync

    def _ensure_storage(self) -> None:
        if self._storage is None or (self._per_loop and asyncio.get_running_loop() is not self._loop):
            self._bind_storage()

    def _strategy(self, name: str) -> Strategy:
        strategy = self._strategies.get(name)
        if strategy is None:
            strategy = self._strategies[name] = Strategy(name)
            if self._storage is not None:
                strategy.bind(self._storage)
        return strategy

    async def aclose(self) -> None:
        """Close the storage's connections (a storage object given by the caller is left open)."""
        if self._given is None and self._extras is not None:
            with contextlib.suppress(Exception):
                await self._extras.aclose()
        if self._given is None:
            self._storage = None
            self._extras = None

    # -- acquiring ----------------------------------------------------------------------------------------

    async def _acquire(self, queue: Queue, costs: tuple[int, ...], patience: float | None) -> float:
        """Wait until ``costs`` (one per window of ``queue``) are admitted; return when the attempt began.

        Raises:
            RateLimitExceeded: Not admitted within ``patience`` seconds (the caller's ``timeout``).
            BackendError: The storage failed (unless ``fail_open``).
        """
        try:
            if self._storage is None or self._per_loop:
                self._ensure_storage()
            if not queue.held and not queue.waiters:
                now = self._clock()
                if now >= queue.blocked_until and now >= queue.paused_until:
                    queue.held = True  # first in line: keep the turn across the awaits below (FIFO)
                    refused = -1
                    try:
                        if now >= queue.next_sync:
                            await self._sync_pause(queue, now)
                            now = self._clock()
                        if now < queue.paused_until:  # another process has paused this key
                            refused = -2
                        elif (window := queue.single) is not None and not window.debt \
                                and 0 < costs[0] <= window.amount and self._fair is None:
                            # One window, nothing owed (the usual case): hit it here, a coroutine fewer per call.
                            self.stats.storage_calls += 1
                            if not await queue.strategy.hit(window, cost=costs[0]):
                                refused = await self._refused(queue.strategy, window, costs[0], now)
                        else:
                            refused = await self._attempt(queue, costs, now)
                    except BaseException:
                        queue.held = False
                        queue.pass_turn()
                        raise
                    if refused == -1:
                        queue.held = False
                        if queue.waiters:
                            queue.pass_turn()
                        self.stats.admitted += 1
                        self.stats.immediate += 1
                        return now
                    return await self._wait(queue, costs, patience, refused, now, holding=True)
            return await self._wait(queue, costs, patience, -1, self._clock())
        except CacheLayersError:
            raise
        except Exception as exc:
            if not self.fail_open:
                raise BackendError(f"rate-limit storage failed for {queue.label}: {type(exc).__name__}: {exc}") \
                    from exc
            self.log.failure("rate-limit storage", exc)
            return self._clock()

    async def _attempt(self, queue: Queue, costs: tuple[int, ...], now: float) -> int:
        """Hit every window; ``-1`` when all admitted, else the index of the one that refused (nothing kept)."""
        if self._fair is not None:
            return await self._fair_attempt(self._fair, queue, costs, now)
        strategy = queue.strategy
        hit = strategy.hit
        windows = queue.windows
        stats = self.stats
        if len(windows) == 1:
            window = windows[0]
            cost = costs[0]
            debt = window.debt
            if debt:
                cost = min(cost + debt, max(cost, window.amount))
            if cost > 0:
                stats.storage_calls += 1
                if not await hit(window if cost <= window.amount else window.widened(cost), cost=cost):
                    return await self._refused(strategy, window, cost, now)
                if debt:
                    window.debt -= cost - costs[0]
            return -1
        taken: list[tuple[Window, int, int]] = []
        order = queue.order
        for index in order:
            window = windows[index]
            cost = base = costs[index]
            if window.debt:
                cost = min(cost + window.debt, max(cost, window.amount))
            if cost <= 0:
                continue
            stats.storage_calls += 1
            if not await hit(window if cost <= window.amount else window.widened(cost), cost=cost):
                stats.refusals += 1
                if strategy.consumes_on_refusal:
                    await self._give_back(strategy, window, cost, now)
                for other, units, _ in taken:
                    await self._give_back(strategy, other, units, now)
                if order[0] != index:
                    order.remove(index)
                    order.insert(0, index)
                return index
            taken.append((window, cost, base))
        for window, cost, base in taken:
            if cost > base:
                window.debt -= cost - base
        return -1

    async def _fair_attempt(self, fair: RedisFairLine, queue: Queue, costs: tuple[int, ...], now: float) -> int:
        """`_attempt` through the fair line (see `RedisFairLine`): a refusal says when the caller's turn comes.

        A refused attempt keeps nothing, as in `_attempt`; ``queue.blocked_until`` is set from the server's answer,
        so the head sleeps until its turn without reading the window's stats.
        """
        strategy = queue.strategy
        windows = queue.windows
        stats = self.stats
        order = queue.order
        member = self._member_of(queue)
        calls = queue.reported = max(1, len(queue.waiters))
        taken: list[tuple[Window, int, int]] = []
        for index in order:
            window = windows[index]
            cost = base = costs[index]
            if window.debt:
                cost = min(cost + window.debt, max(cost, window.amount))
            if cost <= 0:
                continue
            stats.storage_calls += 1
            answer = await fair.grant(strategy.code, window.key, max(cost, window.amount), window.expiry, cost,
                                      member, calls)
            if not answer.granted:
                stats.refusals += 1
                for other, units, _ in taken:
                    await self._give_back(strategy, other, units, now)
                if order[0] != index:
                    order.remove(index)
                    order.insert(0, index)
                queue.blocked_until = self._clock() + answer.wait + _MARGIN
                return index
            taken.append((window, cost, base))
        for window, cost, base in taken:
            if cost > base:
                window.debt -= cost - base
        return -1

    def _member_of(self, queue: Queue) -> str:
        """``queue``'s name in the fair lines: this engine's, and the queue's (one process may have several)."""
        if not queue.member:
            queue.member = f"{self._member}:{id(queue):x}"
        return queue.member

    async def _refused(self, strategy: Strategy, window: Window, cost: int, now: float) -> int:
        """Count ``window``'s refusal of ``cost`` (returning it if the strategy counted it anyway); return 0."""
        self.stats.refusals += 1
        if strategy.consumes_on_refusal:
            await self._give_back(strategy, window, cost, now)
        return 0

    async def _give_back(self, strategy: Strategy, window: Window, units: int, since: float) -> None:
        """Return ``units`` taken from ``window`` at or after ``since`` (see the class docstring)."""
        if units <= 0:
            return
        self.stats.storage_calls += 1
        self.stats.refunds += units
        if strategy.code != "mw":
            await strategy.limiter.hit(window, cost=-units)
        elif self._memory is not None:
            self._memory.refund_entry(window.key, units, since)
        elif self._extras is not None:
            await self._extras.refund(window.key, units, since)
        else:
            self.stats.refunds -= units
            self.stats.storage_calls -= 1

    async def _give_back_all(self, queue: Queue, costs: tuple[int, ...], since: float) -> None:
        for window, cost in zip(queue.windows, costs, strict=True):
            await self._give_back(queue.strategy, window, cost, since)
        queue.kick()

    async def _wait(self, queue: Queue, costs: tuple[int, ...], patience: float | None, refused: int,
                    now: float, holding: bool = False) -> float:
        """The slow path: queue up, wait for the turn, then lead until admitted."""
        self.stats.waited += 1
        waiter = Waiter(costs, math.inf if patience is None else now + patience)
        if holding:  # the fast path was refused (or found a pause) while holding the turn: keep it, in front
            waiter.turn = True
            queue.waiters.appendleft(waiter)
        else:
            queue.waiters.append(waiter)
            if not queue.held and queue.waiters[0] is waiter:
                queue.held = True
                waiter.turn = True
            elif queue.reported and len(queue.waiters) >= 2 * queue.reported and queue.waiters[0].turn:
                queue.waiters[0].event.set()  # twice the calls the fair line knows of: the head tells it
        granted = False
        try:
            if not waiter.turn:
                await self._wait_for_turn(queue, waiter)
            since = await self._lead(queue, waiter, refused)
            granted = True
            self.stats.admitted += 1
            return since
        except anyio.get_cancelled_exc_class():
            self.stats.cancelled += 1
            raise
        finally:
            queue.leave(waiter, granted)

    async def _wait_for_turn(self, queue: Queue, waiter: Waiter) -> None:
        while not waiter.turn:
            if waiter.expired:
                raise self._exceeded(queue, waiter, waiter.retry_after)
            remaining = waiter.deadline - self._clock()
            if remaining <= 0:
                raise self._exceeded(queue, waiter, self._estimate(queue))
            if math.isinf(remaining):
                await waiter.event.wait()
            else:
                with anyio.move_on_after(remaining):
                    await waiter.event.wait()
            if not waiter.turn and not waiter.expired:
                waiter.event = anyio.Event()

    async def _lead(self, queue: Queue, waiter: Waiter, refused: int) -> float:
        """As the head: sleep until the gate opens, attempt, learn the reset time on refusal, repeat."""
        clock = self._clock
        costs = waiter.costs
        spins = 0
        losses = 0  # refusals right after waking for a reset: other processes' heads got there first
        woke = False
        while True:
            if refused < 0:
                now = clock()
                if now >= queue.next_sync:
                    await self._sync_pause(queue, now)
                gate = max(queue.blocked_until, queue.paused_until)
                if gate > now and not (queue.reported and len(queue.waiters) >= 2 * queue.reported
                                       and now >= queue.paused_until):
                    if gate > waiter.deadline:
                        raise self._exceeded(queue, waiter, gate - now)
                    queue.expire_hopeless(gate, now)
                    waiter.event = anyio.Event()
                    with anyio.move_on_after(gate - now):
                        await waiter.event.wait()
                    woke = True
                    continue
                if now > waiter.deadline:
                    raise self._exceeded(queue, waiter, self._estimate(queue))
                refused = await self._guarded_attempt(queue, costs, now)
                if refused < 0:
                    return now
                rtt = clock() - now
                losses = losses + 1 if woke and self._memory is None else 0
                woke = False
            if self._fair is not None:
                refused = -1
                continue  # the fair line's refusal set blocked_until: when the turn should come
            window = queue.windows[refused]
            need = min(costs[refused] + window.debt, max(costs[refused], window.amount))
            refused = -1
            strategy = queue.strategy
            self.stats.storage_calls += strategy.stats_calls
            reset, remaining = await strategy.limiter.get_window_stats(window)
            now = clock()
            if remaining >= need and spins < 2:
                spins += 1  # the window changed between the hit and the stats: try again at once
                continue
            spins = 0
            queue.blocked_until = max(reset, now) + _MARGIN
            if losses:
                # Heads of other processes woke for the same reset and won. Waking together again makes every
                # freed unit cost each loser two calls; a random delay of a few round trips (doubling per loss
                # in a row, at most the average gap between freed units) spreads the heads out without making
                # them miss the units that free up next, so no process is starved.
                gap = window.expiry / max(1, window.amount)
                queue.blocked_until += random.uniform(0, min(gap, 4 * rtt * 2 ** min(losses - 1, 6)))

    async def _guarded_attempt(self, queue: Queue, costs: tuple[int, ...], now: float) -> int:
        """An attempt whose outcome a cancellation cannot hide: units taken by a cancelled head go back."""
        if not self._suspends:  # the memory storage never suspends: nothing can interrupt the attempt
            return await self._attempt(queue, costs, now)
        if running_asyncio_loop() is not None:
            # A native asyncio cancellation (asyncio.timeout, Task.cancel) ignores anyio's shields: run the
            # attempt as its own task and, if cancelled, wait for it to learn whether units were taken.
            task = asyncio.ensure_future(self._attempt(queue, costs, now))
            try:
                refused = await asyncio.shield(task)
            except asyncio.CancelledError:
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(Exception):
                        if await asyncio.shield(task) < 0:
                            await self._give_back_all(queue, costs, now)
                raise
        else:
            with anyio.CancelScope(shield=True):
                refused = await self._attempt(queue, costs, now)
        if refused < 0:
            try:
                await anyio.lowlevel.checkpoint_if_cancelled()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await self._give_back_all(queue, costs, now)
                raise
        return refused


    def _estimate(self, queue: Queue) -> float | None:
        gate = max(queue.blocked_until, queue.paused_until) - self._clock()
        return gate if gate > 0 else None

    def _exceeded(self, queue: Queue, waiter: Waiter, retry_after: float | None) -> RateLimitExceeded:
        self.stats.timeouts += 1
        key = f" for key {queue.key!r}" if queue.key else ""
        hint = f"; retry after about {retry_after:.3g}s" if retry_after is not None else ""
        return RateLimitExceeded(f"rate limit {queue.label}{key}: not admitted before the timeout{hint}",
                                 retry_after=retry_after, limit=queue.label, key=queue.key)

    # -- pauses, adaptation, corrections ------------------------------------------------------------------

    async def _sync_pause(self, queue: Queue, now: float) -> None:
        queue.next_sync = now + self._pause_check
        if self._extras is None:
            queue.next_sync = math.inf
            return
        self.stats.storage_calls += 1
        self.stats.pause_reads += 1
        until = await self._extras.get_pause([w.key for w in queue.windows])
        if until > queue.paused_until:
            self.stats.pauses += 1
            apply_pause(queue.windows, until)


    async def _pause(self, windows: Sequence[Window], seconds: float) -> None:
        seconds = min(seconds, LONGEST)  # a provider's Retry-After of 1e30 s: Redis keeps no such expiry
        now = self._clock()
        until = now + seconds
        self.stats.pauses += 1
        apply_pause(windows, until)
        if self._extras is not None and seconds > 0:
            self.stats.storage_calls += len(windows)
            await self._extras.set_pause([w.key for w in windows], until, time.time())

    async def _correct(self, queue: Queue, estimated: tuple[int, ...], actual: Sequence[int | None],
                       since: float) -> None:
        """Charge the units used beyond the estimate (or carry them to the next call), return the excess."""
        strategy = queue.strategy
        hit = strategy.hit
        for window, guess, used in zip(queue.windows, estimated, actual, strict=True):
            if used is None:
                continue
            delta = used - guess
            if delta > 0:
                units = min(delta, window.amount)
                self.stats.storage_calls += 1
                if self._fair is not None:  # through the line, stamped by the server like every grant
                    answer = await self._fair.grant(strategy.code, window.key, max(units, window.amount),
                                                    window.expiry, units, self._member_of(queue),
                                                    len(queue.waiters) + 1)
                    charged = units if answer.granted else 0
                else:
                    # The fixed window counts a refused hit too, so for it the charge is done either way.
                    charged = units if await hit(window, cost=units) or strategy.consumes_on_refusal else 0
                window.debt += delta - charged
            elif delta < 0 and strategy.code == "mw":
                await self._give_back(strategy, window, -delta, since)
                queue.kick()

    def _decrease(self, windows: Sequence[Window], admitted_at: float, adaptive: Adaptive) -> None:
        decrease(windows, admitted_at, adaptive, self._clock())

    def _increase(self, windows: Sequence[Window], adaptive: Adaptive) -> None:
        increase(windows, adaptive, self._clock())
