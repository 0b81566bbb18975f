"""The one registry of URL schemes: exact-cache tiers, vector indexes and rate-limit storage.

Every URL the settings hold is resolved here: ``load(url, kind)`` imports what is registered for the URL's
scheme under ``kind`` only then, after checking that its driver is installed (a missing one raises
`MissingDependencyError` naming the extra). Third-party backends register with `register_backend`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Literal, NamedTuple

from cachelayers.backends.base import Backend, BackendURL
from cachelayers.errors import ConfigError, MissingDependencyError

__all__ = ["Kind", "Registration", "backend_class", "load", "register_backend", "registered_schemes",
           "registration", "unregister_backend"]

Kind = Literal["tier", "vector_index", "limits"]
"""What a URL is for: an exact-cache tier (a `Backend`), a semantic vector index, or rate-limit storage."""

_KINDS: tuple[Kind, ...] = ("tier", "vector_index", "limits")


class Registration(NamedTuple):
    """What is registered for one scheme of one kind."""

    target: str
    """``"package.module:Name"``, imported on first use."""
    driver: str | None
    """Top-level module the target needs, checked before it is imported."""
    extra: str | None
    """The cachelayers extra that installs the driver, quoted in the error."""


_registry: dict[tuple[Kind, str], Registration] = {}


def register_backend(scheme: str, target: str, *, driver: str | None = None, extra: str | None = None,
                     kind: Kind = "tier") -> None:
    """Register what serves a URL scheme.

    Args:
        scheme: URL scheme, e.g. ``"memory"``.
        target: ``"package.module:Name"``; for a tier, a `Backend` subclass. Imported on first use.
        driver: Module that must be importable for the target to work (checked at configuration time).
        extra: Name of the cachelayers extra that installs the driver, quoted in the error.
        kind: ``"tier"`` (the default), ``"vector_index"`` or ``"limits"``.

    Raises:
        ConfigError: ``kind`` is not one of the kinds, or ``target`` is not ``"module:Name"``.
    """
    if kind not in _KINDS:
        raise ConfigError("kind", kind, f"expected one of {', '.join(_KINDS)}")
    module, _, name = target.partition(":")
    if not module or not name:
        raise ConfigError("target", target, "expected 'package.module:Name'")
    _registry[kind, scheme.lower()] = Registration(target, driver, extra)


def unregister_backend(scheme: str, *, kind: Kind = "tier") -> None:
    """Forget what was registered for ``scheme`` (no error when nothing was)."""
    _registry.pop((kind, scheme.lower()), None)


def registered_schemes(kind: Kind = "tier") -> list[str]:
    """Return the URL schemes registered for ``kind``, sorted."""
    return sorted(scheme for k, scheme in _registry if k == kind)


def registration(url: BackendURL, kind: Kind = "tier") -> Registration:
    """Return what is registered for ``url``'s scheme, checking that its driver is installed.

    Raises:
        ConfigError: The scheme is not registered for ``kind``.
        MissingDependencyError: The driver is not installed.
    """
    found = _registry.get((kind, url.scheme))
    if found is None:
        raise ConfigError(url.field, url.redacted(),
                          f"unknown scheme {url.scheme!r}; known schemes: {', '.join(registered_schemes(kind))}")
    if found.driver is not None and importlib.util.find_spec(found.driver) is None:
        raise MissingDependencyError(url.field, url.redacted(), found.driver, found.extra or "all")
    return found


def load(url: BackendURL, kind: Kind = "tier") -> Any:
    """Import and return what is registered for ``url``'s scheme under ``kind``.

    Raises:
        ConfigError: The scheme is not registered for ``kind``.
        MissingDependencyError: The driver is not installed.
    """
    module_name, _, name = registration(url, kind).target.partition(":")
    return getattr(importlib.import_module(module_name), name)


def backend_class(url: BackendURL) -> type[Backend]:
    """Return the `Backend` class registered for ``url``'s scheme, importing it now.

    Raises:
        ConfigError: The scheme is unknown, or what it names is not a `Backend` subclass.
        MissingDependencyError: The backend's driver is not installed.
    """
    cls = load(url, "tier")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(url.field, url.redacted(), f"{registration(url).target} is not a Backend subclass")
    return cls


register_backend("memory", "cachelayers.backends.memory:MemoryBackend")
for _scheme in ("redis", "rediss", "redis+cluster", "unix"):
    register_backend(_scheme, "cachelayers.backends.redis:RedisBackend", driver="redis", extra="redis")
register_backend("disk", "cachelayers.backends.disk:DiskBackend", driver="sqlite3", extra="disk")
register_backend("memcached", "cachelayers.backends.memcached:MemcachedBackend", driver="aiomcache", extra="memcached")
register_backend("memory", "cachelayers.backends.vectors.base:in_memory", kind="vector_index")
register_backend("usearch", "cachelayers.backends.vectors.disk_store:DiskStore", kind="vector_index")
for _scheme in ("redis", "rediss", "redis+cluster"):
    register_backend(_scheme, "cachelayers.backends.vectors.redis_store:RedisStore", driver="redis", extra="redis",
                     kind="vector_index")
register_backend("memory", "cachelayers.backends.limits_storage:memory_limits_url", kind="limits")
for _scheme in ("redis", "rediss", "redis+cluster", "redis+sentinel", "unix"):  # the driver is checked on creation
    register_backend(_scheme, "cachelayers.backends.limits_storage:redis_limits_url", kind="limits")
