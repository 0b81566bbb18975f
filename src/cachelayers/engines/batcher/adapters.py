"""Loop adapters of the batcher: the native event, clock and task spawner of asyncio and of trio."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from asyncio import get_running_loop as _get_running_loop
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

__all__ = ["AsyncioEvent", "Event", "LoopAdapters", "Spawn", "loop_adapters", "trio_token"]


class Event(Protocol):
    """The loop's own event (``asyncio.Event`` or ``trio.Event``): what anyio's Event wraps, minus the wrapper.

    Every caller waits on one, so the hot path skips anyio's indirection (a backend lookup per event created
    and a coroutine frame per wait); anyio's cancel scopes work on native waits all the same.
    """

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


class AsyncioEvent:
    """An asyncio event whose ``wait()`` is the waiter's own future, awaited directly.

    ``asyncio.Event.wait`` wraps that future in a coroutine and keeps its waiters in a deque each removes
    itself from; on the per-item hot path that is a third of the batcher's own cost. A cancelled waiter's future
    is cancelled with it and skipped by `set`: no ``InvalidStateError``, and no exception is ever stored in one.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def wait(self) -> Awaitable[None]:
        waiter: asyncio.Future[None] = _get_running_loop().create_future()
        if self._set:
            waiter.set_result(None)  # awaiting a done future returns at once, as Event.wait does when set
        else:
            self._waiters.append(waiter)
        return waiter


Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]
LoopAdapters = tuple[Callable[[], float], Spawn, Callable[[], Event]]


def trio_token() -> object:
    """The running trio run's token (the running loop was not asyncio)."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
    raise RuntimeError("a Batcher must be used from a running asyncio or trio event loop")


def loop_adapters(library: str) -> LoopAdapters:
    """The clock, task spawner and event factory of ``library`` (``"asyncio"`` or ``"trio"``).

    The batch's task is spawned natively (``loop.create_task`` on asyncio, a system task on trio) because it
    must outlive the caller that started the batch: any caller may be cancelled, and the batch must still go
    for the others.
    """
    # Nothing here may hold the native loop strongly: the state is the value of a WeakKeyDictionary keyed by
    # it, and would keep a finished loop alive forever. Both functions run only inside the loop anyway.
    if library == "asyncio":
        tasks: set[asyncio.Task[None]] = set()

        def spawn_asyncio(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
            task = asyncio.get_running_loop().create_task(run())
            tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(tasks.discard)

        def asyncio_time() -> float:
            return asyncio.get_running_loop().time()

        return asyncio_time, spawn_asyncio, AsyncioEvent

    import trio

    def spawn_trio(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # With a copy of the caller's context, as asyncio's create_task gives (system tasks get none by default).
        trio.lowlevel.spawn_system_task(run, context=contextvars.copy_context())

    return trio.current_time, spawn_trio, trio.Event
