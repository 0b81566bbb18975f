"""The rate limiter engine: named, weighted limits, their queues, and the public API (acquire, limit, pause).

The window arithmetic and the storage belong to the ``limits`` library; `Admission` (the base class) waits
fairly for them. The rate-limiting guide explains the design (FIFO per key, several limits per call,
cancellation safety, Retry-After, AIMD, corrections).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final, cast

from limits.aio.storage import Storage

from cachelayers.backends.limits_storage import limits_storage_url
from cachelayers.durations import parse_duration
from cachelayers.engines.limiter.adaptive import Adaptive, as_adaptive
from cachelayers.engines.limiter.admission import Admission
from cachelayers.engines.limiter.info import LimiterInfo
from cachelayers.engines.limiter.limits import (
    DEFAULT_STRATEGY,
    Limit,
    Strategy,
    cost_plan,
    cost_units,
    looks_like_spec,
    parse_limit,
    strategy_name,
)
from cachelayers.engines.limiter.queue import SWEEP_AT, Queue, Window
from cachelayers.engines.limiter.retry_after import NOT_RATE_LIMITED, rate_limit_retry_after
from cachelayers.errors import ConfigError
from cachelayers.metrics import register_stats_source
from cachelayers.settings import PerSettings, Settings, get_settings, tracker

__all__ = ["Permit", "RateLimiter", "default_limiter"]


def _redis_url_of(settings: Settings) -> str | None:
    """The first Redis tier's URL in ``settings``: where distributed limits are kept by default."""
    for _name, url in settings.tiers:
        scheme = url.split("://", 1)[0].lower()
        if scheme in ("redis", "rediss", "redis+cluster", "unix"):
            return str(url)
    return None


