"""Sync functions on the async engines: one background event loop owned by the library, and the hand-off to it.

A decorated ``def`` function is answered by the same engine as an ``async def`` one. The engine runs on the
library's loop (one daemon thread, started on first use, stopped at interpreter exit); the calling thread
blocks until the call is answered. When the engine needs the user's function, it hands the call back to the
thread that is waiting (`to_async`), so the function runs where it was called, with that thread's state
(thread-locals, a database connection); a call nobody waits for any more (a background refresh) runs in a
worker thread instead. See the guide ``docs/guides/sync.md``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

__all__ = ["LibraryLoop", "blocking", "is_async", "library_loop", "run", "to_async"]

P = ParamSpec("P")
T = TypeVar("T")

_STOP_TIMEOUT: Final = 5.0


class LibraryLoop:
    """The background event loop that runs the engines of sync functions: one daemon thread, made on first use.

    It is stopped at interpreter exit (its pending tasks cancelled and awaited, its executor shut down) and made
    again on use after a fork or after `stop`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    @property
    def thread_id(self) -> int | None:
        """The loop thread's identifier, or ``None`` while it is not running."""
        thread = self._thread
        return thread.ident if thread is not None and self._pid == os.getpid() else None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started if need be."""
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=main, name="cachelayers-loop", daemon=True)
        self._loop, self._thread, self._pid = loop, thread, os.getpid()
        thread.start()
        ready.wait()

    def stop(self) -> None:
        """Cancel what still runs on the loop, wait for it (a few seconds at most) and stop the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                return
            self._loop = self._thread = None
        if thread.is_alive():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(_wind_down(), loop).result(_STOP_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()


async def _wind_down() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    loop = asyncio.get_running_loop()
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


library_loop: Final = LibraryLoop()
"""The one loop of the process."""

atexit.register(library_loop.stop)


class _Caller:
    """A thread waiting in `run`: the function calls the loop hands back, run by that thread in turn."""

    __slots__ = ("closed", "jobs")

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.closed = False  # read and written on the loop thread only

    def close(self) -> None:
        self.closed = True
        self.jobs.put(None)


class _Job:
    __slots__ = ("args", "fn", "future", "kwargs", "loop")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.args, self.kwargs, self.future, self.loop = fn, args, kwargs, future, loop

    def run(self) -> None:
        try:
            result = _checked(self.fn, self.fn(*self.args, **self.kwargs))
        except Exception as exc:
            self.loop.call_soon_threadsafe(_settle, self.future, None, exc)
        except BaseException:  # KeyboardInterrupt, SystemExit: the caller's own, raised in its thread
            self.loop.call_soon_threadsafe(self.future.cancel)
            raise
        else:
            self.loop.call_soon_threadsafe(_settle, self.future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the engine stopped waiting (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _checked(fn: Callable[..., Any], result: Any) -> Any:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{fn!r} is used as a sync function but returned an awaitable: decorate an async def "
                        "instead")
    return result


_caller: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar("cachelayers_sync_caller", default=None)


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` on the library's loop and block this thread until it is done; return its result.

    The awaitable runs in a copy of this thread's context (so ``cachelayers.explain``, ``bypass`` and the
    like apply), and the changes it makes to cachelayers' own context variables (``last_lookup``) are copied
    back. Function calls the engine hands back with `to_async` run in this thread meanwhile.

    Args:
        make: Makes the awaitable to run (called on the loop thread).

    Returns:
        What the awaitable returned.

    Raises:
        RuntimeError: Called on the library's loop thread itself (it would wait for itself).
        Exception: What the awaitable raised.
    """
    if threading.get_ident() == library_loop.thread_id:
        raise RuntimeError("a sync cachelayers function was called on the library's own loop thread (from a "
                           "callback of another cached call): use the async form there")
    caller = _Caller()
    context = contextvars.copy_context()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    tasks: list[asyncio.Task[T]] = []

    async def main() -> T:
        _caller.set(caller)  # in this call's context: what it starts inherits it
        try:
            return await make()
        finally:
            caller.close()

    def start() -> None:
        task = loop.create_task(main(), context=context)
        tasks.append(task)
        task.add_done_callback(lambda _: _copy_outcome(task, done))

    loop = library_loop.loop()
    loop.call_soon_threadsafe(start)
    try:
        while (job := caller.jobs.get()) is not None:
            job.run()
        result = done.result()
    except BaseException:
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])
        raise
    for var, value in context.items():
        if var.name.startswith("cachelayers_") and var is not _caller and var.get(_UNSET) is not value:
            var.set(value)
    return result


_UNSET: Final = object()


def _copy_outcome(task: asyncio.Task[T], done: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        done.set_exception(concurrent.futures.CancelledError())
    elif (error := task.exception()) is not None:
        done.set_exception(error)
    else:
        done.set_result(task.result())


def to_async(fn: Callable[P, T], *, in_caller: bool = True) -> Callable[P, Coroutine[Any, Any, T]]:
    """The ``async def`` an engine calls for the sync ``fn``.

    It has ``fn``'s name, signature and annotations (so keys and identities are those of ``fn``). Awaited on
    the library's loop inside `run`, it hands the call to the waiting thread; otherwise (``in_caller=False``,
    or nobody waits any more, or it is awaited on another loop) it runs ``fn`` in a worker thread.

    Args:
        fn: The sync function.
        in_caller: ``False`` to always run ``fn`` in a worker thread (a batch function shared by callers).

    Returns:
        The async function.
    """

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        caller = _caller.get() if in_caller else None
        if caller is None or caller.closed or threading.get_ident() != library_loop.thread_id:
            return _checked(fn, await asyncio.to_thread(fn, *args, **kwargs))  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        caller.jobs.put(_Job(fn, args, kwargs, future, loop))
        return await future

    return call


def blocking(call: Callable[P, Awaitable[T]], fn: Callable[..., Any]) -> Callable[P, T]:
    """A sync function with ``fn``'s name and signature that runs ``call`` through `run`.

    Args:
        call: The engine's async call path.
        fn: The user's sync function (its metadata is copied).

    Returns:
        The blocking function.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return run(lambda: call(*args, **kwargs))

    return wrapper


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is an async function (or a callable object with an ``async def __call__``, or a partial
    of one): what the decorators wrap as async; anything else callable is wrapped as a sync function."""
    return (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inspect.unwrap(fn))
            or (not inspect.isfunction(fn) and not inspect.ismethod(fn)
                and inspect.iscoroutinefunction(type(fn).__call__)))
