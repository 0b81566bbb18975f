"""The engine of one function decorated with `rate_limited`: key and costs per call, admission, settling."""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar

import anyio

from cachelayers.backends.limits_storage import limits_storage_url
from cachelayers.durations import parse_duration
from cachelayers.engines.limiter.adaptive import Adaptive, as_adaptive
from cachelayers.engines.limiter.limiter import RateLimiter, default_limiter
from cachelayers.engines.limiter.limits import (
    LIMIT_NAME,
    Limit,
    Strategy,
    cost_units,
    looks_like_spec,
    parse_limit,
    strategy_name,
)
from cachelayers.engines.limiter.queue import SWEEP_AT, Queue
from cachelayers.engines.limiter.retry_after import NOT_RATE_LIMITED, rate_limit_retry_after
from cachelayers.errors import ConfigError, RateLimitExceeded
from cachelayers.keys import function_identity
from cachelayers.settings import tracker

__all__ = ["LimitedFunction"]

P = ParamSpec("P")
T = TypeVar("T")


class _ArgFunction:
    """A user function of the call's arguments, called with the arguments it names (all, with ``**kw``)."""

    __slots__ = ("fn", "names")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.names: frozenset[str] | None = None
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            self.names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def __call__(self, arguments: Mapping[str, Any]) -> Any:
        if self.names is None:
            return self.fn(**arguments)
        return self.fn(**{k: v for k, v in arguments.items() if k in self.names})


class _Binding:
    """A decorated function's limits resolved under one engine and settings generation."""

    __slots__ = ("engine", "generation", "limits", "queues", "static", "strategy")

    def __init__(self, engine: RateLimiter, limits: tuple[Limit, ...], strategy: Strategy,
                 static: tuple[int, ...] | None, generation: int) -> None:
        self.engine = engine
        self.limits = limits
        self.strategy = strategy
        self.static = static
        self.generation = generation
        self.queues: dict[str, Queue] = {}


