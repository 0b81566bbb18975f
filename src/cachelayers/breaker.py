"""A circuit breaker per tier and per shared vector store: stop calling a failing one a while, then probe once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

__all__ = ["CircuitBreaker"]

State = Literal["closed", "open", "half-open"]
_CLOSED: Final = "closed"
_OPEN: Final = "open"
_HALF_OPEN: Final = "half-open"


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown`` seconds lets one probe through.

    A successful probe closes it; a failed probe opens it for another ``cooldown``.

    Args:
        threshold: Consecutive failures that open the breaker.
        cooldown: Seconds an open breaker refuses calls before it allows a probe.
        clock: Monotonic time source.
    """

    __slots__ = ("_clock", "_failures", "_opened_at", "_probing", "cooldown", "state", "threshold")

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float]) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state: State = _CLOSED

    def allow(self) -> bool:
        """Return whether a call may go to the tier now (claims the probe when half-open)."""
        if self.state == _CLOSED:
            return True
        if self.state == _OPEN and self._clock() - self._opened_at >= self.cooldown:
            self.state = _HALF_OPEN
            self._probing = False
        if self.state == _HALF_OPEN:
            now = self._clock()
            # A probe that never reported (its caller was cancelled) must not wedge the breaker half-open.
            if not self._probing or now - self._opened_at >= self.cooldown:
                self._probing = True
                self._opened_at = now
                return True
        return False

    def success(self) -> bool:
        """Record a success; return ``True`` when this closed the breaker."""
        self._failures = 0
        if self.state != _CLOSED:
            self.state = _CLOSED
            self._probing = False
            return True
        return False

    def trip(self) -> None:
        """Open now, for a full cool-down (another breaker of the same tier just opened)."""
        self.state = _OPEN
        self._opened_at = self._clock()
        self._probing = False

    def failure(self) -> bool:
        """Record a failure; return ``True`` when this opened the breaker."""
        self._failures += 1
        if self.state == _HALF_OPEN or (self.state == _CLOSED and self._failures >= self.threshold):
            self.state = _OPEN
            self._opened_at = self._clock()
            self._probing = False
            return True
        return False
