"""The options of `multilevel_cached`, declared once, and how the engine reads the ones that need parsing."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Final, TypedDict
from uuid import UUID

from cachelayers.durations import parse_duration, parse_ttl
from cachelayers.engines.tiered.cache import TieredCache
from cachelayers.errors import ConfigError

__all__ = ["DEFAULT_LOCK_LEASE", "CacheOptions", "lease", "result_lifetime", "takes_result", "ttl_options"]

DEFAULT_LOCK_LEASE: Final = 30.0


class CacheOptions(TypedDict, total=False):
    """The keyword options of `multilevel_cached`, also taken by `FunctionCache` and `BatchFunctionCache`.

    Each is documented once, in `multilevel_cached`'s docstring; every one may be omitted.
    """

    ttl: float | str | timedelta | Callable[[Any], float | str | timedelta | None] | None
    cache_if: Callable[[Any], bool] | None
    tags: Callable[..., Iterable[str]] | Iterable[str] | None
    key: Callable[..., Any] | None
    namespace: str | None
    version: str | float | UUID
    ignore: Iterable[str]
    name: str | None
    cost: float | Callable[[Any], float] | None
    cache: TieredCache | None
    stale: float | str | timedelta | None
    lock: bool | float | str | timedelta | None
    batch: bool | str


_ZERO: Final = timedelta(0)


def result_lifetime(cache_if: Callable[[Any], Any] | None, ttl_fn: Callable[[Any], Any] | None,
                    default: float | None, result: Any) -> float | bool | None:
    """Seconds an entry of ``result`` lives (``None``: until invalidated), or ``False`` when it is not stored:
    ``cache_if`` refused it or ``ttl_fn`` gave zero. What either function raises propagates."""
    if cache_if is not None and not cache_if(result):
        return False
    if ttl_fn is not None:
        chosen = ttl_fn(result)
        if chosen == 0 or chosen == _ZERO:
            return False
        if chosen is not None:
            return parse_ttl(chosen, "ttl")
    return default


def lease(lock: bool | float | str | timedelta | None) -> float | None:
    """The lease in seconds of a ``lock=`` option, or ``None`` for no distributed lock.

    Raises:
        ConfigError: ``lock`` is a malformed or non-positive duration, or longer than the tiers can store.
    """
    if lock is None or lock is False:
        return None
    if lock is True:
        return DEFAULT_LOCK_LEASE
    seconds = parse_duration(lock, "lock", stored=True)
    if seconds <= 0:
        raise ConfigError("lock", lock, "the lease must be positive (or pass lock=True for the default)")
    return seconds


def takes_result(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called with one positional argument (the result), as ``ttl=`` and ``cache_if=``
    functions are."""
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): trust it
        return True
    return True


def ttl_options(ttl: Any, cache_if: Any) -> tuple[float | None, Callable[[Any], Any] | None,
                                                  Callable[[Any], bool] | None]:
    """The ``ttl=`` and ``cache_if=`` options read: ``(seconds, ttl function, cache_if function)``.

    Raises:
        ConfigError: ``ttl`` is a malformed duration (or longer than the tiers can store), ``cache_if`` is not a
            function, or a function given for either cannot be called with the result alone.
    """
    ttl_fn = ttl if callable(ttl) else None
    seconds = parse_ttl(ttl, "ttl") if ttl is not None and ttl_fn is None else None
    if cache_if is not None and not callable(cache_if):
        raise ConfigError("cache_if", cache_if, "must be a function of the result returning whether to store it")
    for field, given in (("ttl", ttl_fn), ("cache_if", cache_if)):
        if given is not None and not takes_result(given):
            raise ConfigError(field, given, "a function here is called with the result alone: it must take "
                                            "exactly one positional argument")
    return seconds, ttl_fn, cache_if
