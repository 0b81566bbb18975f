"""Single flight: one computation in progress that concurrent callers of the same key wait for."""

from __future__ import annotations

import copy
from typing import Any, Final

import anyio

from cachelayers.loops import current_loop_token

__all__ = ["Flight"]


_CROSS_LOOP_POLL: Final = 0.002


class Flight:
    """One computation in progress; callers that find it wait for its outcome instead of computing again.

    The computing caller sets `value` (or `error`), `done`, then calls `finish`. The event is made only when
    a second caller waits, so a flight nobody joins costs no event.
    """

    __slots__ = ("done", "epoch", "error", "event", "finished", "loop", "outcome", "value")

    def __init__(self, epoch: int = 0) -> None:
        self.loop = current_loop_token()
        """The event loop of the computing caller: its event can only wake waiters of the same loop."""
        self.finished = False
        self.epoch = epoch
        """The engine's invalidation generation when the computation began: a caller that comes after an
        invalidation (a later generation) computes again instead of waiting for a value from before it."""
        self.event: anyio.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.outcome: Any = None
        """What the computing caller tells its waiters about how the value was found (the engine's choice)."""

    async def wait(self) -> None:
        """Wait until the computing caller calls `finish`.

        A waiter in another event loop (a plain function on the library's loop joining an async call on the
        application's, or the reverse) cannot be woken by the event: it checks every few milliseconds instead.
        """
        if self.loop is not current_loop_token():
            while not self.finished:  # noqa: ASYNC110 - an event of another loop cannot wake this one
                await anyio.sleep(_CROSS_LOOP_POLL)
            return
        if self.event is None:
            self.event = anyio.Event()
        await self.event.wait()

    def finish(self) -> None:
        """Wake every waiter (whether or not the computation succeeded)."""
        self.finished = True
        if self.event is not None:
            self.event.set()

    def waiter_error(self) -> BaseException:
        """The computation's failure for one waiter to raise: a copy of `error` with its traceback and cause, so
        that each waiter's frames join its own copy rather than one traceback growing with every waiter (the
        error itself when it cannot be copied)."""
        error = self.error
        assert error is not None
        try:
            clone = copy.copy(error)
        except Exception:  # an exception whose constructor does not take its args back
            return error
        if type(clone) is not type(error) or clone.args != error.args:
            return error
        clone.__cause__, clone.__context__ = error.__cause__, error.__context__
        clone.__suppress_context__ = error.__suppress_context__
        return clone.with_traceback(error.__traceback__)
