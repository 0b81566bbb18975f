"""Storage for rate limits: the ``limits`` library's storages, plus what the limiter engine needs besides.

The rate limiter keeps its windows in a storage of the `limits <https://limits.readthedocs.io>`_ library and
lets limits' strategies do the window arithmetic. This module supplies three things limits lacks:

* `MemoryLimitStorage`, an in-process storage with the same data model as limits' own memory storage but
  no asyncio task, lock or timer (so it works under asyncio *and* trio and costs nothing while idle), an
  injectable clock (for virtual-time tests) and a compact moving window (one entry per acquisition, not
  one per unit, so token limits in the millions stay cheap);
* `limits_storage_url`, which maps cachelayers backend URLs (``redis://``, ``rediss://``,
  ``redis+cluster://``, ``unix://``, ``memory://``, registered in `cachelayers.backends.registry` with kind
  ``"limits"``) to limits' ``async+…`` URLs, and `create_limits_storage`;
* `RedisLimitExtras`: returning units to a Redis moving window (refunds) and a pause flag shared by every
  process (Retry-After), through the Redis client of limits' own storage.

Everything here only stores; waiting, fairness and policy live in `cachelayers.engines.limiter`.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import Any, Final

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from cachelayers.backends.base import BackendURL
from cachelayers.backends.registry import load, registered_schemes
from cachelayers.durations import parse_duration
from cachelayers.errors import ConfigError

__all__ = ["LIMITS_KEY_SUFFIX", "MemoryLimitStorage", "RedisLimitExtras", "create_limits_storage",
           "limits_storage_url", "memory_limits_url", "redis_limits_url", "supports_refund"]

LIMITS_KEY_SUFFIX: Final = "rl"
"""Appended to the settings' ``key_prefix`` to make the prefix of every rate-limit key in Redis."""

_REDIS_SCHEMES: Final = {
    "redis": "async+redis",
    "rediss": "async+rediss",
    "redis+cluster": "async+redis+cluster",
    "redis+sentinel": "async+redis+sentinel",
    "unix": "async+redis+unix",
}
_SWEEP_EVERY: Final = 4096  # writes between sweeps of keys nobody touches any more


class _Runs:
    """A moving window: acquisition times (oldest first) with the cumulative units taken up to each."""

    __slots__ = ("base", "cum", "expiry", "times")

    def __init__(self, expiry: float) -> None:
        self.times: list[float] = []
        self.cum: list[int] = []
        self.base = 0  # cumulative count before times[0] (entries trimmed off the front)
        self.expiry = expiry


class MemoryLimitStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    """In-process rate-limit storage for limits' async strategies, free of asyncio and background tasks.

    It offers what limits' ``MemoryStorage`` offers (counters with expiry for the fixed window, two counters
    for the sliding-window counter, a timestamp log for the moving window) with the same semantics, but:
    every operation completes without suspending (one event loop thread owns it, so no lock is needed),
    expired data is dropped lazily when touched and by an occasional sweep (no timer), the moving window keeps
    one entry per acquisition with a running total (cost 2,000 is one entry, not 2,000), and time comes
    from ``clock``.

    Args:
        uri: Ignored; accepted for symmetry with limits' storages.
        clock: Wall-clock time source; tests pass a virtual clock.
        wrap_exceptions: As in limits.
    """

    STORAGE_SCHEME = None  # not registered with limits' storage_from_string
    never_suspends = True  # every operation completes without yielding to the event loop

    def __init__(self, uri: str | None = None, *, clock: Callable[[], float] = time.time,
                 wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.clock = clock
        self.counters: dict[str, int] = {}
        self.expirations: dict[str, float] = {}
        self.events: dict[str, _Runs] = {}
        self._writes = 0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    # -- counters (fixed window, sliding-window counter) ------------------------------------------------

    def _live(self, key: str, now: float) -> int:
        if key in self.expirations and self.expirations[key] <= now:
            del self.expirations[key]
            self.counters.pop(key, None)
        return self.counters.get(key, 0)

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add ``amount`` to the counter ``key``; a new counter expires ``expiry`` seconds from now.

        A negative amount on a counter that no longer exists does nothing: returning units to a window that
        has already rolled over must not lend the next window extra room.
        """
        now = self.clock()
        current = self._live(key, now)
        if key not in self.counters:
            if amount <= 0:
                return 0
            self.expirations[key] = now + expiry
            self._wrote(now)
        value = current + amount
        self.counters[key] = value
        return value

    async def decr(self, key: str, amount: int = 1) -> int:
        """Subtract ``amount`` from the counter ``key``, not below zero."""
        current = self._live(key, self.clock())
        if key not in self.counters:
            return 0
        value = max(current - amount, 0)
        self.counters[key] = value
        return value

    async def get(self, key: str) -> int:
        """The counter ``key``, 0 when absent or expired."""
        return self._live(key, self.clock())

    async def get_expiry(self, key: str) -> float:
        """When the counter ``key`` expires (now when absent)."""
        now = self.clock()
        self._live(key, now)
        return self.expirations.get(key, now)

    async def clear(self, key: str) -> None:
        """Forget ``key`` in every structure."""
        self.counters.pop(key, None)
        self.expirations.pop(key, None)
        self.events.pop(key, None)

    async def check(self) -> bool:
        """Always healthy."""
        return True

    async def reset(self) -> int | None:
        """Forget everything; return how many keys there were."""
        count = len(self.counters) + len(self.events)
        self.counters.clear()
        self.expirations.clear()
        self.events.clear()
        return count

    # -- moving window --------------------------------------------------------------------------------------

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Take ``amount`` units if the newest ``limit - amount`` units leave room, as limits' moving window.

        Same rule as limits: refused when the unit ``limit - amount`` places behind the newest was taken
        within the last ``expiry`` seconds (a closed window: a unit taken exactly ``expiry`` ago still counts).
        """
        if amount > limit:
            return False
        if amount <= 0:
            return True
        now = self.clock()
        runs = self.events.get(key)
        if runs is None:
            runs = self.events[key] = _Runs(expiry)
            self._wrote(now)
        else:
            cum = runs.cum
            if cum:
                unit = cum[-1] - (limit - amount)
                if unit > runs.base and runs.times[bisect_left(cum, unit)] >= now - expiry:
                    return False
            runs.expiry = expiry
        times = runs.times
        cum = runs.cum
        total = cum[-1] if cum else runs.base
        times.append(now)
        cum.append(total + amount)
        if len(times) > 32:
            # Entries wholly outside the newest `limit` units, or older than the window, can never matter.
            cut = max(bisect_right(cum, total + amount - limit), bisect_left(times, now - expiry))
            if cut * 2 >= len(times):
                runs.base = cum[cut - 1]
                del times[:cut]
                del cum[:cut]
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """``(time of the oldest unit in the window, units in the window)`` among the newest ``limit`` units."""
        now = self.clock()
        runs = self.events.get(key)
        if runs is None or not runs.cum:
            return now, 0
        cum = runs.cum
        lowest = cum[-1] - limit  # units numbered above this are the newest `limit`
        first = max(bisect_right(cum, lowest), bisect_left(runs.times, now - expiry))
        if first >= len(cum):
            return now, 0
        before = cum[first - 1] if first else runs.base
        return runs.times[first], cum[-1] - max(before, lowest)

    def refund_entry(self, key: str, amount: int, since: float) -> int:
        """Return up to ``amount`` units taken at or after ``since``; return how many were returned.

        The oldest such units go first, so what remains is never older than what was really taken: a refund
        can only make the window stricter than the truth, never looser.
        """
        runs = self.events.get(key)
        if runs is None or amount <= 0 or not runs.cum:
            return 0
        times, cum = runs.times, runs.cum
        start = bisect_left(times, since)
        counts = [cum[i] - (cum[i - 1] if i else runs.base) for i in range(start, len(cum))]
        left = amount
        for j, count in enumerate(counts):
            take = min(count, left)
            counts[j] -= take
            left -= take
            if not left:
                break
        kept_times = [t for t, c in zip(times[start:], counts, strict=True) if c]
        kept_counts = [c for c in counts if c]
        total = cum[start - 1] if start else runs.base
        del times[start:]
        del cum[start:]
        for t, c in zip(kept_times, kept_counts, strict=True):
            total += c
            times.append(t)
            cum.append(total)
        return amount - left

    # -- sliding-window counter ----------------------------------------------------------------------------

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Take ``amount`` units if the weighted count leaves room, as limits' memory storage does."""
        if amount > limit:
            return False
        now = self.clock()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous_count, previous_ttl, current_count, _ = self._sliding_info(previous_key, current_key, expiry, now)
        if int(previous_count * previous_ttl / expiry + current_count) + amount > limit:
            return False
        await self.incr(current_key, 2 * expiry, amount=amount)
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """``(previous count, previous TTL, current count, current TTL)`` of the sliding-window counter."""
        now = self.clock()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        return self._sliding_info(previous_key, current_key, expiry, now)

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Forget both counters of a sliding window."""
        previous_key, current_key = self.sliding_window_keys(key, expiry, self.clock())
        await self.clear(current_key)
        await self.clear(previous_key)

    def _sliding_info(self, previous_key: str, current_key: str, expiry: int,
                      now: float) -> tuple[int, float, int, float]:
        previous_count = self._live(previous_key, now)
        current_count = self._live(current_key, now)
        previous_ttl = 0.0 if previous_count == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous_count, previous_ttl, current_count, current_ttl

    # -- housekeeping -------------------------------------------------------------------------------------

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            for key in [k for k, at in self.expirations.items() if at <= now]:
                del self.expirations[key]
                self.counters.pop(key, None)
            for key in [k for k, r in self.events.items() if not r.times or r.times[-1] < now - r.expiry]:
                del self.events[key]


def supports_refund(storage: object) -> bool:
    """Whether units taken from a moving window of ``storage`` can be returned."""
    return isinstance(storage, MemoryLimitStorage) or RedisLimitExtras.usable(storage)


def limits_storage_url(url: str, field: str = "storage") -> tuple[str, dict[str, Any]]:
    """Map a cachelayers storage URL to limits' async URL and the client options it implies.

    The scheme is looked up in `cachelayers.backends.registry` (kind ``"limits"``): ``redis://h:p/0`` →
    ``async+redis://h:p/0``; ``rediss://``, ``redis+cluster://``, ``redis+sentinel://`` and
    ``unix:///path?db=N`` likewise; ``memory://`` stays; limits' own ``async+…`` URLs pass through unchanged.
    The Redis tier's options ``timeout`` and ``connect_timeout`` become the client's socket timeouts; TLS and
    pool options are passed on; the others only concern the cache tier.

    Raises:
        ConfigError: The URL is malformed or its scheme is not one rate limits can be stored in.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(field, url, "expected a storage URL such as 'memory://' or 'redis://localhost:6379/0'")
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("async+"):
        return url, {}
    known = registered_schemes("limits")
    if scheme not in known:
        redis = [s for s in _REDIS_SCHEMES if s in known]
        others = [s for s in known if s != "memory" and s not in _REDIS_SCHEMES]
        more = f" or {', '.join(f'{s}://' for s in others)}" if others else ""
        raise ConfigError(field, url, f"rate limits can be stored in memory:// or Redis "
                                      f"({', '.join(f'{s}://' for s in redis)}){more}, not {scheme}://")
    lookup = BackendURL(url=url, scheme=scheme, host=None, port=None, path="", username=None, password=None,
                        field=field)  # the mapper parses the URL itself: only the scheme matters here
    mapper: Callable[[str, str], tuple[str, dict[str, Any]]] = load(lookup, "limits")
    return mapper(url, field)


def memory_limits_url(url: str, field: str) -> tuple[str, dict[str, Any]]:
    """What ``memory://`` maps to: ``("memory://", {})`` (see `limits_storage_url`)."""
    return "memory://", {}


def redis_limits_url(url: str, field: str) -> tuple[str, dict[str, Any]]:
    """Map a Redis URL to limits' ``async+…`` URL and its client options (see `limits_storage_url`).

    Raises:
        ConfigError: The URL is malformed or an option's value is invalid.
    """
    parsed = BackendURL.parse(url, field)
    options: dict[str, Any] = {}
    query: list[str] = []
    for name, value in parsed.options.items():
        if name in ("timeout", "connect_timeout"):
            options["socket_timeout" if name == "timeout" else "socket_connect_timeout"] = parse_duration(
                value, parsed.option_field(name))
        elif name == "db":
            query.append(f"db={value}")
        elif name in ("max_connections",):
            options[name] = int(value)
        elif name.startswith("ssl_") or name == "client_name":
            options[name] = value
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_connect_timeout", options["socket_timeout"])
    rest = url.split("://", 1)[1].split("?", 1)[0]
    mapped = f"{_REDIS_SCHEMES[parsed.scheme]}://{rest}" + (f"?{'&'.join(query)}" if query else "")
    return mapped, options


def create_limits_storage(url: str, *, key_prefix: str = "cl:", clock: Callable[[], float] = time.time,
                          field: str = "storage") -> Storage:
    """Build the limits storage for ``url`` (see `limits_storage_url`).

    ``memory://`` gives a `MemoryLimitStorage` on ``clock``; Redis URLs give limits' ``RedisStorage`` (the
    redis-py implementation) whose keys start with ``key_prefix + "rl:"``.

    Raises:
        ConfigError: The URL is not a usable storage URL.
        MissingDependencyError: ``redis`` is not installed.
    """
    mapped, options = limits_storage_url(url, field)
    if mapped == "memory://":
        return MemoryLimitStorage(clock=clock)
    import importlib.util

    if importlib.util.find_spec("redis") is None:
        from cachelayers.errors import MissingDependencyError

        raise MissingDependencyError(field, url, "redis", "redis")
    from limits.storage import storage_from_string

    try:
        storage = storage_from_string(mapped, implementation="redispy",
                                      key_prefix=f"{key_prefix}{LIMITS_KEY_SUFFIX}", **options)
    except Exception as exc:  # limits raises ConfigurationError or the driver's errors for bad URLs
        raise ConfigError(field, url, f"cannot make a rate-limit storage: {exc}") from exc
    if not isinstance(storage, Storage):
        raise ConfigError(field, url, "not an async storage")
    return storage


# Returns up to ARGV[2] units taken at or after ARGV[1] to a moving window (a list of timestamps, newest
# first). The oldest of those recent entries are removed, so the entries kept are never older than the units
# really in use: a refund can only make the window stricter than the truth. The key keeps its TTL.
_REFUND_LUA: Final = """
local since = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local ttl = redis.call('pttl', KEYS[1])
local recent = {}
local start = 0
while true do
  local part = redis.call('lrange', KEYS[1], start, start + 255)
  local stop = #part < 256
  for i = 1, #part do
    if tonumber(part[i]) < since then stop = true break end
    recent[#recent + 1] = part[i]
  end
  if stop then break end
  start = start + 256
end
local n = #recent
if n == 0 then return 0 end
local removed = math.min(amount, n)
table.sort(recent, function(a, b) return tonumber(a) > tonumber(b) end)
redis.call('ltrim', KEYS[1], n, -1)
for i = n - removed, 1, -1 do
  redis.call('lpush', KEYS[1], recent[i])
end
if ttl > 0 and redis.call('exists', KEYS[1]) == 1 then redis.call('pexpire', KEYS[1], ttl) end
return removed
"""

# Sets a pause flag (the pause's end, in ms since the epoch) unless a longer pause is already set.
_PAUSE_LUA: Final = """
local current = tonumber(redis.call('get', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class RedisLimitExtras:
    """Refunds and shared pause flags for limits' ``RedisStorage`` (redis-py implementation).

    It talks through the storage's own Redis client and key prefix, so it shares its connections and its
    event loop.
    """

    def __init__(self, storage: Storage) -> None:
        bridge = storage.bridge  # type: ignore[attr-defined]
        self._bridge = bridge
        self._client = bridge.get_connection()
        self._refund = self._client.register_script(_REFUND_LUA)
        self._pause = self._client.register_script(_PAUSE_LUA)

    @staticmethod
    def usable(storage: object) -> bool:
        """Whether ``storage`` is a limits Redis storage with a redis-py client."""
        bridge = getattr(storage, "bridge", None)
        return bridge is not None and hasattr(bridge, "get_connection") and hasattr(bridge, "prefixed_key") \
            and type(bridge).__name__ == "RedispyBridge"

    def pause_key(self, window_key: str) -> str:
        """The Redis key of the pause flag of a window."""
        return str(self._bridge.prefixed_key(f"pause/{window_key}"))

    async def refund(self, window_key: str, amount: int, since: float) -> int:
        """Return up to ``amount`` units of the moving window ``window_key`` taken at or after ``since``."""
        return int(await self._refund([self._bridge.prefixed_key(window_key)], [repr(since), amount]))

    async def set_pause(self, window_keys: Sequence[str], until: float, now: float) -> None:
        """Pause every window in ``window_keys`` until the wall-clock time ``until``, in every process."""
        px = max(1, int((until - now) * 1000))
        until_ms = int(until * 1000)
        for key in window_keys:  # one key per call: cluster-safe, and pauses are rare
            await self._pause([self.pause_key(key)], [until_ms, px])

    async def get_pause(self, window_keys: Sequence[str]) -> float:
        """The latest pause end (wall clock, seconds) among ``window_keys``; 0 when none is paused."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key in window_keys:
                pipe.get(self.pause_key(key))
            values = await pipe.execute()
        return max((int(v) / 1000 for v in values if v is not None), default=0.0)

    async def aclose(self) -> None:
        """Close the Redis client's connections."""
        await self._client.aclose()
