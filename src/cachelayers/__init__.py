"""cachelayers: make expensive async calls in AI pipelines cheaper, faster and safer.

Four decorators wrap any ``async def``, or a plain ``def`` called from any thread: `multilevel_cached` (an exact
cache over memory → Redis → disk tiers), `semantic_cached` (answers from a similar earlier call), `batched`
(micro-batching) and `rate_limited` (fair waiting under named limits). Configure backends with `configure` and a
`Settings` object, or run on the embedded default (one bounded memory tier, an in-process vector index, limits in
memory) with no configuration.
"""

from __future__ import annotations

from cachelayers.backends import Backend, BackendURL, StoreItem, register_backend
from cachelayers.backends.memory import MemoryBackend
from cachelayers.codec import Codec, register_codec
from cachelayers.decorators import (
    BatchedFunction,
    CachedFunction,
    RateLimitedFunction,
    SemanticCachedFunction,
    SyncBatchedFunction,
    SyncCachedFunction,
    SyncRateLimitedFunction,
    SyncSemanticCachedFunction,
    batched,
    multilevel_cached,
    rate_limited,
    semantic_cached,
)
from cachelayers.embedders import HashingEmbedder
from cachelayers.engines import (
    Adaptive,
    Batcher,
    BatchInfo,
    FunctionCache,
    LimiterInfo,
    Outcome,
    Permit,
    RateLimiter,
    TieredCache,
    default_cache,
    gather_bounded,
    with_fallbacks,
)
from cachelayers.engines.semantic import (
    AnswerAgreement,
    Candidate,
    Explanation,
    Lookup,
    SemanticCacheInfo,
    SemanticFunction,
    explain,
    last_lookup,
)
from cachelayers.engines.tiered.control import bypass, refresh
from cachelayers.errors import (
    AllAttemptsFailedError,
    BackendError,
    BatcherClosedError,
    BatchError,
    BatchQueueFullError,
    CacheLayersError,
    CircuitOpenError,
    ConfigError,
    EmbeddingError,
    IntegrityError,
    InvalidationError,
    MissingDependencyError,
    RateLimitExceeded,
    SerializationError,
    UnkeyableArgumentError,
)
from cachelayers.metrics import CacheInfo, stats
from cachelayers.settings import Settings, configure, get_settings, reset_settings

__version__ = "0.1.0"

__all__ = [
    "Adaptive",
    "AllAttemptsFailedError",
    "AnswerAgreement",
    "Backend",
    "BackendError",
    "BackendURL",
    "BatchError",
    "BatchInfo",
    "BatchQueueFullError",
    "BatchedFunction",
    "Batcher",
    "BatcherClosedError",
    "CacheInfo",
    "CacheLayersError",
    "CachedFunction",
    "Candidate",
    "CircuitOpenError",
    "Codec",
    "ConfigError",
    "EmbeddingError",
    "Explanation",
    "FunctionCache",
    "HashingEmbedder",
    "IntegrityError",
    "InvalidationError",
    "LimiterInfo",
    "Lookup",
    "MemoryBackend",
    "MissingDependencyError",
    "Outcome",
    "Permit",
    "RateLimitExceeded",
    "RateLimitedFunction",
    "RateLimiter",
    "SemanticCacheInfo",
    "SemanticCachedFunction",
    "SemanticFunction",
    "SerializationError",
    "Settings",
    "StoreItem",
    "SyncBatchedFunction",
    "SyncCachedFunction",
    "SyncRateLimitedFunction",
    "SyncSemanticCachedFunction",
    "TieredCache",
    "UnkeyableArgumentError",
    "batched",
    "bypass",
    "configure",
    "default_cache",
    "explain",
    "gather_bounded",
    "get_settings",
    "invalidate_namespace",
    "invalidate_tags",
    "last_lookup",
    "multilevel_cached",
    "rate_limited",
    "refresh",
    "register_backend",
    "register_codec",
    "reset_settings",
    "semantic_cached",
    "stats",
    "with_fallbacks",
]


async def invalidate_tags(*tags: str) -> None:
    """Remove every entry carrying any of ``tags`` from every tier of the settings in force.

    Raises:
        InvalidationError: A tier did not take it within the tier timeout: it is queued and replayed, and no
            process serves the entries it covers once the tier is back (see the tiers guide, "Invalidation").
    """
    await default_cache().invalidate_tags(*tags)


async def invalidate_namespace(namespace: str) -> None:
    """Remove every entry of ``namespace`` from every tier of the settings in force.

    Raises:
        InvalidationError: As `invalidate_tags`.
    """
    await default_cache().invalidate_namespace(namespace)
