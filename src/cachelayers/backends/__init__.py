"""Storage backends, registered by URL scheme and loaded lazily.

``create_backend("redis://localhost:6379/0")`` imports the Redis backend only then, and a missing driver
raises `MissingDependencyError` naming the extra to install. Third-party backends register with
`register_backend`. One registry (`cachelayers.backends.registry`) serves every kind of URL: exact-cache
tiers, vector indexes and rate-limit storage.
"""

from __future__ import annotations

from cachelayers.backends.base import (
    Backend,
    BackendURL,
    ClearPrefixSupport,
    Clock,
    DeadlineSupport,
    LockSupport,
    PubSubSupport,
    StoreItem,
)
from cachelayers.backends.registry import (
    Kind,
    backend_class,
    load,
    register_backend,
    registered_schemes,
    unregister_backend,
)

__all__ = ["Backend", "BackendURL", "ClearPrefixSupport", "Clock", "DeadlineSupport", "Kind", "LockSupport",
           "PubSubSupport", "StoreItem", "backend_class", "create_backend", "load", "register_backend",
           "registered_schemes", "unregister_backend", "validate_backend_url"]


def validate_backend_url(url: str, field: str) -> BackendURL:
    """Parse and check ``url`` without connecting; raise `ConfigError` naming ``field`` if it is bad."""
    parsed = BackendURL.parse(url, field)
    backend_class(parsed).validate_url(parsed)
    return parsed


def create_backend(url: str | BackendURL, *, clock: Clock | None = None, field: str = "url") -> Backend:
    """Build the backend for ``url``.

    Raises:
        ConfigError: The URL is malformed, its scheme unknown or an option invalid.
        MissingDependencyError: The backend's driver is not installed.
    """
    parsed = url if isinstance(url, BackendURL) else BackendURL.parse(url, field)
    cls = backend_class(parsed)
    cls.validate_url(parsed)
    return cls(parsed) if clock is None else cls(parsed, clock=clock)
