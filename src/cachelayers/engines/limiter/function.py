"""The engine of one function decorated with `rate_limited`: key and costs per call, admission, settling."""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, Unpack

import anyio

from cachelayers.backends.limits_storage import limits_storage_url
from cachelayers.durations import parse_duration
from cachelayers.engines.limiter.adaptive import as_adaptive
from cachelayers.engines.limiter.arguments import ArgFunction, positional_names
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
from cachelayers.engines.limiter.options import LimitOptions
from cachelayers.engines.limiter.queue import SWEEP_AT, Queue
from cachelayers.engines.limiter.retry_after import NOT_RATE_LIMITED, rate_limit_retry_after
from cachelayers.errors import ConfigError, RateLimitExceeded
from cachelayers.keys import claim_identity, function_identity
from cachelayers.settings import tracker
from cachelayers.validation import check_options

__all__ = ["LimitedFunction"]

P = ParamSpec("P")
T = TypeVar("T")


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
    """The engine of one function decorated with `rate_limited` (the `RateLimitedFunction` calls `call`).

    Per call it computes the key and the costs (from the positional arguments when the call passes exactly
    the function's parameters, else by binding its signature), waits for admission, calls the function, and
    settles: on a rate-limit error it pauses the key
    (every process), lowers the rate in adaptive mode and retries if asked; on success it raises the rate
    back in adaptive mode and charges the actual cost if ``actual=`` says it.

    Args:
        fn: The async function.
        limits: Limit names or inline limits.
        options: The `LimitOptions`, as documented in `rate_limited`.

    Raises:
        ConfigError: A limit string, ``cost`` mapping, ``timeout``, ``strategy``, ``storage``, retry or
            adaptive setting is invalid (the message names it).
        TypeError: ``fn`` is not an async function, or an option is unknown.
    """

    def __init__(self, fn: Callable[P, Awaitable[T]], limits: Sequence[str | Limit],
                 **options: Unpack[LimitOptions]) -> None:
        check_options(options, LimitOptions, "rate_limited")
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"rate_limited needs an async function, got {fn!r}")
        self.fn = fn
        """The decorated function."""
        self.identity = options.get("name") or function_identity(fn)
        self._specs = _specs(limits, self.identity)
        if options.get("name") is None and any(isinstance(spec, Limit) for spec in self._specs):
            claim_identity(self.identity, fn, scope="inline limits")  # an inline limit is counted under it
        self._names = [s.name if isinstance(s, Limit) else s for s in self._specs]
        self._signature = inspect.signature(fn)
        self._params = positional_names(self._signature)
        self._cost_plan = self._plan(options.get("cost"), "cost", 1)
        actual = options.get("actual")
        self._actual_plan = self._plan(actual, "actual", None) if actual is not None else None
        if self._actual_plan is not None and not all(a is None or callable(a) for a in self._actual_plan):
            raise ConfigError("actual", actual, "expected a function of the result, or a mapping of them")
        self._actual_fns = (None if self._actual_plan is None
                            else [None if a is None else a for a in self._actual_plan])
        key = options.get("key")
        self._key = ArgFunction(key, self._params) if key is not None else None
        if key is not None and not callable(key):
            raise ConfigError("key", key, "expected a function of the call's arguments")
        timeout = options.get("timeout")
        self._timeout = None if timeout is None else parse_duration(timeout, "timeout", allow_zero=True)
        strategy = options.get("strategy")
        self._strategy = None if strategy is None else strategy_name(strategy, "strategy")
        self._storage = options.get("storage")
        if self._storage is not None:
            limits_storage_url(self._storage, "storage")
        self._limiter = options.get("limiter")
        self._retries = options.get("retries", 0)
        if isinstance(self._retries, bool) or not isinstance(self._retries, int) or self._retries < 0:
            raise ConfigError("retries", self._retries, "expected a number of retries >= 0")
        self._backoff = parse_duration(options.get("backoff", 1.0), "backoff")
        self._max_backoff = parse_duration(options.get("max_backoff", 60.0), "max_backoff")
        self._adaptive = as_adaptive(options.get("adaptive", False))
        self._predicate = options.get("rate_limit_error")
        if self._predicate is not None and not callable(self._predicate):
            raise ConfigError("rate_limit_error", self._predicate, "expected a function of the exception")
        self._needs_arguments = self._key is not None or any(callable(c) for c in self._cost_plan)
        self._binding: _Binding | None = None
        self._check_fixed_costs()
        # The fast path (see `call`): a call passing exactly the positional parameters needs no binding.
        fast = all(f.positional is not None for f in (self._key, *self._cost_plan) if isinstance(f, ArgFunction))
        self._arity = len(self._params) if fast and self._params is not None else -1
        self._key_of: Callable[..., Any] = _no_key
        if self._key is not None and self._key.positional is not None:
            self._key_of = self._key.positional

    def _check_fixed_costs(self) -> None:
        """With inline limits only, a fixed cost larger than its limit is a configuration error now."""
        if all(isinstance(s, Limit) for s in self._specs):
            for spec, entry in zip(self._specs, self._cost_plan, strict=True):
                assert isinstance(spec, Limit)
                if not callable(entry):
                    try:
                        cost_units(entry, spec, "")
                    except (RateLimitExceeded, TypeError, ValueError) as exc:
                        raise ConfigError("cost", entry, str(exc)) from None

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
        return [(ArgFunction(e, self._params) if callable(e) and field == "cost" else e) for e in plan]

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

    def _key_and_costs(self, binding: _Binding, args: tuple[Any, ...],
                       kwargs: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
        """The call's key and costs, from its positional arguments when it passes exactly the parameters."""
        arguments = None
        if kwargs or len(args) != self._arity:
            arguments = self._arguments(args, kwargs)
            key = "" if self._key is None else str(self._key(arguments))
        else:
            key = "" if self._key is None else str(self._key_of(*args))
        if binding.static is not None:
            return key, binding.static
        costs: list[int] = []
        for limit, entry in zip(binding.limits, self._cost_plan, strict=True):
            value = entry
            if isinstance(entry, ArgFunction):
                value = entry(arguments) if arguments is not None else _positional(entry)(*args)
            costs.extend([cost_units(value, limit, key)] * len(limit.items))
        return key, tuple(costs)

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
        """Call the function under its limits (what the decorator's wrapper does)."""
        binding = self._binding
        if binding is None or binding.generation != tracker.generation:
            binding = self._bind()
        costs = binding.static
        if not self._needs_arguments:
            key = ""
        elif costs is not None and not kwargs and len(args) == self._arity:
            key = self._key_of(*args)  # the usual case: key= only, the parameters passed by position
            if type(key) is not str:
                key = str(key)
        else:
            key, costs = self._key_and_costs(binding, args, kwargs)
        assert costs is not None
        queue = binding.queues.get(key) or self._queue(binding, key)
        engine = binding.engine
        attempt = 0
        while True:
            since = await engine._acquire(queue, costs, self._timeout)
            try:
                result = await self.fn(*args, **kwargs)
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

    @functools.cached_property
    def wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        """A plain ``async def`` calling `call`, for using the engine without the decorator."""
        call = self.call

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await call(*args, **kwargs)

        functools.update_wrapper(wrapper, self.fn)
        wrapper.rate_limit = self  # type: ignore[attr-defined]
        return wrapper

    def __repr__(self) -> str:
        return f"<LimitedFunction of {self.identity} under {', '.join(map(str, self._names))}>"


def _no_key(*args: Any) -> str:
    return ""


def _positional(entry: ArgFunction) -> Callable[..., Any]:
    assert entry.positional is not None  # the fast path is taken only when every function has one
    return entry.positional


def _specs(limits: Sequence[str | Limit], identity: str) -> list[str | Limit]:
    """Check the decorator's limits: names stay names, inline limits become this function's `Limit`.

    Raises:
        ConfigError: No limits, or one that is neither a name nor a valid inline limit.
    """
    if not limits:
        raise ConfigError("rate_limited.limits", (), "give at least one limit, e.g. "
                                                     "@rate_limited('llm-rpm') or @rate_limited('3500/minute')")
    specs: list[str | Limit] = []
    for i, spec in enumerate(limits):
        field = f"rate_limited.limits[{i}]"
        if isinstance(spec, Limit):
            specs.append(spec)
        elif not isinstance(spec, str) or not spec.strip():
            raise ConfigError(field, spec, "expected a limit name from the settings or a limit like "
                                           "'3500/minute'")
        elif looks_like_spec(spec):
            inline = parse_limit(spec, field)
            specs.append(Limit(f"{identity}#{inline.spec}", inline.spec, inline.items))
        elif LIMIT_NAME.match(spec.strip()):
            specs.append(spec.strip())
        else:
            raise ConfigError(field, spec, "neither a limit name (letters, digits, '-', '_', '.') nor a limit "
                                           "like '3500/minute'")
    return specs
