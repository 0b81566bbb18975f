"""`@rate_limited`: fair waiting under named limits, as a decorator."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, Unpack, cast, final, overload

from cachelayers.decorators.wrapper import FunctionWrapper
from cachelayers.engines.limiter import LimitedFunction, LimitOptions
from cachelayers.engines.sync import blocking, is_async, to_async
from cachelayers.validation import check_options

__all__ = ["LimitDecorator", "RateLimitedFunction", "SyncRateLimitedFunction", "rate_limited"]

P = ParamSpec("P")
T = TypeVar("T")


@final
class RateLimitedFunction(FunctionWrapper[P, Coroutine[Any, Any, T]]):
    """What `rate_limited` returns: the function, same signature, waiting for its limits before each call.

    Calling it returns a coroutine, as the function does; it binds as a method like the function it wraps. The
    function itself is ``__wrapped__``.
    """

    def __init__(self, engine: LimitedFunction[P, T]) -> None:
        super().__init__(engine.fn, engine.call)
        self.rate_limit = engine
        """The engine behind the function (``.limiter`` is the `RateLimiter` it waits in)."""

    def __repr__(self) -> str:
        return f"<rate_limited {self.rate_limit.identity}>"


@final
class SyncRateLimitedFunction(FunctionWrapper[P, T]):
    """What `rate_limited` returns for a plain ``def``: each call blocks its thread until the limits admit it
    (in the same fair queue as async callers), then runs the function in that thread."""

    def __init__(self, fn: Callable[P, T], engine: LimitedFunction[P, T]) -> None:
        super().__init__(fn, blocking(engine.call, fn))
        self.rate_limit = engine
        """The engine behind the function (``.limiter`` is the `RateLimiter` it waits in)."""

    def __repr__(self) -> str:
        return f"<rate_limited {self.rate_limit.identity}>"


class LimitDecorator(Protocol):
    """What `rate_limited` returns: decorates an ``async def`` or a plain ``def``."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> RateLimitedFunction[P, T]: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, fn: Callable[P, T], /) -> SyncRateLimitedFunction[P, T]: ...


def rate_limited(*limits: str, **options: Unpack[LimitOptions]) -> LimitDecorator:
    """Wait, fairly, until named limits admit each call of an async function.

    ``@rate_limited("llm-rpm", "llm-tpm", cost=count_tokens, key=lambda model, **_: model, timeout=30)``
    admits a call when both limits (named in ``Settings.limits``, or inline like ``"3500/minute"``) have room
    for it under the call's key; callers wait in FIFO order per key and process, so a large cost is never
    starved by small ones. With Redis storage the limits hold across processes. A plain ``def`` is decorated
    too: its calls block their thread while they wait (see the guide "Sync functions").

    Args:
        limits: Limit names from the settings, or inline limits (``"3500/minute"``, ``"10 per 2 seconds"``,
            ``"10/second;500/minute"``). An inline limit belongs to this function; a named one is shared by
            every function using the name.
        **options: The `LimitOptions`, below.

    Keyword Args:
        cost (int | Callable | Mapping | None): Units a call takes: a number, or a function of the call's arguments
            (by name, like ``key``; it is given only the arguments it names unless it takes ``**kwargs``). With one
            limit it weighs that limit; with several, the first counts calls (cost 1) and ``cost`` weighs the
            others, as in ``@rate_limited("llm-rpm", "llm-tpm", cost=count_tokens)``. A mapping gives each limit its
            cost by name (unnamed limits cost 1).
        key (Callable | None): Function of the call's arguments returning what limits are counted per (a tenant, a
            model).
        timeout (float | str | timedelta | None): Longest wait for admission (seconds, ``"500ms"``); ``None`` waits
            as long as needed, ``0`` never waits. A call that cannot be admitted in time raises `RateLimitExceeded`
            — as soon as that is known (e.g. the window resets after the deadline), at the latest at the deadline.
        strategy (str | None): ``"moving-window"`` (default, exact), ``"sliding-window-counter"`` or
            ``"fixed-window"``.
        storage (str | None): Storage URL (``"memory://"``, ``"redis://host:6379/0"``), overriding the settings'
            choice (the first Redis tier, else memory).
        limiter (RateLimiter | None): Engine to wait in, instead of the one of the settings in force.
        retries (int): Retries after a rate-limit error from the function, each waiting for the Retry-After pause
            and an exponential back-off with jitter.
        backoff (float | str | timedelta): First back-off (doubling per retry); also the pause when the error gives
            no Retry-After.
        max_backoff (float | str | timedelta): Longest back-off.
        adaptive (Adaptive | bool): Lower the effective limits on rate-limit errors and raise them back after
            sustained success (AIMD): ``True`` or an `Adaptive` with its parameters.
        rate_limit_error (Callable | None): ``exc -> bool | float | None`` deciding what is a rate-limit error (a
            number is its Retry-After in seconds; ``None`` leaves it to the default: HTTP 429 on the exception or
            its ``response``, or a class named like ``RateLimitError``).
        actual (Callable | Mapping | None): Function of the result returning the units really used (e.g. tokens from
            the response), or a mapping of them by limit; the difference to ``cost`` is charged (or returned) after
            the call.
        name (str | None): Identity of the function in inline limits' keys, instead of ``module.qualname``.

    Returns:
        A decorator making a `RateLimitedFunction`.

    Raises:
        ConfigError: At decoration time: no limits, a malformed inline limit (e.g. ``"3500/minuet"``), a bad
            name, ``cost`` mapping, ``timeout``, ``strategy``, ``storage``, ``retries`` or ``adaptive``, or a
            fixed cost larger than an inline limit. A name missing from the settings raises it at call time.
        TypeError: The function is not callable, or the decorator is used bare.
        RateLimitExceeded: At call time, when the call is not admitted within ``timeout`` or its cost is
            larger than a limit (``retry_after`` is ``None``: it can never fit).
    """
    if limits and callable(limits[0]):
        raise TypeError("rate_limited needs its limits: use @rate_limited('3500/minute') or "
                        "@rate_limited('llm-rpm'), not bare @rate_limited")
    check_options(options, LimitOptions, "rate_limited")

    def decorate(f: Callable[P, Any]) -> RateLimitedFunction[P, Any] | SyncRateLimitedFunction[P, Any]:
        if not callable(f):
            raise TypeError(f"rate_limited needs a function, got {f!r}")
        if is_async(f):
            return RateLimitedFunction(LimitedFunction(f, limits, **options))
        return SyncRateLimitedFunction(f, LimitedFunction(to_async(f), limits, **options))

    return cast(LimitDecorator, decorate)
