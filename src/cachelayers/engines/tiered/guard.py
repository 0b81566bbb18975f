"""The guarded invalidation path: a rate limit on this process's invalidations, and an audit record of each.

``Settings.invalidation_limit`` (e.g. ``"100/second"``) is counted by the library's `RateLimiter` in memory,
under one key per engine: over it an invalidation waits (``invalidation_limit_wait=True``) or raises
`RateLimitExceeded` before anything is removed. Every invalidation and clear, refused or not, is recorded on
the ``cachelayers.audit`` logger with its outcome (see `cachelayers.audit`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from cachelayers import audit
from cachelayers.engines.limiter import RateLimiter
from cachelayers.errors import InvalidationError, RateLimitExceeded
from cachelayers.settings import Settings

__all__ = ["InvalidationGuard"]

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
