"""The guarded invalidation path: a rate limit on this process's invalidations, and an audit record of each.

``Settings.invalidation_limit`` (e.g. ``"100/second"``) is counted by the library's `RateLimiter` in memory,
under one key per engine: over it an invalidation waits (``invalidation_limit_wait=True``) or raises
`RateLimitExceeded` before anything is removed. Every invalidation and clear, refused or not, is recorded on
the ``cachelayers.audit`` logger with its outcome (see `cachelayers.audit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from cachelayers import audit
from cachelayers.engines.limiter import RateLimiter
from cachelayers.engines.tiered.tier import Tier
from cachelayers.errors import InvalidationError, RateLimitExceeded
from cachelayers.settings import Settings

__all__ = ["Invalidating", "InvalidationGuard", "InvalidationOutcome", "invalidate_everywhere"]

_KINDS: Final = {"t": "tags", "k": "keys", "c": "clear"}


class InvalidationGuard:
    """Admits an engine's invalidations under ``Settings.invalidation_limit`` and audits each.

    Args:
        settings: The engine's settings.
        tiers: The names of the engine's tiers (for the records).
    """

    __slots__ = ("limiter", "settings", "tiers")

    def __init__(self, settings: Settings, tiers: Sequence[str]) -> None:
        self.settings = settings
        self.tiers = tuple(name for name in tiers if name)
        self.limiter: RateLimiter | None = None

    async def admit(self, kind: str, items: Sequence[str]) -> None:
        """Wait for (or refuse) room under the limit for one invalidation.

        Raises:
            RateLimitExceeded: Over the limit, without ``invalidation_limit_wait`` (audited as refused).
        """
        spec = self.settings.invalidation_limit
        if spec is None:
            return
        limiter = self.limiter
        if limiter is None:
            limiter = self.limiter = RateLimiter(self.settings, storage="memory://")
        try:
            await limiter.acquire(spec, key="invalidations",
                                  timeout=None if self.settings.invalidation_limit_wait else 0)
        except RateLimitExceeded as exc:
            self.record(kind, items, "refused", str(exc))
            raise

    def record(self, kind: str, items: Sequence[str], outcome: str, error: str | None = None) -> None:
        """Audit one invalidation (``kind`` ``"t"``, ``"k"`` or ``"c"``) and its outcome."""
        prefix = self.settings.key_prefix
        if kind == "c":
            audit.clear(self.tiers, outcome, prefix=prefix, error=error)
        else:
            audit.invalidation(_KINDS[kind], items, self.tiers, outcome, prefix=prefix, error=error)

    async def run(self, kind: str, items: list[str], local: Callable[[str, list[str]], None],
                  everywhere: Callable[[str, list[str]], Awaitable[None]]) -> None:
        """Admit, apply ``local`` (this process's memory tier) then ``everywhere``, and audit the outcome.

        Raises:
            RateLimitExceeded: As `admit` (nothing was removed).
            InvalidationError: From ``everywhere`` (audited as queued).
        """
        await self.admit(kind, items)
        try:
            local(kind, items)
            await everywhere(kind, items)
        except InvalidationError as exc:
            self.record(kind, items, "queued", str(exc))
            raise
        except Exception as exc:
            self.record(kind, items, "error", f"{type(exc).__name__}: {exc}")
            raise
        self.record(kind, items, "ok")


@dataclasses.dataclass(frozen=True)
class InvalidationOutcome:
    """What `invalidate_everywhere` did.

    Attributes:
        done: What was invalidated (``"tag 't'"``, ``"namespace 'ns'"``, ``"everything"``).
        failed_tiers: Tiers where a step did not land (queued; in a process about to end, lost).
        refused: What the invalidation limit refused (nothing after it was attempted).
        retry_after: Seconds after which a refused invalidation may be admitted, when known.
    """

    done: tuple[str, ...]
    failed_tiers: tuple[str, ...]
    refused: tuple[str, ...] = ()
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        """Everything was invalidated everywhere."""
        return not self.failed_tiers and not self.refused


class Invalidating(Protocol):
    """What `invalidate_everywhere` needs of an engine (a `TieredCache`)."""

    tiers: list[Tier]

    async def invalidate_tags(self, *tags: str) -> None:
        """Invalidate user tags."""

    async def invalidate_namespace(self, namespace: str) -> None:
        """Invalidate a namespace."""

    async def clear(self) -> None:
        """Remove everything under the key prefix."""


async def invalidate_everywhere(cache: Invalidating, *, tags: Sequence[str] = (), namespaces: Sequence[str] = (),
                                clear: bool = False) -> InvalidationOutcome:
    """Invalidate tags, namespaces and/or everything through ``cache``'s guard: the one path the
    ``cachelayers invalidate`` command and the admin endpoint share.

    Every step is limited by ``Settings.invalidation_limit`` and audited (with the actor in force). Steps run
    in order; the first refused by the limit stops the rest, which are reported as refused.

    Args:
        cache: The engine to invalidate through.
        tags: User tags.
        namespaces: Namespaces (by default a function's ``module.qualname``).
        clear: Remove everything under the key prefix.

    Returns:
        The `InvalidationOutcome`.
    """
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if tags:
        steps.append((", ".join(f"tag {t!r}" for t in tags), lambda: cache.invalidate_tags(*tags)))
    for ns in namespaces:
        steps.append((f"namespace {ns!r}", lambda ns=ns: cache.invalidate_namespace(ns)))  # type: ignore[misc]
    if clear:
        steps.append(("everything", cache.clear))
    before = {t.name: (t.stats.errors, t.stats.timeouts, t.stats.skipped) for t in cache.tiers}
    done: list[str] = []
    missed: set[str] = set()
    for index, (what, step) in enumerate(steps):
        try:
            await step()
        except InvalidationError as exc:
            missed.update(exc.tiers)
        except RateLimitExceeded as exc:
            return InvalidationOutcome(tuple(done), tuple(sorted(missed)), tuple(w for w, _ in steps[index:]),
                                       exc.retry_after)
        done.append(what)
    # Any failure, including those an invalidation does not raise for: the operator must hear about it.
    failed = {t.name for t in cache.tiers if (t.stats.errors, t.stats.timeouts, t.stats.skipped) != before[t.name]}
    return InvalidationOutcome(tuple(done), tuple(sorted(missed | failed)))
