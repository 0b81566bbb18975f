"""FastAPI and Starlette: `RateLimitExceeded` as HTTP 429 with ``Retry-After``, and an ``X-Cache`` header.

Importing this module imports starlette (install ``cachelayers[fastapi]``); ``import cachelayers`` never does.
Parameters of type ``Request``, ``Response``, ``BackgroundTasks`` and ``WebSocket`` are left out of cache keys
without this module (see `cachelayers.keys.ignore_type`).
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cachelayers import audit
from cachelayers.engines.semantic.lookups import Explanation, explain
from cachelayers.engines.tiered import TieredCache, default_cache
from cachelayers.engines.tiered.guard import invalidate_everywhere
from cachelayers.errors import MissingDependencyError, RateLimitExceeded

try:
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
except ImportError:  # pragma: no cover - exercised only without starlette
    raise MissingDependencyError("cachelayers.integrations.fastapi", None, "starlette", "fastapi") from None

__all__ = ["CacheStatus", "add_exception_handlers", "cache_status", "invalidation_endpoint", "mark_computed",
           "rate_limit_exceeded_handler", "retry_after_header"]


def retry_after_header(retry_after: float | None) -> str | None:
    """The ``Retry-After`` value for a wait of ``retry_after`` seconds: whole seconds, rounded up, at least 1.

    Returns:
        ``None`` when the wait is unknown (``None``), e.g. when a cost can never fit its limit.
    """
    if retry_after is None or not math.isfinite(retry_after):
        return None
    return str(max(1, math.ceil(retry_after)))


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Answer a `RateLimitExceeded` raised by an endpoint with 429 Too Many Requests and ``Retry-After``.

    The JSON body is ``{"detail": ..., "retry_after": seconds or null, "limit": ...}``. Register it with
    ``app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)`` or `add_exception_handlers`.

    Args:
        request: The request that failed.
        exc: The `RateLimitExceeded` it raised.

    Returns:
        The 429 response; ``Retry-After`` is left out when the wait is unknown.

    Raises:
        TypeError: ``exc`` is not a `RateLimitExceeded` (the handler was registered for another exception).
    """
    if not isinstance(exc, RateLimitExceeded):
        raise TypeError(f"rate_limit_exceeded_handler handles RateLimitExceeded, not {type(exc).__name__}")
    header = retry_after_header(exc.retry_after)
    body = {"detail": "rate limit exceeded", "retry_after": exc.retry_after, "limit": exc.limit}
    return JSONResponse(body, status_code=429, headers={"Retry-After": header} if header is not None else None)


def add_exception_handlers(app: Any) -> None:
    """Register `rate_limit_exceeded_handler` for `RateLimitExceeded` on a FastAPI or Starlette ``app``.

    Args:
        app: The application (anything with Starlette's ``add_exception_handler``).

    Raises:
        TypeError: ``app`` has no ``add_exception_handler`` method.
    """
    add = getattr(app, "add_exception_handler", None)
    if not callable(add):
        raise TypeError(f"expected a FastAPI or Starlette application, got {type(app).__name__}")
    add(RateLimitExceeded, rate_limit_exceeded_handler)


class CacheStatus:
    """Whether the cached calls made inside a `cache_status` block computed anything.

    Attributes:
        computed: How many times a function body marked with `mark_computed` ran in the block.
        lookups: How each semantically cached call in the block was answered (`cachelayers.explain`).
    """

    __slots__ = ("computed", "lookups")

    def __init__(self, lookups: Explanation) -> None:
        self.computed = 0
        self.lookups = lookups

    @property
    def hit(self) -> bool:
        """``True`` when nothing was computed: every cached call was answered by a cache (or a call in flight)."""
        return self.computed == 0 and all(lookup.level in ("exact", "semantic") for lookup in self.lookups)

    @property
    def header(self) -> str:
        """The ``X-Cache`` value: ``"HIT"``, ``"HIT-SEMANTIC"`` (a similar earlier question answered) or ``"MISS"``."""
        if not self.hit:
            return "MISS"
        return "HIT-SEMANTIC" if any(lookup.level == "semantic" for lookup in self.lookups) else "HIT"

    def __repr__(self) -> str:
        return f"CacheStatus(computed={self.computed}, header={self.header!r})"


