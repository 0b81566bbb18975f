"""cachelayers: make expensive async calls in AI pipelines cheaper, faster and safer.

Four decorators wrap any ``async def``; this release provides `multilevel_cached`, the exact cache over
memory → Redis → disk tiers. Configure backends with `configure` and a `Settings` object, or run on the
embedded default (one bounded memory tier) with no configuration at all.
"""

from __future__ import annotations

from cachelayers.backends import Backend, BackendURL, StoreItem, register_backend
from cachelayers.backends.memory import MemoryBackend
from cachelayers.codec import Codec, register_codec
from cachelayers.decorators import CachedFunction, multilevel_cached
from cachelayers.engines import FunctionCache, TieredCache, default_cache
from cachelayers.errors import (
    BackendError,
    CacheLayersError,
    ConfigError,
    IntegrityError,
    MissingDependencyError,
    SerializationError,
    UnkeyableArgumentError,
)
from cachelayers.metrics import CacheInfo, stats
from cachelayers.settings import Settings, configure, get_settings, reset_settings

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendURL",
    "CacheInfo",
    "CacheLayersError",
    "CachedFunction",
    "Codec",
    "ConfigError",
    "FunctionCache",
    "IntegrityError",
    "MemoryBackend",
    "MissingDependencyError",
    "SerializationError",
    "Settings",
    "StoreItem",
    "TieredCache",
    "UnkeyableArgumentError",
    "configure",
    "default_cache",
    "get_settings",
    "invalidate_namespace",
    "invalidate_tags",
    "multilevel_cached",
    "register_backend",
    "register_codec",
    "reset_settings",
    "stats",
]


async def invalidate_tags(*tags: str) -> None:
    """Remove every entry carrying any of ``tags`` from every tier of the settings in force."""
    await default_cache().invalidate_tags(*tags)


async def invalidate_namespace(namespace: str) -> None:
    """Remove every entry of ``namespace`` from every tier of the settings in force."""
    await default_cache().invalidate_namespace(namespace)
