"""A tier below memory as the engine uses it: timeout, circuit breaker, counters, fail-open; and `Stale`, a value
served past its expiry within its grace period."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from cachelayers.backends import Backend, StoreItem
from cachelayers.backends.base import BackendBusyError, ClearPrefixSupport, DeadlineSupport
from cachelayers.breaker import CircuitBreaker
from cachelayers.errors import BackendError
from cachelayers.metrics import StateLog, TierStats
from cachelayers.settings import Settings

__all__ = ["FailureCounter", "Stale", "Tier"]

T = TypeVar("T")


class Stale:
    """A value served past its expiry, within its grace period (``stale=``): serve it, refresh it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class FailureCounter(Protocol):
    """What a tier tells of its failures: the engine's count of failures of any tier."""

    failures: int


class Tier:
    """A tier below memory as the engine uses it: timeout, circuit breaker, counters, fail-open."""

    __slots__ = ("backend", "breaker", "busy_reads", "cache", "failure_serial", "label", "log", "name", "read_within",
                 "stats", "strict", "timeout", "write_breaker", "write_within", "writes_failing")

    def __init__(self, name: str, backend: Backend, settings: Settings, log: StateLog,
                 monotonic: Callable[[], float], cache: FailureCounter) -> None:
        self.name = name
        self.backend = backend
        self.cache = cache
        self.timeout: float = settings.tier_timeout
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown, monotonic)
        # Writes have a breaker of their own: a tier may answer reads while its writes keep failing (another
        # process holds the disk tier's write lock and hangs; a Redis out of memory refuses writes), and a read
        # that succeeds must not keep every miss paying a write timeout. A failed read counts against both.
        self.write_breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown, monotonic)
        self.stats = TierStats(name)
        self.log = log
        self.strict = settings.strict
        # A backend that enforces the timeout on its own reads is called without a cancel scope, which on
        # asyncio costs a noticeable share of a Redis hit.
        self.read_within = backend.get_many_within if isinstance(backend, DeadlineSupport) else None
        # Such a backend bounds its writes too, and tells waiting for a connection (congestion: the write is
        # skipped, BackendBusyError) from a failure.
        self.write_within = backend.set_many_within if isinstance(backend, DeadlineSupport) else None
        self.busy_reads = f"reads of tier {name!r}"
        self.label = f"tier {name!r}"
        self.writes_failing = False
        """Whether the last write that reached the tier failed (reads working do not close the write breaker)."""
        self.failure_serial = 0
        """`TieredCache.failures` when this tier last failed: a call that started before skips its writes."""

    async def call(self, op: Callable[[], Awaitable[T]], default: T, *, scoped: bool = True,
                   write: bool = True) -> T:
        """Run ``op`` under the tier's timeout and breaker; on failure count, log and return ``default``.

        ``scoped=False`` when ``op`` bounds itself by the tier timeout; otherwise it runs in the backend's
        `Backend.within` scope. ``write=False`` for an ``op`` that only reads: it answers to the read breaker.
        A `BackendBusyError` (the backend was congested: no connection free in time, or busy with other callers)
        is counted as ``skipped``: not a failure, the breaker does not move.
        """
        breaker = self.write_breaker if write else self.breaker
        if not breaker.allow():
            self.stats.skipped += 1
            return default
        try:
            if scoped:
                with self.backend.within(self.timeout):
                    result = await op()
            else:
                result = await op()
        except BackendBusyError as exc:
            self.stats.skipped += 1
            self.log.failure(f"writes to tier {self.name!r}", f"skipped, the tier is congested: {exc}")
            return default
        except TimeoutError as exc:
            self.stats.timeouts += 1
            self._failed(exc, f"timed out after {self.timeout:g}s" + (f" ({exc})" if str(exc) else ""), write=write)
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}", write=write)
        else:
            if write:
                self.writes_failing = False
                breaker.success()
                if self.breaker.state == "closed":
                    self.log.recovered(self.label)
            else:
                self._read_succeeded()
            return result
        return default

    def _read_succeeded(self) -> None:
        """A read worked: close the read breaker, and the write breaker too unless writes themselves failed
        (then only a write that lands closes it, and only then is the tier logged as recovered)."""
        self.breaker.success()
        if not self.writes_failing:
            self.write_breaker.success()
            self.log.recovered(self.label)

    def _failed(self, exc: BaseException, message: str, *, write: bool) -> None:
        """Count a failure: a write's against the write breaker, a read's against both (a tier that cannot
        answer a read is not written to either)."""
        cache = self.cache
        cache.failures += 1
        self.failure_serial = cache.failures
        if write:
            self.writes_failing = True
            opened = self.write_breaker.failure()
        else:
            opened = self.breaker.failure()
            if opened:  # and writes wait as long as reads do: a hung tier costs a call at most one timeout
                self.write_breaker.trip()
            else:
                self.write_breaker.failure()
        self.log.failure(self.label, message + (" (circuit breaker open)" if opened else ""))
        if self.strict:
            raise BackendError(f"tier {self.name!r} {message}") from exc

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Read ``keys``; ``None`` when the tier failed, timed out or its breaker is open."""
        if not self.breaker.allow():
            self.stats.skipped += 1
            return None
        read = self.read_within
        try:
            if read is not None:
                blobs = await read(keys, self.timeout)
            else:
                with self.backend.within(self.timeout):
                    blobs = await self.backend.get_many(keys)
        except BackendBusyError as exc:
            self.stats.skipped += 1
            self.log.failure(self.busy_reads, f"skipped, the tier is congested: {exc}")
            return None
        except TimeoutError as exc:
            self.stats.timeouts += 1
            self._failed(exc, f"timed out after {self.timeout:g}s" + (f" ({exc})" if str(exc) else ""), write=False)
            return None
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}", write=False)
            return None
        self._read_succeeded()
        self.log.recovered(self.busy_reads)
        return blobs

    async def set(self, items: Sequence[StoreItem]) -> None:
        within = self.write_within

        async def op() -> bool:
            if within is None:
                await self.backend.set_many(items)
            else:
                await within(items, self.timeout)
            return True

        if await self.call(op, False, scoped=within is None):
            self.stats.writes += len(items)
            self.log.recovered(f"writes to tier {self.name!r}")

    async def delete(self, keys: Sequence[str]) -> bool:
        """Delete ``keys``; return whether it landed."""
        async def op() -> bool:
            await self.backend.delete_many(keys)
            return True

        return await self.call(op, False)

    async def delete_tags(self, tags: Sequence[str]) -> bool:
        """Delete the entries under ``tags``; return whether it landed."""
        async def op() -> bool:
            await self.backend.delete_tags(tags)
            return True

        return await self.call(op, False)

    async def clear(self, prefix: str) -> bool:
        """Remove what is under ``prefix`` (everything, for a backend without `ClearPrefixSupport`); return
        whether it landed."""
        backend = self.backend

        async def op() -> bool:
            if isinstance(backend, ClearPrefixSupport):
                await backend.clear_prefix(prefix)
            else:
                await backend.clear()
            return True

        return await self.call(op, False)
