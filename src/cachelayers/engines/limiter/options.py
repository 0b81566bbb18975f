"""The options of `rate_limited`, declared once: the decorator and `LimitedFunction` both take them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypedDict

from cachelayers.engines.limiter.adaptive import Adaptive
from cachelayers.engines.limiter.limiter import RateLimiter

__all__ = ["LimitOptions"]


class LimitOptions(TypedDict, total=False):
    """The keyword options of `rate_limited` (and of `LimitedFunction`); each is documented in `rate_limited`.

    Defaults: ``cost`` 1 per call, no ``key``, no ``timeout`` (wait as long as needed), the engine's
    ``strategy``, the settings' ``storage``, the settings' engine as ``limiter``, ``retries=0``,
    ``backoff=1.0``, ``max_backoff=60.0``, ``adaptive=False``, the default ``rate_limit_error`` detection, no
    ``actual`` correction, ``name`` the function's ``module.qualname``.
    """

    cost: int | Callable[..., int | float] | Mapping[str, int | Callable[..., int | float]] | None
    key: Callable[..., Any] | None
    timeout: float | str | timedelta | None
    strategy: str | None
    storage: str | None
    limiter: RateLimiter | None
    retries: int
    backoff: float | str | timedelta
    max_backoff: float | str | timedelta
    adaptive: Adaptive | bool
    rate_limit_error: Callable[[BaseException], bool | float | None] | None
    actual: Callable[[Any], int | float] | Mapping[str, Callable[[Any], int | float]] | None
    name: str | None
