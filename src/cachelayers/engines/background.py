"""Background work of an engine (refreshes, listeners), run in a task group the engine owns.

An engine is made outside any event loop and used from many tasks, none of which it may keep waiting for
its background work. `BackgroundTasks` therefore starts, on first use in an event loop, one host task of its
own (an ordinary asyncio task, or a trio system task) that opens an anyio task group and runs every
background job in it. Jobs are structured from there on: they are cancelled together by `aclose`, an
exception in one is logged and never reaches the others, and when the event loop ends (``asyncio.run``
returns, a trio run finishes) the host is cancelled with it, so nothing outlives its loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from cachelayers.loops import current_loop_token

__all__ = ["BackgroundTasks"]

logger = logging.getLogger("cachelayers")


class BackgroundTasks:
    """Fire-and-forget jobs of one engine, in a task group of its own per event loop.

    Args:
        name: Used in log messages and task names.
    """

    def __init__(self, name: str = "cachelayers") -> None:
        self.name = name
        self._loop: object | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._pending: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self._stopped: anyio.Event | None = None
        self._closing = False
        self._host: asyncio.Task[None] | None = None
        self.running = 0
        """Jobs started and not yet finished (for tests and statistics)."""

    def start_soon(self, job: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``job(*args)`` in the background of the current event loop; never raises, never waits."""
        loop = current_loop_token()
        if loop is not self._loop:
            # A new event loop (e.g. another asyncio.run): the host of the old one ended with it.
            self._loop = loop
            self._group = None
            self._pending = []
            self._stopped = None
            self._closing = False
        self.running += 1
        if self._group is not None:
            self._group.start_soon(self._guarded, job, args)
            return
        self._pending.append((job, args))
        if self._stopped is None:
            self._stopped = anyio.Event()
            self._spawn_host()

    def _spawn_host(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio

            trio.lowlevel.spawn_system_task(self._run_host, name=f"{self.name} background")
        else:
            self._host = loop.create_task(self._run_host(), name=f"{self.name} background")

    async def _run_host(self) -> None:
        stopped = self._stopped
        try:
            if self._closing:
                return
            async with anyio.create_task_group() as group:
                self._group = group
                pending, self._pending = self._pending, []
                for job, args in pending:
                    group.start_soon(self._guarded, job, args)
                await anyio.sleep_forever()
        except BaseException:  # cancelled by aclose() or by the end of the loop; never crash a trio run
            pass
        finally:
            if self._stopped is stopped:
                self._group = None
                self._stopped = None
                self._closing = False
                self.running -= len(self._pending)
                self._pending = []
            if stopped is not None:
                stopped.set()

    async def _guarded(self, job: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await job(*args)
        except Exception:
            logger.exception("cachelayers: background job %s of %s failed", getattr(job, "__qualname__", job),
                             self.name)
        finally:
            self.running -= 1

    async def aclose(self) -> None:
        """Cancel every job of the current event loop and wait until they have finished."""
        if self._loop is not current_loop_token():
            return
        stopped = self._stopped
        if stopped is None:
            return
        self._closing = True  # a host that has not started yet returns at once
        if self._group is not None:
            self._group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await stopped.wait()