class RateLimiter(Admission):
    """Fair, cancellation-safe waiting under named, weighted limits kept in a limits storage.

    Args:
        settings: Where named limits come from (``Settings.limits``) and, unless ``storage`` is given, the
            storage: the first Redis tier of ``settings.tiers`` if any (distributed limits), else memory.
            The settings in force when omitted.
        storage: ``"memory://"``, a Redis URL (``redis://host:6379/0``, ``rediss://``, ``redis+cluster://``,
            ``unix://``; limits' ``async+…`` URLs too), or a limits async storage object.
        strategy: Default strategy: ``"moving-window"`` (`DEFAULT_STRATEGY`), ``"sliding-window-counter"`` or
            ``"fixed-window"``.
        clock: Wall-clock time source for the memory storage, deadlines and pauses (tests pass a virtual
            clock; in Redis, grants are stamped with the server's clock).
        pause_check: How often (seconds) a busy key reads the pause flags other processes set in Redis; the
            delay with which a Retry-After received elsewhere takes effect here.
        fail_open: When the storage fails, let calls through (logged once) instead of raising `BackendError`.

    How several windows are taken together depends on the strategy, because a refused window makes the head
    return what it took from the others in the same attempt: the moving window removes the units again (exactly
    in memory; in Redis the oldest entries since the attempt began, which can only make the window stricter),
    the counters take a negative hit. With a custom storage that cannot return units, they stay spent: the
    limit is then stricter than configured, never looser.

    Across processes sharing a Redis storage (not a cluster), grants are fair: each goes through one Lua script
    that keeps a line of the waiting processes next to the window (`cachelayers.backends.limits_fair`), so no
    process can take the units owed to another; see the rate-limiting guide, "Fairness across processes".

    Raises:
        ConfigError: The storage URL or the strategy is invalid.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        storage: str | Storage | None = None,
        strategy: str = DEFAULT_STRATEGY,
        clock: Callable[[], float] = time.time,
        pause_check: float | str | timedelta = 0.5,
        fail_open: bool = False,
    ) -> None:
        self.settings = settings if settings is not None else get_settings()
        self.strategy = strategy_name(strategy, "strategy")
        pause_every = parse_duration(pause_check, "pause_check")
        if storage is None:
            storage = _redis_url_of(self.settings) or "memory://"
        if isinstance(storage, str):
            limits_storage_url(storage, "storage")  # validate now, connect on first use
        elif not isinstance(storage, Storage):
            raise ConfigError("storage", storage, "expected a storage URL or a limits async storage")
        super().__init__(storage, clock=clock, pause_check=pause_every, fail_open=fail_open,
                         key_prefix=self.settings.key_prefix)
        self._windows: dict[str, Window] = {}
        self._resolved: dict[tuple[tuple[str, ...], str], tuple[Limit, ...]] = {}
        # (limits, strategy, key) of `acquire` calls -> what they resolve to, so repeated calls skip the work
        self._calls: dict[tuple[Any, ...], tuple[tuple[Limit, ...], Queue, tuple[int, ...]]] = {}
        register_stats_source(self)

    # -- limits and queues --------------------------------------------------------------------------------

    def resolve(self, spec: str | Limit, field: str = "limit") -> Limit:
        """Turn a limit name from the settings, or an inline limit, into a `Limit`.

        Raises:
            ConfigError: The text is neither a valid inline limit nor a name in ``settings.limits``.
        """
        if isinstance(spec, Limit):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(field, spec, "expected a limit name from the settings or a limit like '3500/minute'")
        named = self.settings.limit_specs
        if spec in named:
            return parse_limit(named[spec], f"limits[{spec!r}]", name=spec)
        if looks_like_spec(spec):
            return parse_limit(spec, field)
        known = ", ".join(sorted(named)) or "none"
        raise ConfigError(f"limits[{spec!r}]", None, f"no limit named {spec!r} in the settings (known: {known}); "
                                                     f"configure it, e.g. limits={{{spec!r}: '3500/minute'}}, "
                                                     f"or give a limit inline like '3500/minute'")

    def _queue(self, limits: Sequence[Limit], key: str, strategy: Strategy, scope: str = "") -> Queue:
        """The queue of ``limits`` for ``key`` (made on first use), with its windows."""
        windows: list[Window] = []
        for limit in limits:
            label = f"{scope}{limit.name}"
            for item in limit.items:
                wkey = (f"{label}/{strategy.code}/{key}/{item.amount}/{item.multiples}/"
                        f"{item.GRANULARITY.name}")
                window = self._windows.get(wkey)
                if window is None:
                    window = self._windows[wkey] = Window(wkey, item.amount, item.get_expiry(), str(limit))
                windows.append(window)
        ident = (strategy.name, tuple(w.key for w in windows))
        queue = self._queues.get(ident)
        if queue is None:
            label = " + ".join(dict.fromkeys(w.label for w in windows))
            queue = self._queues[ident] = Queue(tuple(windows), strategy, key, label,
                                                 0.0 if self._extras is not None or self._storage is None
                                                 else math.inf)
            for window in windows:
                window.queues.append(queue)
        return queue

    def _forget(self, queue: Queue) -> None:
        """Drop an idle queue, and its windows when nothing else uses them and they hold no state."""
        ident = (queue.strategy.name, tuple(w.key for w in queue.windows))
        self._queues.pop(ident, None)
        self._calls = {k: v for k, v in self._calls.items() if v[1] is not queue}
        for window in queue.windows:
            with contextlib.suppress(ValueError):
                window.queues.remove(queue)
            if not window.queues and window.fraction == 1.0 and not window.debt:
                self._windows.pop(window.key, None)

    # -- acquiring ----------------------------------------------------------------------------------------

    def _limits(self, specs: Sequence[str | Limit], strategy: str | None) -> tuple[tuple[Limit, ...], Strategy]:
        name = self.strategy if strategy is None else strategy_name(strategy, "strategy")
        if not specs:
            raise ConfigError("limits", (), "give at least one limit")
        if all(isinstance(s, str) for s in specs):
            ident = (tuple(cast(Sequence[str], specs)), name)
            limits = self._resolved.get(ident)
            if limits is None:
                limits = self._resolved[ident] = tuple(
                    self.resolve(s, f"limits[{i}]") for i, s in enumerate(specs))
        else:
            limits = tuple(self.resolve(s, f"limits[{i}]") for i, s in enumerate(specs))
        return limits, self._strategy(name)

    def _expand(self, limits: Sequence[Limit], cost: int | Mapping[str, int] | None, key: str) -> tuple[int, ...]:
        per_limit = cost_plan(limits, cost, "cost")
        costs: list[int] = []
        for limit, value in zip(limits, per_limit, strict=True):
            units = cost_units(value, limit, key)
            costs.extend([units] * len(limit.items))
        return tuple(costs)

    async def acquire(self, *limits: str | Limit, cost: int | Mapping[str, int] | None = None, key: str = "",
                      timeout: float | str | timedelta | None = None,  # noqa: ASYNC109 - a wait bound, not a cap
                      strategy: str | None = None,
                      adaptive: Adaptive | bool = False) -> Permit:
        """Wait until every limit admits the call; return its `Permit`.

        Args:
            limits: Names from ``settings.limits`` or inline limits (``"3500/minute"``).
            cost: Units the call takes. A number weighs the only limit, or with several limits every limit
                but the first (which counts calls): ``acquire("llm-rpm", "llm-tpm", cost=1200)``. A mapping
                gives each limit its cost by name; limits not in it cost 1.
            key: What the limits are counted per (a tenant, a model).
            timeout: Longest wait (seconds or ``"500ms"``); ``None`` waits as long as it takes, ``0`` does
                not wait.
            strategy: Overrides the engine's strategy.
            adaptive: AIMD settings (see `Adaptive`) applied by `Permit.rate_limited`.

        Returns:
            A `Permit`; report the actual cost and rate-limit errors to it, or use `limit` which does.

        Raises:
            RateLimitExceeded: Not admitted within ``timeout``, or a cost larger than its limit
                (``retry_after`` is ``None``: it can never fit).
            ConfigError: A limit is unknown or malformed.
        """
        ident = (limits, strategy, key)
        found = self._calls.get(ident) if type(key) is str else None
        if found is None:
            resolved, strat = self._limits(limits, strategy)
            found = (resolved, self._queue(resolved, str(key), strat), self._expand(resolved, None, str(key)))
            if len(self._calls) < SWEEP_AT and all(isinstance(s, str) for s in limits):
                self._calls[ident] = found
        resolved, queue, costs = found
        if cost is not None:
            costs = self._expand(resolved, cost, str(key))
        wait = None if timeout is None else parse_duration(timeout, "timeout", allow_zero=True)
        since = await self._acquire(queue, costs, wait)
        return Permit(self, queue, resolved, costs, since, as_adaptive(adaptive))

    @contextlib.asynccontextmanager
    async def limit(self, *limits: str | Limit, cost: int | Mapping[str, int] | None = None, key: str = "",
                    timeout: float | str | timedelta | None = None,  # noqa: ASYNC109 - a wait bound, not a cap
                    strategy: str | None = None,
                    adaptive: Adaptive | bool = False,
                    rate_limit_error: Callable[[BaseException], bool | float | None] | None = None,
                    ) -> AsyncIterator[Permit]:
        """Acquire (as `acquire`), run the block, then settle: ``async with limiter.limit(...) as permit:``.

        A rate-limit error leaving the block pauses the key for its Retry-After in every process (and lowers
        the rate in adaptive mode) before it propagates; success raises the rate back in adaptive mode. An
        actual cost given to ``permit.report()`` in the block is charged as a correction on the way out.
        """
        permit = await self.acquire(*limits, cost=cost, key=key, timeout=timeout, strategy=strategy,
                                    adaptive=adaptive)
        try:
            yield permit
        except Exception as exc:
            retry_after = rate_limit_retry_after(exc, rate_limit_error)
            if retry_after != NOT_RATE_LIMITED:
                await permit.rate_limited(retry_after)
            raise
        else:
            await permit.succeeded()

    async def pause(self, *limits: str | Limit, key: str = "", seconds: float | str | timedelta,
                    strategy: str | None = None) -> None:
        """Stop admitting calls under ``limits`` for ``key`` for ``seconds``, in every process sharing the storage."""
        self._ensure_storage()
        resolved, strat = self._limits(limits, strategy)
        queue = self._queue(resolved, str(key), strat)
        await self._pause(queue.windows, parse_duration(seconds, "seconds", allow_zero=True, stored=True))

    def effective_limit(self, limit: str | Limit, key: str = "", strategy: str | None = None) -> int:
        """The amount ``limit``'s (first) window admits now for ``key``: lower than configured after AIMD cuts."""
        resolved, strat = self._limits([limit], strategy)
        return self._queue(resolved, str(key), strat).windows[0].amount

    async def window(self, limit: str | Limit, key: str = "", strategy: str | None = None) -> tuple[float, int]:
        """``(reset time, remaining units)`` of ``limit``'s (first) window for ``key``, from limits."""
        self._ensure_storage()
        resolved, strat = self._limits([limit], strategy)
        window = self._queue(resolved, str(key), strat).windows[0]
        self.stats.storage_calls += strat.stats_calls
        stats = await strat.limiter.get_window_stats(window)
        return float(stats.reset_time), int(stats.remaining)

    def info(self) -> LimiterInfo:
        """Counters: admissions, waits, timeouts, storage calls per admission, rate-limit errors, …"""
        return self.stats.info()

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"rate_limiter@{id(self):x}": self.info()._asdict()}

    def __repr__(self) -> str:
        where = self.storage_url or type(self._given).__name__
        return f"RateLimiter({where!r}, strategy={self.strategy!r})"


