"""The options of `multilevel_cached`, declared once, and how the engine reads the ones that need parsing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Final, TypedDict

from cachelayers.durations import parse_duration
from cachelayers.engines.tiered.cache import TieredCache
from cachelayers.errors import ConfigError

__all__ = ["DEFAULT_LOCK_LEASE", "CacheOptions", "lease"]

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
    version: str | int
    ignore: Iterable[str]
    name: str | None
    cost: float | Callable[[Any], float] | None
    cache: TieredCache | None
    stale: float | str | timedelta | None
    lock: bool | float | str | timedelta | None
    batch: bool | str


def lease(lock: bool | float | str | timedelta | None) -> float | None:
    """The lease in seconds of a ``lock=`` option, or ``None`` for no distributed lock.

    Raises:
        ConfigError: ``lock`` is a malformed or non-positive duration.
    """
    if lock is None or lock is False:
        return None
    if lock is True:
        return DEFAULT_LOCK_LEASE
    seconds = parse_duration(lock, "lock")
    if seconds <= 0:
        raise ConfigError("lock", lock, "the lease must be positive (or pass lock=True for the default)")
    return seconds
