"""The rate limiter engine: fair waiting under named, weighted, distributed limits.

The window arithmetic and the storage belong to the `limits` library (its async strategies over its memory or
Redis storages, or `MemoryLimitStorage`); this engine adds what limits lacks, since limits only says yes or
no:

* **Waiting, FIFO per key.** Calls under the same limits and key wait in one queue per process. Only the
  queue's head talks to the storage; it sleeps until the window's reset time (``get_window_stats``) rather
  than polling, and a large cost is never overtaken by small ones. Uncontended, an acquisition is one storage
  call per window; under contention about one as well, plus one ``get_window_stats`` per refusal.
* **Several limits per call, without holding one while waiting on another.** The head hits the windows one
  after the other, the one that refused last time first. When a window refuses, the units already taken from
  the others in that attempt are returned at once (`RateLimiter` documents how per strategy) and the head
  sleeps holding nothing, then tries them all again: a call never sits on one limit's units while it waits
  for another, and no units are lost when the bottleneck is the first window tried (the usual case, since it
  moves to the front).
* **Cancellation safety.** A waiter that is cancelled or times out leaves the queue and has taken nothing.
  The storage calls of a waiting head are shielded, and units taken by a head cancelled during its call are
  returned before the cancellation goes on.
* **Retry-After and AIMD.** When the wrapped call fails with a rate-limit error (HTTP 429, a provider's
  ``RateLimitError``, or a user predicate) the key is paused for Retry-After in every process (a Redis key
  with an expiry, which other processes read at most every ``pause_check`` seconds), optional retries follow
  with exponential back-off and jitter, and in adaptive mode the effective limit drops multiplicatively
  (with a floor) and climbs back additively after sustained success.
* **Corrections.** The actual cost known after a call (tokens really used) is charged on top of the
  estimate, or the excess estimate returned.

Nothing runs while idle: no task, no timer, no connection beyond the storage's pool; anyio primitives are
created when a call has to wait. Works on asyncio and trio with the memory storage (Redis needs asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import inspect
import math
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Generic, NamedTuple, ParamSpec, TypeVar, cast

import anyio
import anyio.lowlevel
from limits import RateLimitItem
from limits.aio.storage import Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.util import parse_many

from cachelayers.backends.limits_storage import (
    MemoryLimitStorage,
    RedisLimitExtras,
    create_limits_storage,
    limits_storage_url,
)
from cachelayers.durations import parse_duration
from cachelayers.errors import BackendError, CacheLayersError, ConfigError, RateLimitExceeded
from cachelayers.keys import function_identity
from cachelayers.metrics import StateLog, register_stats_source
from cachelayers.settings import PerSettings, Settings, get_settings, tracker

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Adaptive", "Limit", "LimitedFunction", "LimiterInfo", "Permit",
           "RateLimiter", "default_limiter", "parse_limit", "rate_limit_retry_after"]

P = ParamSpec("P")
T = TypeVar("T")

STRATEGIES: Final = ("moving-window", "sliding-window-counter", "fixed-window")
"""The strategies of limits the engine can use, by name."""

DEFAULT_STRATEGY: Final = "moving-window"
"""The default strategy: limits' moving window, the only one that guarantees never more than N units in any
window of W seconds (the fixed window lets 2N through around a boundary, the sliding-window counter
approximates). Its cost is a timestamp per acquisition in Redis (one per *unit* in Redis, since limits'
Redis moving window stores a list entry per unit): for token limits in the millions per minute prefer
``"sliding-window-counter"``."""

_CODES: Final = {"moving-window": "mw", "sliding-window-counter": "swc", "fixed-window": "fw"}
_CLASSES: Final[dict[str, Any]] = {"moving-window": MovingWindowRateLimiter,
                                   "sliding-window-counter": SlidingWindowCounterRateLimiter,
                                   "fixed-window": FixedWindowRateLimiter}
_MARGIN: Final = 0.001  # past a reset time, so the freed unit is strictly outside the (closed) window
_NAME: Final = re.compile(r"^[A-Za-z_][\w.\-]*$")
_SPEC_HINT: Final = re.compile(r"^\s*\d|/|\bper\b", re.IGNORECASE)
_SWEEP_AT: Final = 10_000  # queues per limited function before idle ones are dropped


# -- limits ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit: its name (or its inline text) and the windows limits parsed from it.

    Attributes:
        name: The name in the settings (``"llm-rpm"``), or the inline text for an inline limit.
        spec: The limit text, e.g. ``"3500/minute"`` or ``"10/second;500/minute"``.
        items: limits' parsed windows (one per ``;``-separated part).
    """

    name: str
    spec: str
    items: tuple[RateLimitItem, ...]

    @property
    def amount(self) -> int:
        """The smallest amount among the windows: no single call can cost more."""
        return min(item.amount for item in self.items)

    def __str__(self) -> str:
        return self.name if self.name == self.spec else f"{self.name} ({self.spec})"


def _looks_like_spec(text: str) -> bool:
    return bool(_SPEC_HINT.search(text))


