"""Adaptive mode (AIMD): the effective limit drops on the provider's rate-limit errors and climbs back on success."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

from cachelayers.durations import parse_duration
from cachelayers.engines.limiter.queue import Window
from cachelayers.errors import ConfigError

__all__ = ["Adaptive", "as_adaptive", "decrease", "increase"]


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



def as_adaptive(value: Adaptive | bool | None) -> Adaptive | None:
    """The `Adaptive` settings ``adaptive=`` asks for (``True``: the defaults), or ``None`` when off.

    Raises:
        ConfigError: ``value`` is neither a boolean nor an `Adaptive`.
    """
    if value is True:
        return Adaptive()
    if value is False or value is None:
        return None
    if isinstance(value, Adaptive):
        return value
    raise ConfigError("adaptive", value, "expected True, False or an Adaptive(...)")


def decrease(windows: Sequence[Window], admitted_at: float, adaptive: Adaptive, now: float) -> None:
    """Lower the effective amount of ``windows`` after a rate-limit error of a call admitted at ``admitted_at``."""
    for window in windows:
        if admitted_at < window.decreased_at:
            continue  # sent before the last decrease, at the old rate: not news
        window.fraction = max(adaptive.floor, window.fraction * adaptive.decrease)
        window.amount = max(1, int(window.nominal * window.fraction))
        window.decreased_at = window.changed_at = now


def increase(windows: Sequence[Window], adaptive: Adaptive, now: float) -> None:
    """Raise the effective amount of ``windows`` back after a success, once per period of success."""
    for window in windows:
        if window.fraction < 1.0:
            period = adaptive.period if adaptive.period is not None else window.expiry
            if now - window.changed_at >= cast(float, period):
                window.fraction = min(1.0, window.fraction + adaptive.increase)
                window.amount = max(1, int(window.nominal * window.fraction + 1e-9))
                window.changed_at = now
