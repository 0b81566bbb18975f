"""Limits and costs: parsing limit texts, the strategies of limits by name, and spreading costs over limits."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from limits import RateLimitItem
from limits.aio.storage import Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.util import parse_many

from cachelayers.errors import ConfigError, RateLimitExceeded
from cachelayers.validation import limit_windows

__all__ = ["DEFAULT_STRATEGY", "LIMIT_NAME", "STRATEGIES", "Limit", "Strategy", "cost_plan", "cost_units",
           "looks_like_spec", "parse_limit", "strategy_name"]

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

LIMIT_NAME: Final = re.compile(r"^[A-Za-z_][\w.\-]*$")
"""What a limit's name in the settings looks like."""
_SPEC_HINT: Final = re.compile(r"^\s*\d|/|\bper\b", re.IGNORECASE)

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


def looks_like_spec(text: str) -> bool:
    """Whether ``text`` looks like an inline limit (``"3500/minute"``) rather than a name."""
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
        ConfigError: The text is not a limit, or a window allows nothing, lasts no time or is too long to store
            (`cachelayers.validation.limit_windows`, which the settings check named limits with too).
    """
    windows = limit_windows(spec, field)
    text = spec.strip()
    try:
        items = tuple(parse_many(text))
    except ValueError:
        items = ()
    if [(item.amount, item.get_expiry()) for item in items] != list(windows):  # limits must read it as we do
        raise ConfigError(field, spec, "not a limit as the limits library reads it")
    return Limit(name or text, text, items)


def strategy_name(value: object, field: str) -> str:
    """Return ``value`` if it is one of `STRATEGIES`.

    Raises:
        ConfigError: It is not.
    """
    if not isinstance(value, str) or value not in _CODES:
        raise ConfigError(field, value, f"unknown strategy; expected one of {', '.join(STRATEGIES)}")
    return value


class Strategy:
    """A limits strategy bound to the engine's storage (rebound if the storage is remade)."""

    __slots__ = ("code", "consumes_on_refusal", "hit", "limiter", "name", "stats_calls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.code = _CODES[name]
        self.consumes_on_refusal = name == "fixed-window"  # limits' fixed window counts refused hits too
        self.stats_calls = 2 if name == "fixed-window" else 1  # its window stats read count and expiry
        self.limiter: Any = None
        self.hit: Callable[..., Awaitable[bool]] = _unbound

    def bind(self, storage: Storage) -> None:
        """Make limits' strategy over ``storage``."""
        self.limiter = _CLASSES[self.name](storage)
        self.hit = self.limiter.hit


async def _unbound(*args: Any, **kwargs: Any) -> bool:
    raise RuntimeError("the strategy is not bound to a storage yet")


def cost_plan(limits: Sequence[Limit], cost: Any, field: str, default: Any = 1) -> list[Any]:
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


def cost_units(value: Any, limit: Limit, key: str, *, check: bool = True) -> int:
    """Whole units of a cost for ``limit`` (rounded up).

    Raises:
        TypeError: ``value`` is not a finite number.
        ValueError: ``value`` is negative.
        RateLimitExceeded: With ``check``, it is larger than the limit allows (it can never fit).
    """
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