class Permit:
    """An admitted call: report its actual cost and its outcome here.

    Attributes:
        admitted_at: When the admitting attempt began (wall clock).
        costs: Units taken per window.
    """

    __slots__ = ("_actual", "_adaptive", "_limiter", "_limits", "_queue", "_settled", "admitted_at", "costs")

    def __init__(self, limiter: RateLimiter, queue: Queue, limits: tuple[Limit, ...], costs: tuple[int, ...],
                 admitted_at: float, adaptive: Adaptive | None) -> None:
        self._limiter = limiter
        self._queue = queue
        self._limits = limits
        self.costs = costs
        self.admitted_at = admitted_at
        self._adaptive = adaptive
        self._actual: tuple[int | None, ...] | None = None
        self._settled = False

    def report(self, actual: int | Mapping[str, int]) -> None:
        """Give the actual cost (e.g. the tokens the provider counted); it is charged when the permit settles.

        A number applies like a ``cost=`` number (the only limit, or all but the first); a mapping by name.
        """
        per_limit = cost_plan(self._limits, actual, "actual", default=None)
        out: list[int | None] = []
        for limit, value in zip(self._limits, per_limit, strict=True):
            units = None if value is None else cost_units(value, limit, self._queue.key, check=False)
            out.extend([units] * len(limit.items))
        self._actual = tuple(out)

    async def succeeded(self) -> None:
        """Settle a successful call: adaptive increase and the reported correction."""
        if self._settled:
            return
        self._settled = True
        if self._adaptive is not None:
            self._limiter._increase(self._queue.windows, self._adaptive)
        if self._actual is not None:
            await self._limiter._correct(self._queue, self.costs, self._actual, self.admitted_at)

    async def rate_limited(self, retry_after: float | None = None, *, backoff: float = 1.0) -> None:
        """Settle a call the provider refused: pause the key for ``retry_after`` (``backoff`` if unknown)
        in every process and, in adaptive mode, lower the rate."""
        self._settled = True
        self._limiter.stats.rate_limit_errors += 1
        if self._adaptive is not None:
            self._limiter._decrease(self._queue.windows, self.admitted_at, self._adaptive)
        await self._limiter._pause(self._queue.windows, backoff if retry_after is None else retry_after)

    async def refund(self) -> None:
        """Give the units back (the call was not made after all)."""
        self._settled = True
        await self._limiter._give_back_all(self._queue, self.costs, self.admitted_at)


# -- the default engine -----------------------------------------------------------------------------------


_default: Final = PerSettings(RateLimiter)
_by_storage: dict[str, RateLimiter] = {}
_by_storage_generation = -1


def default_limiter(storage: str | None = None) -> RateLimiter:
    """The engine of the settings in force (or of ``storage`` under them), made on first use.

    It is remade when the settings change, so named limits and the storage follow `configure`. Functions
    decorated with the same storage share one engine, hence one FIFO queue per limits and key.
    """
    global _by_storage_generation
    if storage is None:
        return _default.get()
    settings = get_settings()
    if _by_storage_generation != tracker.generation:
        _by_storage.clear()
        _by_storage_generation = tracker.generation
    engine = _by_storage.get(storage)
    if engine is None:
        engine = _by_storage[storage] = RateLimiter(settings, storage=storage)
    return engine