def parse_limit(spec: str, field: str = "limit", *, name: str | None = None) -> Limit:
    """Parse a limit such as ``"3500/minute"``, ``"10 per 2 seconds"`` or ``"10/second;500/minute"``.

    Args:
        spec: The limit text, in limits' notation.
        field: Name of the setting or parameter, for the error message.
        name: Name of the limit; the text itself when omitted.

    Returns:
        The parsed `Limit`.

    Raises:
        ConfigError: The text is not a limit, or a window allows nothing.
    """
    if not isinstance(spec, str):
        raise ConfigError(field, spec, "expected a limit like '3500/minute' or '10 per 2 seconds'")
    text = spec.strip()
    try:
        items = tuple(parse_many(text))
    except ValueError:
        raise ConfigError(field, spec, "not a limit; expected e.g. '3500/minute', '10 per 2 seconds' or "
                                       "'10/second;500/minute'") from None
    if not items:
        raise ConfigError(field, spec, "not a limit; expected e.g. '3500/minute'")
    for item in items:
        if item.amount < 1:
            raise ConfigError(field, spec, "a limit must allow at least 1 unit per window")
    return Limit(name or text, text, items)


def _strategy_name(value: object, field: str) -> str:
    if not isinstance(value, str) or value not in _CODES:
        raise ConfigError(field, value, f"unknown strategy; expected one of {', '.join(STRATEGIES)}")
    return value


@dataclass(frozen=True, slots=True)
class Adaptive:
    """AIMD settings: how the effective limit reacts to the provider's rate-limit errors.

    On a rate-limit error the effective amount of every window of the call is multiplied by ``decrease``
    (never below ``floor`` times the configured amount, and at least 1); after each ``period`` without such
    an error and with at least one success, it grows back by ``increase`` times the configured amount, up to
    the configured amount. Errors of calls admitted before the last decrease do not decrease it again (they
    were sent at the old rate).

    Attributes:
        decrease: Factor applied on a rate-limit error, in (0, 1).
        increase: Fraction of the configured amount added back per period of success, in (0, 1].
        floor: Lowest fraction of the configured amount, in (0, 1].
        period: Seconds of success between increases; the window's length when ``None``.
    """

    decrease: float = 0.5
    increase: float = 0.1
    floor: float = 0.1
    period: float | str | timedelta | None = None

    def __post_init__(self) -> None:
        for name, low, high, closed in (("decrease", 0.0, 1.0, False), ("increase", 0.0, 1.0, True),
                                        ("floor", 0.0, 1.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    low < value < high or (closed and value == high)):
                raise ConfigError(f"adaptive.{name}", value,
                                  f"expected a number in (0, 1{']' if closed else ')'}")
        if self.period is not None:
            object.__setattr__(self, "period", parse_duration(self.period, "adaptive.period"))


# -- rate-limit errors ---------------------------------------------------------------------------------------


_NOT_RATE_LIMITED: Final = -1.0  # what rate_limit_retry_after returns for any other error


def _header(headers: Any, name: str) -> str | None:
    getter = getattr(headers, "get", None)
    if getter is None:
        return None
    for variant in (name, name.title(), name.upper()):
        value = getter(variant)
        if value is not None:
            return str(value)
    return None


def _retry_after_from(exc: BaseException, now: float) -> float | None:
    seconds = getattr(exc, "retry_after", None)
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds):
        return max(0.0, float(seconds))
    for holder in (exc, getattr(exc, "response", None)):
        headers = getattr(holder, "headers", None)
        if headers is None:
            continue
        ms = _header(headers, "retry-after-ms")
        if ms is not None:
            with contextlib.suppress(ValueError):
                return max(0.0, float(ms) / 1000)
        value = _header(headers, "retry-after")
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        with contextlib.suppress(TypeError, ValueError):
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - now)
    return None


def _looks_rate_limited(exc: BaseException) -> bool:
    if isinstance(exc, RateLimitExceeded):  # our own limiter's refusal is not the provider's
        return False
    if any("RateLimit" in cls.__name__ for cls in type(exc).__mro__):
        return True
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None:
            continue
        for attribute in ("status_code", "status"):
            if getattr(holder, attribute, None) == 429:
                return True
    return False


def rate_limit_retry_after(exc: BaseException, predicate: Callable[[BaseException], bool | float | None] | None = None,
                           now: float | None = None) -> float | None:
    """Tell whether ``exc`` is a rate-limit error and how long to wait, by duck typing.

    A rate-limit error is one whose class (or a base) has ``RateLimit`` in its name (``openai.RateLimitError``,
    ``anthropic.RateLimitError``), or with ``status_code``/``status`` 429 on itself or its ``response``
    (``httpx.HTTPStatusError``, ``aiohttp.ClientResponseError``). The wait is the ``retry_after`` attribute,
    or the ``Retry-After-Ms`` / ``Retry-After`` header (seconds or an HTTP date) of ``exc.headers`` or
    ``exc.response.headers``.

    Args:
        exc: The exception the call raised.
        predicate: Decides first when given: ``True`` (a rate-limit error), a number (one, with that
            Retry-After in seconds), ``False`` (not one) or ``None`` (no opinion: duck typing decides).
        now: Wall-clock time, for HTTP-date headers.

    Returns:
        ``-1.0`` when ``exc`` is not a rate-limit error; else the Retry-After in seconds, or ``None`` when the
        error does not say.
    """
    now = time.time() if now is None else now
    if predicate is not None:
        verdict = predicate(exc)
        if verdict is False:
            return _NOT_RATE_LIMITED
        if isinstance(verdict, int | float) and not isinstance(verdict, bool):
            return max(0.0, float(verdict))
        if verdict is True:
            return _retry_after_from(exc, now)
    if not _looks_rate_limited(exc):
        return _NOT_RATE_LIMITED
    return _retry_after_from(exc, now)


