"""Storage backends, registered by URL scheme and loaded lazily.

``create_backend("redis://localhost:6379/0")`` imports the Redis backend only then, and a missing driver
raises `MissingDependencyError` naming the extra to install. Third-party backends register with
`register_backend`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import NamedTuple

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
from cachelayers.errors import ConfigError, MissingDependencyError

__all__ = ["Backend", "BackendURL", "ClearPrefixSupport", "Clock", "DeadlineSupport", "LockSupport", "PubSubSupport",
           "StoreItem", "backend_class", "create_backend", "register_backend", "registered_schemes",
           "validate_backend_url"]


class _Registration(NamedTuple):
    target: str  # "module:Class"
    driver: str | None  # top-level module the backend needs, checked before import
    extra: str | None  # the cachelayers extra that installs it


_registry: dict[str, _Registration] = {}


def register_backend(scheme: str, target: str, *, driver: str | None = None, extra: str | None = None) -> None:
    """Register a backend class for a URL scheme.

    Args:
        scheme: URL scheme, e.g. ``"memory"``.
        target: ``"package.module:ClassName"`` of a `Backend` subclass; imported on first use.
        driver: Module that must be importable for the backend to work (checked at configuration time).
        extra: Name of the cachelayers extra that installs the driver, quoted in the error.
    """
    _registry[scheme.lower()] = _Registration(target, driver, extra)


def registered_schemes() -> list[str]:
    """Return the registered URL schemes, sorted."""
    return sorted(_registry)


def backend_class(url: BackendURL) -> type[Backend]:
    """Return the class registered for ``url``'s scheme, importing it now.

    Raises:
        ConfigError: The scheme is unknown.
        MissingDependencyError: The backend's driver is not installed.
    """
    registration = _registry.get(url.scheme)
    if registration is None:
        raise ConfigError(url.field, url.redacted(),
                          f"unknown scheme {url.scheme!r}; known schemes: {', '.join(registered_schemes())}")
    if registration.driver is not None and importlib.util.find_spec(registration.driver) is None:
        raise MissingDependencyError(url.field, url.redacted(), registration.driver, registration.extra or "all")
    module_name, _, class_name = registration.target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(url.field, url.redacted(), f"{registration.target} is not a Backend subclass")
    return cls


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


register_backend("memory", "cachelayers.backends.memory:MemoryBackend")
for _scheme in ("redis", "rediss", "redis+cluster", "unix"):
    register_backend(_scheme, "cachelayers.backends.redis:RedisBackend", driver="redis", extra="redis")
register_backend("disk", "cachelayers.backends.disk:DiskBackend", driver="sqlite3", extra="disk")
