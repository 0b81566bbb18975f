"""The decorators: thin, typed constructors of the engines in `cachelayers.engines`, one module each."""

from cachelayers.decorators.batched import BatchDecorator, BatchedFunction, SyncBatchedFunction, batched
from cachelayers.decorators.cached import CacheDecorator, CachedFunction, SyncCachedFunction, multilevel_cached
from cachelayers.decorators.limited import LimitDecorator, RateLimitedFunction, SyncRateLimitedFunction, rate_limited
from cachelayers.decorators.semantic import (
    SemanticCachedFunction,
    SemanticDecorator,
    SyncSemanticCachedFunction,
    semantic_cached,
)

__all__ = ["BatchDecorator", "BatchedFunction", "CacheDecorator", "CachedFunction", "LimitDecorator",
           "RateLimitedFunction", "SemanticCachedFunction", "SemanticDecorator", "SyncBatchedFunction",
           "SyncCachedFunction", "SyncRateLimitedFunction", "SyncSemanticCachedFunction", "batched",
           "multilevel_cached", "rate_limited", "semantic_cached"]
