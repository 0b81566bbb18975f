"""Retry-After detection: whether an exception is a provider's rate-limit error, and how long it asks to wait."""

from __future__ import annotations

import contextlib
import email.utils
import math
import time
from collections.abc import Callable
from typing import Any, Final

from cachelayers.errors import RateLimitExceeded

__all__ = ["NOT_RATE_LIMITED", "rate_limit_retry_after"]


NOT_RATE_LIMITED: Final = -1.0
"""What `rate_limit_retry_after` returns for an error that is not a rate-limit error."""


def _header(headers: Any, name: str) -> str | None:
    getter = getattr(headers, "get", None)
    if getter is None:
        return None
    for variant in (name, name.title(), name.upper()):
        value = getter(variant)
        if value is not None:
            return str(value)
    return None


def _retry_after_from(exc: BaseException, now: float) -> float | None:
    seconds = getattr(exc, "retry_after", None)
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds):
        return max(0.0, float(seconds))
    for holder in (exc, getattr(exc, "response", None)):
        headers = getattr(holder, "headers", None)
        if headers is None:
            continue
        ms = _header(headers, "retry-after-ms")
        if ms is not None:
            with contextlib.suppress(ValueError):
                return max(0.0, float(ms) / 1000)
        value = _header(headers, "retry-after")
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        with contextlib.suppress(TypeError, ValueError):
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - now)
    return None


def _looks_rate_limited(exc: BaseException) -> bool:
    if isinstance(exc, RateLimitExceeded):  # our own limiter's refusal is not the provider's
        return False
    if any("RateLimit" in cls.__name__ for cls in type(exc).__mro__):
        return True
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None:
            continue
        for attribute in ("status_code", "status"):
            if getattr(holder, attribute, None) == 429:
                return True
    return False


def rate_limit_retry_after(exc: BaseException, predicate: Callable[[BaseException], bool | float | None] | None = None,
                           now: float | None = None) -> float | None:
    """Tell whether ``exc`` is a rate-limit error and how long to wait, by duck typing.

    A rate-limit error is one whose class (or a base) has ``RateLimit`` in its name (``openai.RateLimitError``,
    ``anthropic.RateLimitError``), or with ``status_code``/``status`` 429 on itself or its ``response``
    (``httpx.HTTPStatusError``, ``aiohttp.ClientResponseError``). The wait is the ``retry_after`` attribute,
    or the ``Retry-After-Ms`` / ``Retry-After`` header (seconds or an HTTP date) of ``exc.headers`` or
    ``exc.response.headers``.

    Args:
        exc: The exception the call raised.
        predicate: Decides first when given: ``True`` (a rate-limit error), a number (one, with that
            Retry-After in seconds), ``False`` (not one) or ``None`` (no opinion: duck typing decides).
        now: Wall-clock time, for HTTP-date headers.

    Returns:
        ``-1.0`` when ``exc`` is not a rate-limit error; else the Retry-After in seconds, or ``None`` when the
        error does not say.
    """
    now = time.time() if now is None else now
    if predicate is not None:
        verdict = predicate(exc)
        if verdict is False:
            return NOT_RATE_LIMITED
        if isinstance(verdict, int | float) and not isinstance(verdict, bool):
            return max(0.0, float(verdict))
        if verdict is True:
            return _retry_after_from(exc, now)
    if not _looks_rate_limited(exc):
        return NOT_RATE_LIMITED
    return _retry_after_from(exc, now)

