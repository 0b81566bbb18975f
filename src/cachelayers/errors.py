"""Exceptions raised by cachelayers.

Every exception the library raises on purpose derives from `CacheLayersError`:

    CacheLayersError
    ├── ConfigError                 bad configuration, raised when it is given (also a ValueError)
    │   └── MissingDependencyError  an optional driver is not installed (also an ImportError)
    ├── UnkeyableArgumentError      an argument cannot be turned into a cache key (also a TypeError)
    ├── SerializationError          a value cannot be encoded or decoded
    │   └── IntegrityError          a stored entry is corrupt, truncated, foreign or wrongly signed
    ├── BackendError                a tier failed; the driver's exception is kept as ``__cause__``
    ├── InvalidationError           an invalidation did not reach every tier in time; it is queued and
    │                               replayed, and no process serves what it invalidated once the tier is back
    ├── EmbeddingError              an embedder failed or returned malformed vectors (wrong shape, NaN)
    ├── BatchError                  a batch call failed or answered malformed; every caller of the batch
    │                               gets it, the function's exception is kept as ``__cause__``
    ├── BatcherClosedError          an item was submitted to, or left pending in, a closed batcher
    ├── BatchQueueFullError         a batcher's queue is full and its policy is to raise
    ├── RateLimitExceeded           a call was not admitted under its rate limits in time, or its cost can
    │                               never fit; ``retry_after`` says when trying again may succeed
    └── AllAttemptsFailedError      a primary and its fallbacks all failed (also an ExceptionGroup)

Cache failures never reach the caller of a decorated function unless strict mode asks for it: they are
counted, logged once per change of state, and the call goes on uncached.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "AllAttemptsFailedError",
    "BackendError",
    "BatchError",
    "BatchQueueFullError",
    "BatcherClosedError",
    "CacheLayersError",
    "ConfigError",
    "EmbeddingError",
    "IntegrityError",
    "InvalidationError",
    "MissingDependencyError",
    "RateLimitExceeded",
    "SerializationError",
    "UnkeyableArgumentError",
    "redact_urls",
]

# ``scheme://user:password@`` (user may be empty): the password is what goes.
_URL_PASSWORD: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s'\"]*:)([^@\s]*)(@)")
"""A URL's ``user:password@``: the password runs to the ``@`` (quotes included: ``pa'ss`` is a password, and a
``repr`` then quotes the URL with ``"``); a password with ``@`` or a space is refused by `BackendURL.parse`."""


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``redis://:***@host:6379/0``).

    Used wherever a URL may be shown: error messages, ``repr`` of settings and URLs, logs, CLI output.
    """
    if "@" not in text:
        return text
    return _URL_PASSWORD.sub(r"\1***\3", text)


class CacheLayersError(Exception):
    """Root of every exception raised by cachelayers."""


class ConfigError(CacheLayersError, ValueError):
    """Configuration is invalid. The message names the field and the bad value.

    Attributes:
        field: Dotted name of the offending setting or parameter (for example ``"tiers[0]"``).
        value: The value that was rejected.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(redact_urls(f"{field}={value!r}: {reason}"))


class MissingDependencyError(ConfigError, ImportError):
    """An optional driver needed by the configuration is not installed.

    The message names the extra to install, e.g. ``pip install 'cachelayers[redis]'``.
    """

    def __init__(self, field: str, value: object, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            field,
            value,
            f"needs the package {package!r}, which is not installed; "
            f"install it with: pip install 'cachelayers[{extra}]'",
        )


class UnkeyableArgumentError(CacheLayersError, TypeError):
    """A call argument cannot be turned into a stable cache key.

    Attributes:
        argument: The parameter name, with a path into containers (e.g. ``"messages[0]['meta']"``).
    """

    def __init__(self, function: str, argument: str, value: object, *, option: str = "key") -> None:
        self.function = function
        self.argument = argument
        super().__init__(
            f"cannot build a cache key for {function}(): argument {argument!r} of type "
            f"{type(value).__module__}.{type(value).__qualname__} is not keyable. Pass {option}=... to the "
            f"decorator, list the argument in ignore=..., or give the type a __cache_key__() method."
        )


