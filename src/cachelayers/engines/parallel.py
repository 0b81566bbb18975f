"""Parallel helpers: a bounded-concurrency gather with an overall timeout, and a primary-with-fallbacks runner.

Both are built on anyio task groups and cancel scopes, so they run under asyncio and trio and leave no task
behind: when `gather_bounded` returns, every task it started has finished, even after its timeout.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar, cast, final

import anyio

from cachelayers.durations import parse_duration
from cachelayers.errors import AllAttemptsFailedError, ConfigError
from cachelayers.loops import running_asyncio_loop
from cachelayers.validation import optional_positive_int

__all__ = ["Outcome", "gather_bounded", "with_fallbacks"]

T = TypeVar("T")
P = ParamSpec("P")

Job = Coroutine[Any, Any, T] | Callable[[], Awaitable[T]]
"""A coroutine object, or an async callable taking no arguments (``functools.partial(fetch, url)``)."""


@final
@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What one job of `gather_bounded` ended with: a value, an exception, or the overall timeout.

    Attributes:
        value: The job's return value (``None`` when it failed).
        error: The exception the job raised, or a `TimeoutError` when the overall timeout stopped it (or it
            never started); ``None`` on success.
        timed_out: Whether the overall timeout stopped the job or kept it from starting.
    """

    value: T | None = None
    error: Exception | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Whether the job returned a value."""
        return self.error is None

    def unwrap(self) -> T:
        """Return the value, or raise the job's exception.

        Raises:
            Exception: The job's exception, or `TimeoutError` for a job the timeout stopped.
        """
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


def _seconds(value: float | str | timedelta | None, field: str) -> float | None:
    return None if value is None else parse_duration(value, field)


async def gather_bounded(
    jobs: Iterable[Job[T]],
    *,
    limit: int | None = None,
    # A caller's own fail_after would discard the finished jobs' outcomes; this timeout keeps them.
    timeout: float | str | timedelta | None = None,  # noqa: ASYNC109
) -> list[Outcome[T]]:
    """Run jobs concurrently, at most ``limit`` at a time, and return each one's outcome in order.

    A job that raises does not disturb the others: its exception is its outcome. When ``timeout`` expires,
    the jobs still running are cancelled and waited for, and they and the jobs not started yet get a
    `TimeoutError` outcome; coroutines that never started are closed (no "never awaited" warning). When the
    caller is cancelled, every job is cancelled and waited for before the cancellation goes on.

    Args:
        jobs: Coroutines, or async callables without arguments.
        limit: Most jobs running at once; ``None`` runs all at once.
        timeout: Overall time budget (seconds, ``"2s"``, a timedelta); ``None`` for none.

    Returns:
        One `Outcome` per job, in the order given.

    Raises:
        ConfigError: ``limit`` is not a positive integer or ``timeout`` is malformed.
    """
    optional_positive_int(limit, "limit")
    seconds = _seconds(timeout, "timeout")
    pending = list(jobs)
    outcomes: list[Outcome[T] | None] = [None] * len(pending)
    started = [False] * len(pending)
    queue = iter(range(len(pending)))

    async def worker() -> None:
        # Workers pull the next job from a shared iterator: ``limit`` tasks in all, not one per job.
        for index in queue:
            job = pending[index]
            started[index] = True
            try:
                value = await (job if inspect.iscoroutine(job) else cast(Callable[[], Awaitable[T]], job)())
            except Exception as exc:
                outcomes[index] = Outcome(error=exc)
            except anyio.get_cancelled_exc_class() as exc:
                if _cancelled_here():  # the overall timeout, or the caller's own cancellation
                    raise
                # The job awaited something cancelled elsewhere (a task shut down by other code): its outcome
                failure = RuntimeError(f"job {index} was cancelled by something other than this gather")
                failure.__cause__ = exc
                outcomes[index] = Outcome(error=failure)
            else:
                outcomes[index] = Outcome(value=value)

    try:
        with anyio.move_on_after(seconds if seconds is not None else math.inf):
            async with anyio.create_task_group() as tg:
                for _ in range(min(limit or len(pending), len(pending))):
                    tg.start_soon(worker)
    finally:
        for index, job in enumerate(pending):
            if not started[index] and inspect.iscoroutine(job):
                job.close()
    results: list[Outcome[T]] = []
    for index, outcome in enumerate(outcomes):
        if outcome is None:
            what = "was still running" if started[index] else "had not started"
            limit_text = "" if seconds is None else f" of {seconds:g}s"
            outcome = Outcome(error=TimeoutError(f"job {index} {what} when the overall timeout{limit_text} "
                                                 f"expired"), timed_out=True)
        results.append(outcome)
    return results


def _cancelled_here() -> bool:
    """Whether the running task itself is being cancelled (under trio, a cancellation always is)."""
    if running_asyncio_loop() is None:
        return True
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def with_fallbacks(
    primary: Callable[P, Awaitable[T]],
    *fallbacks: Callable[P, Awaitable[T]],
    attempt_timeout: float | str | timedelta | None = None,
    timeout: float | str | timedelta | None = None,
    fallback_on: type[Exception] | tuple[type[Exception], ...] = Exception,
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Make a function that calls ``primary`` and, when it fails or is too slow, each fallback in turn.

    Every attempt gets the same arguments. An attempt that exceeds ``attempt_timeout`` is cancelled (and
    waited for) and the next one starts; an attempt that raises one of ``fallback_on`` moves on too; any other
    exception propagates at once. ``timeout`` bounds the whole chain: the attempt running when it expires is
    cancelled and no further attempt starts.

    Args:
        primary: The preferred async function (e.g. the large model, the remote embedder).
        *fallbacks: Functions with the same signature, tried in order.
        attempt_timeout: Time allowed to each attempt (seconds, ``"2s"``, a timedelta); ``None`` for none.
        timeout: Time allowed to the whole chain; ``None`` for none.
        fallback_on: Exception types that move on to the next attempt (per-attempt timeouts always do).

    Returns:
        An async function with ``primary``'s signature, returning the first successful attempt's result.

    Raises:
        ConfigError: A timeout is malformed or a function is not callable. At call time, the returned
            function raises `AllAttemptsFailedError` (an `ExceptionGroup` of every attempt's error, timeouts
            as `TimeoutError`) when no attempt succeeds.
    """
    attempts = (primary, *fallbacks)
    for index, fn in enumerate(attempts):
        if not callable(fn):
            raise ConfigError("primary" if index == 0 else f"fallbacks[{index - 1}]", fn, "must be an async function")
    kinds = fallback_on if isinstance(fallback_on, tuple) else (fallback_on,)
    if not kinds or not all(isinstance(kind, type) and issubclass(kind, Exception) for kind in kinds):
        raise ConfigError("fallback_on", fallback_on, "expected an Exception class or a tuple of them")
    per_attempt = _seconds(attempt_timeout, "attempt_timeout")
    overall = _seconds(timeout, "timeout")
    names = [getattr(fn, "__qualname__", None) or type(fn).__qualname__ for fn in attempts]

    async def call_with_fallbacks(*args: P.args, **kwargs: P.kwargs) -> T:
        errors: list[Exception] = []
        tried = 0
        with anyio.move_on_after(overall if overall is not None else math.inf) as chain:
            for name, fn in zip(names, attempts, strict=True):
                tried += 1
                with anyio.move_on_after(per_attempt if per_attempt is not None else math.inf) as attempt:
                    try:
                        return await fn(*args, **kwargs)
                    except fallback_on as exc:
                        errors.append(exc)
                        continue
                if attempt.cancelled_caught:
                    errors.append(TimeoutError(f"{name}() did not finish within attempt_timeout={per_attempt:g}s"))
        if chain.cancelled_caught:
            errors.append(TimeoutError(f"the attempts did not finish within timeout={overall:g}s"))
            message = f"no attempt succeeded within timeout={overall:g}s ({tried} of {len(attempts)} tried)"
        else:
            message = f"all {len(attempts)} attempts failed"
        raise AllAttemptsFailedError(message, errors)

    return functools.wraps(primary)(call_with_fallbacks)