_status: contextvars.ContextVar[CacheStatus | None] = contextvars.ContextVar("cachelayers_cache_status",
                                                                            default=None)


@contextmanager
def cache_status() -> Iterator[CacheStatus]:
    """Track whether the calls in the block were answered from a cache, for an ``X-Cache`` response header.

    A cached function reports that it ran by calling `mark_computed` first thing in its body; semantically
    cached calls report themselves. Calls made in tasks started inside the block count too.

    Example::

        with cache_status() as status:
            result = await product(product_id)
        response.headers["X-Cache"] = status.header
    """
    with explain() as lookups:
        status = CacheStatus(lookups)
        token = _status.set(status)
        try:
            yield status
        finally:
            _status.reset(token)


def mark_computed() -> None:
    """Note, in the enclosing `cache_status` block, that a cached function's body ran (a miss).

    Call it first thing in the body of a cached function. Outside a `cache_status` block it does nothing.
    """
    status = _status.get()
    if status is not None:
        status.computed += 1


Authorize = Callable[[Request], "str | Awaitable[str | None] | None"]


def invalidation_endpoint(authorize: Authorize, cache: TieredCache | None = None,
                          ) -> Callable[[Request], Awaitable[Response]]:
    """An admin endpoint that invalidates through the guarded, audited path the CLI uses.

    Mount it on a FastAPI or Starlette app for ``POST`` with a JSON body
    ``{"tags": [...], "namespaces": [...], "clear": false}``::

        app.add_route("/admin/cache/invalidate", invalidation_endpoint(authorize=check_admin), methods=["POST"])

    Answers 200 ``{"done": [...], "failed_tiers": [], "refused": []}`` when everything landed, 502 with the same
    body when a tier did not take it (queued and replayed by this process), 429 with ``Retry-After`` when
    ``Settings.invalidation_limit`` refused it, 400 for a malformed body, 403 when ``authorize`` refuses.

    Args:
        authorize: Called with the request (sync or async): the actor's name for the audit records, or
            ``None`` to refuse with 403. Nothing is invalidated without it.
        cache: The engine to invalidate through; the engine of the settings in force when omitted.

    Returns:
        The endpoint: ``async (request) -> response``.
    """
    async def endpoint(request: Request) -> Response:
        actor = authorize(request)
        if inspect.isawaitable(actor):
            actor = await actor
        if actor is None:
            return JSONResponse({"detail": "forbidden"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            body = None
        tags, namespaces = _names(body, "tags"), _names(body, "namespaces")
        clear = body.get("clear", False) if isinstance(body, dict) else None
        if tags is None or namespaces is None or not isinstance(clear, bool) or not (tags or namespaces or clear):
            return JSONResponse({"detail": "expected {'tags': [str], 'namespaces': [str], 'clear': bool}, "
                                           "with something to invalidate"}, status_code=400)
        with audit.actor(str(actor)):
            outcome = await invalidate_everywhere(cache if cache is not None else default_cache(), tags=tags,
                                                  namespaces=namespaces, clear=clear)
        result = {"done": list(outcome.done), "failed_tiers": list(outcome.failed_tiers),
                  "refused": list(outcome.refused), "retry_after": outcome.retry_after}
        if outcome.refused:
            header = retry_after_header(outcome.retry_after)
            return JSONResponse(result, status_code=429,
                                headers={"Retry-After": header} if header is not None else None)
        return JSONResponse(result, status_code=200 if outcome.ok else 502)

    return endpoint


def _names(body: Any, field: str) -> list[str] | None:
    value = body.get(field, []) if isinstance(body, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return None
    return value