class LimitedFunction(Generic[P, T]):
    """The engine of one function decorated with `rate_limited`; its ``wrapper`` is what users call.

    The wrapper is a plain ``async def`` (it binds as a method). Per call it computes the key and the
    costs, waits for admission, calls the function, and settles: on a rate-limit error it pauses the key
    (every process), lowers the rate in adaptive mode and retries if asked; on success it raises the rate
    back in adaptive mode and charges the actual cost if ``actual=`` says it.

    Raises:
        ConfigError: A limit string, ``cost`` mapping, ``timeout``, ``strategy``, ``storage``, retry or
            adaptive setting is invalid (the message names it).
        TypeError: ``fn`` is not an async function.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        limits: Sequence[str | Limit],
        *,
        cost: int | Callable[..., int | float] | Mapping[str, int | Callable[..., int | float]] | None = None,
        key: Callable[..., Any] | None = None,
        timeout: float | str | timedelta | None = None,
        strategy: str | None = None,
        storage: str | None = None,
        limiter: RateLimiter | None = None,
        retries: int = 0,
        backoff: float | str | timedelta = 1.0,
        max_backoff: float | str | timedelta = 60.0,
        adaptive: Adaptive | bool = False,
        rate_limit_error: Callable[[BaseException], bool | float | None] | None = None,
        actual: Callable[[T], int | float] | Mapping[str, Callable[[T], int | float]] | None = None,
        name: str | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"rate_limited needs an async function, got {fn!r}")
        self._fn = fn
        self.identity = name or function_identity(fn)
        if not limits:
            raise ConfigError("rate_limited.limits", (), "give at least one limit, e.g. "
                                                         "@rate_limited('llm-rpm') or @rate_limited('3500/minute')")
        self._specs: list[str | Limit] = []
        for i, spec in enumerate(limits):
            field = f"rate_limited.limits[{i}]"
            if isinstance(spec, Limit):
                self._specs.append(spec)
            elif not isinstance(spec, str) or not spec.strip():
                raise ConfigError(field, spec, "expected a limit name from the settings or a limit like "
                                               "'3500/minute'")
            elif looks_like_spec(spec):
                inline = parse_limit(spec, field)
                self._specs.append(Limit(f"{self.identity}#{inline.spec}", inline.spec, inline.items))
            elif LIMIT_NAME.match(spec.strip()):
                self._specs.append(spec.strip())
            else:
                raise ConfigError(field, spec, "neither a limit name (letters, digits, '-', '_', '.') nor a limit "
                                               "like '3500/minute'")
        self._names = [s.name if isinstance(s, Limit) else s for s in self._specs]
        self._cost_plan = self._plan(cost, "cost", 1)
        self._actual_plan = self._plan(actual, "actual", None) if actual is not None else None
        if self._actual_plan is not None and not all(a is None or callable(a) for a in self._actual_plan):
            raise ConfigError("actual", actual, "expected a function of the result, or a mapping of them")
        self._actual_fns = (None if self._actual_plan is None
                            else [None if a is None else a for a in self._actual_plan])
        self._key = _ArgFunction(key) if key is not None else None
        if key is not None and not callable(key):
            raise ConfigError("key", key, "expected a function of the call's arguments")
        self._timeout = None if timeout is None else parse_duration(timeout, "timeout", allow_zero=True)
        self._strategy = None if strategy is None else strategy_name(strategy, "strategy")
        if storage is not None:
            limits_storage_url(storage, "storage")
        self._storage = storage
        self._limiter = limiter
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError("retries", retries, "expected a number of retries >= 0")
        self._retries = retries
        self._backoff = parse_duration(backoff, "backoff")
        self._max_backoff = parse_duration(max_backoff, "max_backoff")
        self._adaptive = as_adaptive(adaptive)
        if rate_limit_error is not None and not callable(rate_limit_error):
            raise ConfigError("rate_limit_error", rate_limit_error, "expected a function of the exception")
        self._predicate = rate_limit_error
        self._signature = inspect.signature(fn)
        self._needs_arguments = self._key is not None or any(callable(c) for c in self._cost_plan)
        self._binding: _Binding | None = None
        if all(isinstance(s, Limit) for s in self._specs):  # all known: a fixed cost above one is a config error
            for spec, entry in zip(self._specs, self._cost_plan, strict=True):
                assert isinstance(spec, Limit)
                if not callable(entry):
                    try:
                        cost_units(entry, spec, "")
                    except (RateLimitExceeded, TypeError, ValueError) as exc:
                        raise ConfigError("cost", entry, str(exc)) from None
        self.wrapper = self._build_wrapper()

    def _plan(self, value: Any, field: str, default: Any) -> list[Any]:
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in self._names and not any(
                isinstance(s, Limit) and s.spec == k for s in self._specs))
            if unknown:
                raise ConfigError(f"{field}[{unknown[0]!r}]", value[unknown[0]],
                                  f"not one of the limits ({', '.join(map(str, self._names))})")
            plan = [value.get(n, default) for n in self._names]
            for i, s in enumerate(self._specs):
                if isinstance(s, Limit) and s.spec in value:
                    plan[i] = value[s.spec]
        elif value is None:
            plan = [default] * len(self._specs)
        elif len(self._specs) == 1:
            plan = [value]
        else:
            plan = [default, *([value] * (len(self._specs) - 1))]
        for entry in plan:
            if entry is not default and not callable(entry) and (
                    isinstance(entry, bool) or not isinstance(entry, int | float) or entry < 0):
                raise ConfigError(field, entry, "expected a number of units >= 0 or a function of the call's "
                                                "arguments")
        return [(_ArgFunction(e) if callable(e) and field == "cost" else e) for e in plan]

    # -- binding ----------------------------------------------------------------------------------------

    def _bind(self) -> _Binding:
        engine = self._limiter or default_limiter(self._storage)
        limits = tuple(engine.resolve(s, f"rate_limited.limits[{i}]") for i, s in enumerate(self._specs))
        strategy = engine._strategy(self._strategy or engine.strategy)
        static: tuple[int, ...] | None = None
        if not any(callable(c) for c in self._cost_plan):
            costs: list[int] = []
            for limit, entry in zip(limits, self._cost_plan, strict=True):
                costs.extend([cost_units(entry, limit, "")] * len(limit.items))
            static = tuple(costs)
        binding = self._binding = _Binding(engine, limits, strategy, static, tracker.generation)
        return binding

    @property
    def limiter(self) -> RateLimiter:
        """The engine this function waits in now."""
        return self._current().engine

    def _current(self) -> _Binding:
        binding = self._binding
        if binding is None or binding.generation != tracker.generation:
            binding = self._bind()
        return binding

    def _queue(self, binding: _Binding, key: str) -> Queue:
        queue = binding.queues.get(key)
        if queue is None:
            if len(binding.queues) >= SWEEP_AT:
                self._sweep(binding)
            queue = binding.queues[key] = binding.engine._queue(binding.limits, key, binding.strategy)
        return queue

    @staticmethod
    def _sweep(binding: _Binding) -> None:
        now = binding.engine._clock()
        for key, queue in list(binding.queues.items()):
            if not queue.waiters and not queue.held and queue.blocked_until < now and queue.paused_until < now:
                del binding.queues[key]
                binding.engine._forget(queue)

    def _costs(self, binding: _Binding, arguments: Mapping[str, Any], key: str) -> tuple[int, ...]:
        costs: list[int] = []
        for limit, entry in zip(binding.limits, self._cost_plan, strict=True):
            value = entry(arguments) if callable(entry) else entry
            costs.extend([cost_units(value, limit, key)] * len(limit.items))
        return tuple(costs)

    def _arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def _actual_costs(self, binding: _Binding, result: Any) -> tuple[int | None, ...] | None:
        if self._actual_fns is None:
            return None
        out: list[int | None] = []
        for limit, fn in zip(binding.limits, self._actual_fns, strict=True):
            units = None
            if fn is not None:
                units = cost_units(fn(result), limit, "", check=False)
            out.extend([units] * len(limit.items))
        return tuple(out)

    def _delay(self, attempt: int, retry_after: float | None) -> tuple[float, float]:
        """``(pause for every caller of the key, this caller's wait before retrying)`` after a rate-limit error.

        The back-off doubles per attempt up to ``max_backoff``; each caller waits a random time between half
        of it and all of it ("equal jitter"), so retries spread out, and never less than the Retry-After. The
        shared pause is the Retry-After, or half the back-off (the least any retry waits) when there is none.
        """
        backoff = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
        jittered = backoff / 2 + random.uniform(0, backoff / 2)
        if retry_after is None:
            return backoff / 2, jittered
        return retry_after, max(retry_after, jittered)

    # -- calls --------------------------------------------------------------------------------------------

    async def call(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function under its limits (what the wrapper does)."""
        binding = self._binding
        if binding is None or binding.generation != tracker.generation:
            binding = self._bind()
        if self._needs_arguments:
            arguments = self._arguments(args, kwargs)
            key = "" if self._key is None else str(self._key(arguments))
            costs = self._costs(binding, arguments, key)
        else:
            key = ""
            costs = binding.static  # type: ignore[assignment]
        queue = binding.queues.get(key) or self._queue(binding, key)
        engine = binding.engine
        attempt = 0
        while True:
            since = await engine._acquire(queue, costs, self._timeout)
            try:
                result = await self._fn(*args, **kwargs)
            except Exception as exc:
                retry_after = rate_limit_retry_after(exc, self._predicate)
                if retry_after == NOT_RATE_LIMITED:
                    raise
                attempt += 1
                engine.stats.rate_limit_errors += 1
                if self._adaptive is not None:
                    engine._decrease(queue.windows, since, self._adaptive)
                pause, wait = self._delay(attempt, retry_after)
                await engine._pause(queue.windows, pause)
                if attempt > self._retries:
                    raise
                engine.stats.retries += 1
                await anyio.sleep(wait)
                continue
            if self._adaptive is not None:
                engine._increase(queue.windows, self._adaptive)
            if self._actual_fns is not None:
                actual = self._actual_costs(binding, result)
                if actual is not None:
                    await engine._correct(queue, costs, actual, since)
            return result

    def _build_wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        call = self.call

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await call(*args, **kwargs)

        functools.update_wrapper(wrapper, self._fn)
        wrapper.rate_limit = self  # type: ignore[attr-defined]
        return wrapper

    def __repr__(self) -> str:
        return f"<LimitedFunction of {self.identity} under {', '.join(map(str, self._names))}>"

