"""A tier below memory as the engine uses it: timeout, circuit breaker, counters, fail-open; and `Stale`, a value
served past its expiry within its grace period."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from cachelayers.backends import Backend, StoreItem
from cachelayers.backends.base import BackendBusyError, ClearPrefixSupport, DeadlineSupport
from cachelayers.engines.breaker import CircuitBreaker
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

    __slots__ = ("backend", "breaker", "busy_reads", "cache", "failure_serial", "log", "name", "read_within", "stats",
                 "strict", "timeout", "write_within")

    def __init__(self, name: str, backend: Backend, settings: Settings, log: StateLog,
                 monotonic: Callable[[], float], cache: FailureCounter) -> None:
        self.name = name
        self.backend = backend
        self.cache = cache
        self.timeout: float = settings.tier_timeout
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown, monotonic)
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
        self.failure_serial = 0
        """`TieredCache.failures` when this tier last failed: a call that started before skips its writes."""

    async def call(self, op: Callable[[], Awaitable[T]], default: T, *, scoped: bool = True) -> T:
        """Run ``op`` under the tier's timeout and breaker; on failure count, log and return ``default``.

        ``scoped=False`` when ``op`` bounds itself by the tier timeout; otherwise it runs in the backend's
        `Backend.within` scope. A `BackendBusyError` (the backend was congested: no connection free in time, or
        busy with other callers) is counted as ``skipped``: not a failure, the breaker does not move.
        """
        if not self.breaker.allow():
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
            self._failed(exc, f"timed out after {self.timeout:g}s" + (f" ({exc})" if str(exc) else ""))
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}")
        else:
            if self.breaker.success():
                self.log.recovered(f"tier {self.name!r}")
            return result
        return default

    def _failed(self, exc: BaseException, message: str) -> None:
        cache = self.cache
        cache.failures += 1
        self.failure_serial = cache.failures
        opened = self.breaker.failure()
        self.log.failure(f"tier {self.name!r}", message + (" (circuit breaker open)" if opened else ""))
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
            self._failed(exc, f"timed out after {self.timeout:g}s" + (f" ({exc})" if str(exc) else ""))
            return None
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}")
            return None
        if self.breaker.success():
            self.log.recovered(f"tier {self.name!r}")
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