# -- engine state ----------------------------------------------------------------------------------------------


class _Strategy:
    """A limits strategy bound to the engine's storage (rebound if the storage is remade)."""

    __slots__ = ("code", "consumes_on_refusal", "hit", "limiter", "name", "stats_calls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.code = _CODES[name]
        self.consumes_on_refusal = name == "fixed-window"  # limits' fixed window counts refused hits too
        self.stats_calls = 2 if name == "fixed-window" else 1  # its window stats read count and expiry
        self.limiter: Any = None
        self.hit: Callable[..., Awaitable[bool]] | None = None

    def bind(self, storage: Storage) -> None:
        self.limiter = _CLASSES[self.name](storage)
        self.hit = self.limiter.hit


class _Window:
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
        self.queues: list[_Queue] = []

    def key_for(self, *identifiers: object) -> str:
        return self.key

    def get_expiry(self) -> int:
        return self.expiry

    def widened(self, amount: int) -> _Window:
        """A copy allowing ``amount``: a call costing more than the lowered effective amount still fits."""
        other = _Window(self.key, amount, self.expiry, self.label)
        other.nominal = self.nominal
        return other


class _Queue:
    """The callers waiting under one combination of windows (limits and key) in this process."""

    __slots__ = ("blocked_until", "held", "key", "label", "next_sync", "order", "paused_until", "strategy",
                 "waiters", "windows")

    def __init__(self, windows: tuple[_Window, ...], strategy: _Strategy, key: str, label: str,
                 next_sync: float) -> None:
        self.windows = windows
        self.strategy = strategy
        self.key = key
        self.label = label
        self.order = list(range(len(windows)))  # the window that refused last comes first
        self.waiters: deque[_Waiter] = deque()
        self.held = False  # someone is talking to the storage for this queue (the head, or a fast path)
        self.blocked_until = 0.0  # the head's cost cannot fit before this (from the window stats)
        self.paused_until = max((w.paused_until for w in windows), default=0.0)
        self.next_sync = next_sync  # when to read the shared pause flags again


class _Waiter:
    __slots__ = ("costs", "deadline", "event", "expired", "retry_after", "turn")

    def __init__(self, costs: tuple[int, ...], deadline: float) -> None:
        self.costs = costs
        self.deadline = deadline
        self.event = anyio.Event()
        self.turn = False
        self.expired = False
        self.retry_after: float | None = None


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


class _Stats:
    __slots__ = ("admitted", "cancelled", "immediate", "pause_reads", "pauses", "rate_limit_errors", "refunds",
                 "refusals", "retries", "storage_calls", "timeouts", "waited")

    def __init__(self) -> None:
        self.admitted = self.immediate = self.waited = self.timeouts = self.cancelled = 0
        self.storage_calls = self.pause_reads = self.refusals = self.refunds = 0
        self.rate_limit_errors = self.retries = self.pauses = 0

    def info(self) -> LimiterInfo:
        return LimiterInfo(
            admitted=self.admitted, immediate=self.immediate, waited=self.waited, timeouts=self.timeouts,
            cancelled=self.cancelled, storage_calls=self.storage_calls,
            calls_per_admission=self.storage_calls / self.admitted if self.admitted else 0.0,
            pause_reads=self.pause_reads,
            window_calls_per_admission=(self.storage_calls - self.pause_reads) / self.admitted if self.admitted
            else 0.0,
            refusals=self.refusals, refunds=self.refunds, rate_limit_errors=self.rate_limit_errors,
            retries=self.retries, pauses=self.pauses)


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _redis_url_of(settings: Settings) -> str | None:
    for _name, url in settings.tiers:
        scheme = url.split("://", 1)[0].lower()
        if scheme in ("redis", "rediss", "redis+cluster", "unix"):
            return str(url)
    return None


# -- the engine ----------------------------------------------------------------------------------------------


class RateLimiter:
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
            clock; limits' Redis storage always uses ``time.time``).
        pause_check: How often (seconds) a busy key reads the pause flags other processes set in Redis; the
            delay with which a Retry-After received elsewhere takes effect here.
        fail_open: When the storage fails, let calls through (logged once) instead of raising `BackendError`.

    How several windows are taken together depends on the strategy, because a refused window makes the head
    return what it took from the others in the same attempt: the moving window removes the units again (exactly
    in memory; in Redis the oldest entries since the attempt began, which can only make the window stricter),
    the counters take a negative hit. With a custom storage that cannot return units, they stay spent: the
    limit is then stricter than configured, never looser.

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
        self.strategy = _strategy_name(strategy, "strategy")
        self._clock = clock
        self._pause_check = parse_duration(pause_check, "pause_check")
        self.fail_open = fail_open
        if storage is None:
            storage = _redis_url_of(self.settings) or "memory://"
        if isinstance(storage, str):
            limits_storage_url(storage, "storage")  # validate now, connect on first use
            self.storage_url: str | None = storage
            self._given: Storage | None = None
        elif isinstance(storage, Storage):
            self.storage_url = None
            self._given = storage
        else:
            raise ConfigError("storage", storage, "expected a storage URL or a limits async storage")
        self._storage: Storage | None = None
        self._memory: MemoryLimitStorage | None = None
        self._extras: RedisLimitExtras | None = None
        self._loop: object = None
        self._per_loop = False  # a Redis client is bound to the event loop it first ran on
        self._suspends = True  # its calls may suspend (and so be interrupted)
        self._strategies: dict[str, _Strategy] = {}
        self._windows: dict[str, _Window] = {}
        self._queues: dict[tuple[str, tuple[str, ...]], _Queue] = {}
        self._resolved: dict[tuple[tuple[str, ...], str], tuple[Limit, ...]] = {}
        # (limits, strategy, key) of `acquire` calls -> what they resolve to, so repeated calls skip the work
        self._calls: dict[tuple[Any, ...], tuple[tuple[Limit, ...], _Queue, tuple[int, ...]]] = {}
        self.stats = _Stats()
        self.log = StateLog()
        register_stats_source(self)

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
            if scheme != "memory" and not _running_asyncio():
                raise ConfigError("storage", self.storage_url,
                                  "Redis rate-limit storage needs asyncio; under trio use memory://")
            storage = create_limits_storage(self.storage_url, key_prefix=self.settings.key_prefix,
                                            clock=self._clock)
        self._storage = storage
        self._memory = storage if isinstance(storage, MemoryLimitStorage) else None
        self._suspends = not getattr(storage, "never_suspends", False)
        self._extras = RedisLimitExtras(storage) if RedisLimitExtras.usable(storage) else None
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

    def _strategy(self, name: str) -> _Strategy:
        strategy = self._strategies.get(name)
        if strategy is None:
            strategy = self._strategies[name] = _Strategy(name)
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
        if _looks_like_spec(spec):
            return parse_limit(spec, field)
        known = ", ".join(sorted(named)) or "none"
        raise ConfigError(f"limits[{spec!r}]", None, f"no limit named {spec!r} in the settings (known: {known}); "
                                                     f"configure it, e.g. limits={{{spec!r}: '3500/minute'}}, "
                                                     f"or give a limit inline like '3500/minute'")

    def _queue(self, limits: Sequence[Limit], key: str, strategy: _Strategy, scope: str = "") -> _Queue:
        """The queue of ``limits`` for ``key`` (made on first use), with its windows."""
        windows: list[_Window] = []
        for limit in limits:
            label = f"{scope}{limit.name}"
            for item in limit.items:
                wkey = (f"{label}/{strategy.code}/{key}/{item.amount}/{item.multiples}/"
                        f"{item.GRANULARITY.name}")
                window = self._windows.get(wkey)
                if window is None:
                    window = self._windows[wkey] = _Window(wkey, item.amount, item.get_expiry(), str(limit))
                windows.append(window)
        ident = (strategy.name, tuple(w.key for w in windows))
        queue = self._queues.get(ident)
        if queue is None:
            label = " + ".join(dict.fromkeys(w.label for w in windows))
            queue = self._queues[ident] = _Queue(tuple(windows), strategy, key, label,
                                                 0.0 if self._extras is not None or self._storage is None
                                                 else math.inf)
            for window in windows:
                window.queues.append(queue)
        return queue

    def _forget(self, queue: _Queue) -> None:
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

    async def _acquire(self, queue: _Queue, costs: tuple[int, ...], patience: float | None) -> float:
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
                        else:
                            refused = await self._attempt(queue, costs, now)
                    except BaseException:
                        queue.held = False
                        self._pass_turn(queue)
                        raise
                    if refused == -1:
                        queue.held = False
                        if queue.waiters:
                            self._pass_turn(queue)
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

    async def _attempt(self, queue: _Queue, costs: tuple[int, ...], now: float) -> int:
        """Hit every window; ``-1`` when all admitted, else the index of the one that refused (nothing kept)."""
        strategy = queue.strategy
        hit = strategy.hit
        assert hit is not None
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
                    stats.refusals += 1
                    if strategy.consumes_on_refusal:
                        await self._give_back(strategy, window, cost, now)
                    return 0
                if debt:
                    window.debt -= cost - costs[0]
            return -1
        taken: list[tuple[_Window, int, int]] = []
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

    async def _give_back(self, strategy: _Strategy, window: _Window, units: int, since: float) -> None:
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

    async def _give_back_all(self, queue: _Queue, costs: tuple[int, ...], since: float) -> None:
        for window, cost in zip(queue.windows, costs, strict=True):
            await self._give_back(queue.strategy, window, cost, since)
        self._kick(queue)

    async def _wait(self, queue: _Queue, costs: tuple[int, ...], patience: float | None, refused: int,
                    now: float, holding: bool = False) -> float:
        """The slow path: queue up, wait for the turn, then lead until admitted."""
        self.stats.waited += 1
        waiter = _Waiter(costs, math.inf if patience is None else now + patience)
        if holding:  # the fast path was refused (or found a pause) while holding the turn: keep it, in front
            waiter.turn = True
            queue.waiters.appendleft(waiter)
        else:
            queue.waiters.append(waiter)
            if not queue.held and queue.waiters[0] is waiter:
                queue.held = True
                waiter.turn = True
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
            self._leave(queue, waiter, granted)

    async def _wait_for_turn(self, queue: _Queue, waiter: _Waiter) -> None:
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

    async def _lead(self, queue: _Queue, waiter: _Waiter, refused: int) -> float:
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
                if gate > now:
                    if gate > waiter.deadline:
                        raise self._exceeded(queue, waiter, gate - now)
                    self._expire_hopeless(queue, gate, now)
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

    async def _guarded_attempt(self, queue: _Queue, costs: tuple[int, ...], now: float) -> int:
        """An attempt whose outcome a cancellation cannot hide: units taken by a cancelled head go back."""
        if not self._suspends:  # the memory storage never suspends: nothing can interrupt the attempt
            return await self._attempt(queue, costs, now)
        if _running_asyncio():
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

    def _leave(self, queue: _Queue, waiter: _Waiter, granted: bool) -> None:
        if queue.waiters and queue.waiters[0] is waiter:
            queue.waiters.popleft()
        else:
            with contextlib.suppress(ValueError):
                queue.waiters.remove(waiter)
        if waiter.turn:
            waiter.turn = False
            queue.held = False
            if not granted:
                queue.blocked_until = 0.0  # it was computed for this waiter's cost; the next may need less
            self._pass_turn(queue)

    def _pass_turn(self, queue: _Queue) -> None:
        if queue.waiters and not queue.held:
            nxt = queue.waiters[0]
            nxt.turn = True
            queue.held = True
            nxt.event.set()

    def _kick(self, queue: _Queue) -> None:
        """Wake the head early (units were returned): its reset time may be out of date."""
        queue.blocked_until = 0.0
        if queue.waiters and queue.waiters[0].turn:
            queue.waiters[0].event.set()

    def _expire_hopeless(self, queue: _Queue, gate: float, now: float) -> None:
        """Fail the waiters whose deadline comes before the head can even be admitted (FIFO: they can't be)."""
        for waiter in queue.waiters:
            if not waiter.turn and not waiter.expired and waiter.deadline < gate:
                waiter.expired = True
                waiter.retry_after = gate - now
                waiter.event.set()

    def _estimate(self, queue: _Queue) -> float | None:
        gate = max(queue.blocked_until, queue.paused_until) - self._clock()
        return gate if gate > 0 else None

    def _exceeded(self, queue: _Queue, waiter: _Waiter, retry_after: float | None) -> RateLimitExceeded:
        self.stats.timeouts += 1
        key = f" for key {queue.key!r}" if queue.key else ""
        hint = f"; retry after about {retry_after:.3g}s" if retry_after is not None else ""
        return RateLimitExceeded(f"rate limit {queue.label}{key}: not admitted before the timeout{hint}",
                                 retry_after=retry_after, limit=queue.label, key=queue.key)

    # -- pauses, adaptation, corrections ------------------------------------------------------------------

    async def _sync_pause(self, queue: _Queue, now: float) -> None:
        queue.next_sync = now + self._pause_check
        if self._extras is None:
            queue.next_sync = math.inf
            return
        self.stats.storage_calls += 1
        self.stats.pause_reads += 1
        until = await self._extras.get_pause([w.key for w in queue.windows])
        if until > queue.paused_until:
            self.stats.pauses += 1
            self._apply_pause(queue.windows, until)

    def _apply_pause(self, windows: Sequence[_Window], until: float) -> None:
        for window in windows:
            window.paused_until = max(window.paused_until, until)
            for queue in window.queues:
                queue.paused_until = max(queue.paused_until, until)

    async def _pause(self, windows: Sequence[_Window], seconds: float) -> None:
        now = self._clock()
        until = now + seconds
        self.stats.pauses += 1
        self._apply_pause(windows, until)
        if self._extras is not None and seconds > 0:
            self.stats.storage_calls += len(windows)
            await self._extras.set_pause([w.key for w in windows], until, time.time())

    def _decrease(self, windows: Sequence[_Window], admitted_at: float, adaptive: Adaptive) -> None:
        now = self._clock()
        for window in windows:
            if admitted_at < window.decreased_at:
                continue  # sent before the last decrease, at the old rate: not news
            window.fraction = max(adaptive.floor, window.fraction * adaptive.decrease)
            window.amount = max(1, int(window.nominal * window.fraction))
            window.decreased_at = window.changed_at = now

    def _increase(self, windows: Sequence[_Window], adaptive: Adaptive) -> None:
        now = self._clock()
        for window in windows:
            if window.fraction < 1.0:
                period = adaptive.period if adaptive.period is not None else window.expiry
                if now - window.changed_at >= cast(float, period):
                    window.fraction = min(1.0, window.fraction + adaptive.increase)
                    window.amount = max(1, int(window.nominal * window.fraction + 1e-9))
                    window.changed_at = now

    async def _correct(self, queue: _Queue, estimated: tuple[int, ...], actual: Sequence[int | None],
                       since: float) -> None:
        """Charge the units used beyond the estimate (or carry them to the next call), return the excess."""
        strategy = queue.strategy
        hit = strategy.hit
        assert hit is not None
        for window, guess, used in zip(queue.windows, estimated, actual, strict=True):
            if used is None:
                continue
            delta = used - guess
            if delta > 0:
                units = min(delta, window.amount)
                self.stats.storage_calls += 1
                # The fixed window counts a refused hit too, so for it the charge is done either way.
                charged = units if await hit(window, cost=units) or strategy.consumes_on_refusal else 0
                window.debt += delta - charged
            elif delta < 0 and strategy.code == "mw":
                await self._give_back(strategy, window, -delta, since)
                self._kick(queue)

    # -- public API ---------------------------------------------------------------------------------------

    def _limits(self, specs: Sequence[str | Limit], strategy: str | None) -> tuple[tuple[Limit, ...], _Strategy]:
        name = self.strategy if strategy is None else _strategy_name(strategy, "strategy")
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
        per_limit = _cost_plan(limits, cost, "cost")
        costs: list[int] = []
        for limit, value in zip(limits, per_limit, strict=True):
            units = _units(value, limit, key)
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
            if len(self._calls) < _SWEEP_AT and all(isinstance(s, str) for s in limits):
                self._calls[ident] = found
        resolved, queue, costs = found
        if cost is not None:
            costs = self._expand(resolved, cost, str(key))
        wait = None if timeout is None else parse_duration(timeout, "timeout", allow_zero=True)
        since = await self._acquire(queue, costs, wait)
        return Permit(self, queue, resolved, costs, since, _adaptive(adaptive))

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
            if retry_after != _NOT_RATE_LIMITED:
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
        await self._pause(queue.windows, parse_duration(seconds, "seconds", allow_zero=True))

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

    def __init__(self, limiter: RateLimiter, queue: _Queue, limits: tuple[Limit, ...], costs: tuple[int, ...],
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
        per_limit = _cost_plan(self._limits, actual, "actual", default=None)
        out: list[int | None] = []
        for limit, value in zip(self._limits, per_limit, strict=True):
            units = None if value is None else _units(value, limit, self._queue.key, check=False)
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


def _adaptive(value: Adaptive | bool | None) -> Adaptive | None:
    if value is True:
        return Adaptive()
    if value is False or value is None:
        return None
    if isinstance(value, Adaptive):
        return value
    raise ConfigError("adaptive", value, "expected True, False or an Adaptive(...)")


def _cost_plan(limits: Sequence[Limit], cost: Any, field: str, default: Any = 1) -> list[Any]:
    """Spread ``cost`` over ``limits``: a mapping by name, or one value for the only or all-but-first limits."""
    if cost is None:
        return [default] * len(limits)
    if isinstance(cost, Mapping):
        names = {limit.name for limit in limits} | {limit.spec for limit in limits}
        unknown = sorted(str(k) for k in cost if k not in names)
        if unknown:
            raise ConfigError(f"{field}[{unknown[0]!r}]", cost[unknown[0]],
                              f"not one of this call's limits ({', '.join(limit.name for limit in limits)})")
        return [cost.get(limit.name, cost.get(limit.spec, default)) for limit in limits]
    if len(limits) == 1:
        return [cost]
    return [default, *([cost] * (len(limits) - 1))]


def _units(value: Any, limit: Limit, key: str, *, check: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"the cost for limit {limit} must be a number of units, got {value!r}")
    units = math.ceil(value)
    if units < 0:
        raise ValueError(f"the cost for limit {limit} must not be negative, got {value!r}")
    if check and units > limit.amount:
        where = f" (key {key!r})" if key else ""
        raise RateLimitExceeded(f"a cost of {units} can never fit limit {limit}{where}, which allows "
                                f"{limit.amount} per window", retry_after=None, limit=limit.name, key=key)
    return units


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


# -- the engine of one decorated function ----------------------------------------------------------------


class _ArgFunction:
    """A user function of the call's arguments, called with the arguments it names (all, with ``**kw``)."""

    __slots__ = ("fn", "names")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.names: frozenset[str] | None = None
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            self.names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def __call__(self, arguments: Mapping[str, Any]) -> Any:
        if self.names is None:
            return self.fn(**arguments)
        return self.fn(**{k: v for k, v in arguments.items() if k in self.names})


class _Binding:
    """A decorated function's limits resolved under one engine and settings generation."""

    __slots__ = ("engine", "generation", "limits", "queues", "static", "strategy")

    def __init__(self, engine: RateLimiter, limits: tuple[Limit, ...], strategy: _Strategy,
                 static: tuple[int, ...] | None, generation: int) -> None:
        self.engine = engine
        self.limits = limits
        self.strategy = strategy
        self.static = static
        self.generation = generation
        self.queues: dict[str, _Queue] = {}


class LimitedFunction(Generic[P, T]):
    """The engine of one function decorated with `rate_limited`; its ``wrapper`` is what users call.

    The wrapper is a plain ``async def`` (it binds as a method). Per call it computes the key and the
    costs, waits for admission, calls the function, and settles: on a rate-limit error it pauses the key
    (every process), lowers the rate in adaptive mode and retries if asked; on success it raises the rate
    back in adaptive mode and charges the actual cost if ``actual=`` says it.

    Raises:
        ConfigError: A limit string, ``cost`` mapping, ``timeout``, ``strategy``, ``storage``, retry or
            adaptive setting is invalid (the message names it).
        TypeError: ``fn`` is not an async function.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        limits: Sequence[str | Limit],
        *,
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
        actual: Callable[[T], int | float] | Mapping[str, Callable[[T], int | float]] | None = None,
        name: str | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"rate_limited needs an async function, got {fn!r}")
        self._fn = fn
        self.identity = name or function_identity(fn)
        if not limits:
            raise ConfigError("rate_limited.limits", (), "give at least one limit, e.g. "
                                                         "@rate_limited('llm-rpm') or @rate_limited('3500/minute')")
        self._specs: list[str | Limit] = []
        for i, spec in enumerate(limits):
            field = f"rate_limited.limits[{i}]"
            if isinstance(spec, Limit):
                self._specs.append(spec)
            elif not isinstance(spec, str) or not spec.strip():
                raise ConfigError(field, spec, "expected a limit name from the settings or a limit like "
                                               "'3500/minute'")
            elif _looks_like_spec(spec):
                inline = parse_limit(spec, field)
                self._specs.append(Limit(f"{self.identity}#{inline.spec}", inline.spec, inline.items))
            elif _NAME.match(spec.strip()):
                self._specs.append(spec.strip())
            else:
                raise ConfigError(field, spec, "neither a limit name (letters, digits, '-', '_', '.') nor a limit "
                                               "like '3500/minute'")
        self._names = [s.name if isinstance(s, Limit) else s for s in self._specs]
        self._cost_plan = self._plan(cost, "cost", 1)
        self._actual_plan = self._plan(actual, "actual", None) if actual is not None else None
        if self._actual_plan is not None and not all(a is None or callable(a) for a in self._actual_plan):
            raise ConfigError("actual", actual, "expected a function of the result, or a mapping of them")
        self._actual_fns = (None if self._actual_plan is None
                            else [None if a is None else a for a in self._actual_plan])
        self._key = _ArgFunction(key) if key is not None else None
        if key is not None and not callable(key):
            raise ConfigError("key", key, "expected a function of the call's arguments")
        self._timeout = None if timeout is None else parse_duration(timeout, "timeout", allow_zero=True)
        self._strategy = None if strategy is None else _strategy_name(strategy, "strategy")
        if storage is not None:
            limits_storage_url(storage, "storage")
        self._storage = storage
        self._limiter = limiter
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError("retries", retries, "expected a number of retries >= 0")
        self._retries = retries
        self._backoff = parse_duration(backoff, "backoff")
        self._max_backoff = parse_duration(max_backoff, "max_backoff")
        self._adaptive = _adaptive(adaptive)
        if rate_limit_error is not None and not callable(rate_limit_error):
            raise ConfigError("rate_limit_error", rate_limit_error, "expected a function of the exception")
        self._predicate = rate_limit_error
        self._signature = inspect.signature(fn)
        self._needs_arguments = self._key is not None or any(callable(c) for c in self._cost_plan)
        self._binding: _Binding | None = None
        if all(isinstance(s, Limit) for s in self._specs):  # all known: a fixed cost above one is a config error
            for spec, entry in zip(self._specs, self._cost_plan, strict=True):
                assert isinstance(spec, Limit)
                if not callable(entry):
                    try:
                        _units(entry, spec, "")
                    except (RateLimitExceeded, TypeError, ValueError) as exc:
                        raise ConfigError("cost", entry, str(exc)) from None
        self.wrapper = self._build_wrapper()

    def _plan(self, value: Any, field: str, default: Any) -> list[Any]:
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in self._names and not any(
                isinstance(s, Limit) and s.spec == k for s in self._specs))
            if unknown:
                raise ConfigError(f"{field}[{unknown[0]!r}]", value[unknown[0]],
                                  f"not one of the limits ({', '.join(map(str, self._names))})")
            plan = [value.get(n, default) for n in self._names]
            for i, s in enumerate(self._specs):
                if isinstance(s, Limit) and s.spec in value:
                    plan[i] = value[s.spec]
        elif value is None:
            plan = [default] * len(self._specs)
        elif len(self._specs) == 1:
            plan = [value]
        else:
            plan = [default, *([value] * (len(self._specs) - 1))]
        for entry in plan:
            if entry is not default and not callable(entry) and (
                    isinstance(entry, bool) or not isinstance(entry, int | float) or entry < 0):
                raise ConfigError(field, entry, "expected a number of units >= 0 or a function of the call's "
                                                "arguments")
        return [(_ArgFunction(e) if callable(e) and field == "cost" else e) for e in plan]

    # -- binding ----------------------------------------------------------------------------------------

    def _bind(self) -> _Binding:
        engine = self._limiter or default_limiter(self._storage)
        limits = tuple(engine.resolve(s, f"rate_limited.limits[{i}]") for i, s in enumerate(self._specs))
        strategy = engine._strategy(self._strategy or engine.strategy)
        static: tuple[int, ...] | None = None
        if not any(callable(c) for c in self._cost_plan):
            costs: list[int] = []
            for limit, entry in zip(limits, self._cost_plan, strict=True):
                costs.extend([_units(entry, limit, "")] * len(limit.items))
            static = tuple(costs)
        binding = self._binding = _Binding(engine, limits, strategy, static, tracker.generation)
        return binding

    @property
    def limiter(self) -> RateLimiter:
        """The engine this function waits in now."""
        return self._current().engine

    def _current(self) -> _Binding:
        binding = self._binding
        if binding is None or binding.generation != tracker.generation:
            binding = self._bind()
        return binding

    def _queue(self, binding: _Binding, key: str) -> _Queue:
        queue = binding.queues.get(key)
        if queue is None:
            if len(binding.queues) >= _SWEEP_AT:
                self._sweep(binding)
            queue = binding.queues[key] = binding.engine._queue(binding.limits, key, binding.strategy)
        return queue

    @staticmethod
    def _sweep(binding: _Binding) -> None:
        now = binding.engine._clock()
        for key, queue in list(binding.queues.items()):
            if not queue.waiters and not queue.held and queue.blocked_until < now and queue.paused_until < now:
                del binding.queues[key]
                binding.engine._forget(queue)

    def _costs(self, binding: _Binding, arguments: Mapping[str, Any], key: str) -> tuple[int, ...]:
        costs: list[int] = []
        for limit, entry in zip(binding.limits, self._cost_plan, strict=True):
            value = entry(arguments) if callable(entry) else entry
            costs.extend([_units(value, limit, key)] * len(limit.items))
        return tuple(costs)

    def _arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def _actual_costs(self, binding: _Binding, result: Any) -> tuple[int | None, ...] | None:
        if self._actual_fns is None:
            return None
        out: list[int | None] = []
        for limit, fn in zip(binding.limits, self._actual_fns, strict=True):
            units = None
            if fn is not None:
                units = _units(fn(result), limit, "", check=False)
            out.extend([units] * len(limit.items))
        return tuple(out)

    def _delay(self, attempt: int, retry_after: float | None) -> tuple[float, float]:
        """``(pause for every caller of the key, this caller's wait before retrying)`` after a rate-limit error.

        The back-off doubles per attempt up to ``max_backoff``; each caller waits a random time between half
        of it and all of it ("equal jitter"), so retries spread out, and never less than the Retry-After. The
        shared pause is the Retry-After, or half the back-off (the least any retry waits) when there is none.
        """
        backoff = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
        jittered = backoff / 2 + random.uniform(0, backoff / 2)
        if retry_after is None:
            return backoff / 2, jittered
        return retry_after, max(retry_after, jittered)

    # -- calls --------------------------------------------------------------------------------------------

    async def call(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function under its limits (what the wrapper does)."""
        binding = self._binding
        if binding is None or binding.generation != tracker.generation:
            binding = self._bind()
        if self._needs_arguments:
            arguments = self._arguments(args, kwargs)
            key = "" if self._key is None else str(self._key(arguments))
            costs = self._costs(binding, arguments, key)
        else:
            key = ""
            costs = binding.static  # type: ignore[assignment]
        queue = binding.queues.get(key) or self._queue(binding, key)
        engine = binding.engine
        attempt = 0
        while True:
            since = await engine._acquire(queue, costs, self._timeout)
            try:
                result = await self._fn(*args, **kwargs)
            except Exception as exc:
                retry_after = rate_limit_retry_after(exc, self._predicate)
                if retry_after == _NOT_RATE_LIMITED:
                    raise
                attempt += 1
                engine.stats.rate_limit_errors += 1
                if self._adaptive is not None:
                    engine._decrease(queue.windows, since, self._adaptive)
                pause, wait = self._delay(attempt, retry_after)
                await engine._pause(queue.windows, pause)
                if attempt > self._retries:
                    raise
                engine.stats.retries += 1
                await anyio.sleep(wait)
                continue
            if self._adaptive is not None:
                engine._increase(queue.windows, self._adaptive)
            if self._actual_fns is not None:
                actual = self._actual_costs(binding, result)
                if actual is not None:
                    await engine._correct(queue, costs, actual, since)
            return result

    def _build_wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        call = self.call

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await call(*args, **kwargs)

        functools.update_wrapper(wrapper, self._fn)
        wrapper.rate_limit = self  # type: ignore[attr-defined]
        return wrapper

    def __repr__(self) -> str:
        return f"<LimitedFunction of {self.identity} under {', '.join(map(str, self._names))}>"
