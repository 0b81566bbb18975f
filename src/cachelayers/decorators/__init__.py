"""The decorators: thin, typed constructors of the engines in `cachelayers.engines`, one module each."""

from cachelayers.decorators.batched import BatchedFunction, batched
from cachelayers.decorators.cached import CachedFunction, multilevel_cached
from cachelayers.decorators.limited import RateLimitedFunction, rate_limited
from cachelayers.decorators.semantic import SemanticCachedFunction, semantic_cached

__all__ = ["BatchedFunction", "CachedFunction", "RateLimitedFunction", "SemanticCachedFunction", "batched",
           "multilevel_cached", "rate_limited", "semantic_cached"]