class SerializationError(CacheLayersError):
    """A value could not be encoded for storage, or a payload could not be decoded."""


class IntegrityError(SerializationError):
    """A stored entry failed its integrity check (checksum, signature, format or key binding)."""


class BackendError(CacheLayersError):
    """A storage tier failed. The driver's exception is available as ``__cause__``."""


class CircuitOpenError(BackendError):
    """A storage was not tried: it kept failing (or stalling to its timeout), so its circuit breaker is open."""


class InvalidationError(CacheLayersError):
    """An invalidation (``invalidate_tags``, ``invalidate_namespace``, ``clear``, ``invalidate``, ``delete``)
    did not reach every tier within the tier timeout.

    It is raised after the invalidation was applied everywhere it could be (this process's memory tier always)
    and queued for the tiers it did not reach: the engine replays it in the background and before it reads
    such a tier again. Entries written before it are refused when read from any tier below memory once it
    lands (see the invalidation guide), so no process serves the invalidated values once the tier is back.

    Attributes:
        kind: ``"tags"``, ``"keys"`` or ``"clear"``.
        items: The tags or storage keys invalidated (empty for ``"clear"``).
        tiers: Names of the tiers (or ``"channel"``) it did not reach.
    """

    def __init__(self, kind: str, items: tuple[str, ...], tiers: tuple[str, ...]) -> None:
        self.kind = kind
        self.items = items
        self.tiers = tiers
        shown = ", ".join(repr(i) for i in items[:5]) + (", ..." if len(items) > 5 else "")
        super().__init__(f"invalidation of {kind} [{shown}] did not reach {', '.join(map(repr, tiers))}; "
                         f"it is queued and will be replayed when they answer again")


class EmbeddingError(CacheLayersError):
    """An embedder raised, or returned vectors of the wrong count or dimension, NaN, infinity or zeros.

    The semantic cache counts it and lets the call proceed uncached; the embedder's own exception, if any,
    is ``__cause__``.
    """


class BatchError(CacheLayersError):
    """A batch call failed, was cancelled, or returned a result of the wrong length or type.

    Every caller whose item was in the batch gets it; the batch function's own exception, if any, is
    ``__cause__``. An exception *returned* for one item is not wrapped: only that item's callers get it.

    Attributes:
        function: Name of the batch function.
        batch_size: Number of items in the failed batch.
    """

    def __init__(self, function: str, batch_size: int, reason: str) -> None:
        self.function = function
        self.batch_size = batch_size
        super().__init__(f"batch of {batch_size} item{'s' if batch_size != 1 else ''} to {function}() {reason}")


class BatcherClosedError(CacheLayersError):
    """An item was submitted to a closed batcher, or was still pending when it closed without flushing."""


class BatchQueueFullError(CacheLayersError):
    """A batcher holds ``max_queue`` pending items and its ``queue_full`` policy is ``"raise"``."""


class AllAttemptsFailedError(CacheLayersError, ExceptionGroup[Exception]):
    """A primary and every fallback failed or timed out; ``exceptions`` holds each attempt's error in order.

    It is an `ExceptionGroup`, so ``except* SomeProviderError`` matches it when any attempt raised one.
    """


class RateLimitExceeded(CacheLayersError):
    """A call was not admitted under its rate limits before its timeout, or its cost can never fit a limit.

    Attributes:
        retry_after: Seconds after which trying again may succeed, when known; ``None`` when it is unknown
            or when the cost is larger than the limit (it never fits).
        limit: The limit (or limits) that held the call back.
        key: The key the limit was counted under (a tenant, a model); ``""`` for none.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, limit: str | None = None,
                 key: str = "") -> None:
        self.retry_after = retry_after
        self.limit = limit
        self.key = key
        super().__init__(message)
