"""Single flight: one computation in progress that concurrent callers of the same key wait for."""

from __future__ import annotations

from typing import Any

import anyio

__all__ = ["Flight"]


class Flight:
    """One computation in progress; callers that find it wait for its outcome instead of computing again.

    The computing caller sets `value` (or `error`), `done`, then calls `finish`. The event is made only when
    a second caller waits, so a flight nobody joins costs no event.
    """

    __slots__ = ("done", "error", "event", "value")

    def __init__(self) -> None:
        self.event: anyio.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    async def wait(self) -> None:
        """Wait until the computing caller calls `finish`."""
        if self.event is None:
            self.event = anyio.Event()
        await self.event.wait()

    def finish(self) -> None:
        """Wake every waiter (whether or not the computation succeeded)."""
        if self.event is not None:
            self.event.set()
