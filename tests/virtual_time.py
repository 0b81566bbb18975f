"""Virtual time for event loops: timers fire in order, instantly, and exactly on time.

* asyncio: `VirtualTimeLoop`, a selector event loop whose clock jumps to the next timer whenever nothing is
  ready (the asyncio twin of trio's ``MockClock(autojump_threshold=0)``);
* trio: ``trio.testing.MockClock(autojump_threshold=0)``.

`VIRTUAL_BACKENDS` parametrises ``anyio_backend`` with both; `run_virtual` runs a coroutine function on one.
Timing tests then assert exact times without sleeping and without flakiness.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import pytest
from trio.testing import MockClock

__all__ = ["VIRTUAL_BACKENDS", "VirtualTimeLoop", "run_virtual", "virtual_backend_options"]

T = TypeVar("T")

_REAL_BLOCK = 10.0  # seconds a loop with no timer may wait for another thread before we call it a deadlock


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; when nothing is ready, moves the loop's clock to the next timer instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            # No timer at all: only another thread (an executor) can wake the loop; give it real time.
            events = super().select(_REAL_BLOCK)
            if not events:
                raise RuntimeError("virtual-time loop: nothing is scheduled and nothing woke it (a deadlock)")
            return events
        if timeout > 0:
            self._loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: sleeping costs no real time, and every timer fires exactly on time."""

    def __init__(self) -> None:
        self.now = 1_000.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def virtual_backend_options(name: str) -> tuple[str, dict[str, Any]]:
    """``(backend, options)`` for anyio running ``name`` ("asyncio" or "trio") on virtual time."""
    if name == "asyncio":
        return "asyncio", {"loop_factory": VirtualTimeLoop}
    return "trio", {"clock": MockClock(autojump_threshold=0)}


VIRTUAL_BACKENDS = [
    pytest.param(("asyncio", {"loop_factory": VirtualTimeLoop}), id="asyncio-virtual"),
    pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-virtual"),
]


def run_virtual(name: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion on ``name`` ("asyncio" or "trio") with virtual time."""
    backend, options = virtual_backend_options(name)
    return anyio.run(fn, backend=backend, backend_options=options)
