"""Engines do the work behind the decorators; each can be used directly."""

from cachelayers.breaker import CircuitBreaker
from cachelayers.engines.batcher import Batcher, BatchInfo, QueueFullPolicy, Rows
from cachelayers.engines.limiter import (
    Adaptive,
    LimitedFunction,
    LimiterInfo,
    Permit,
    RateLimiter,
    default_limiter,
    rate_limit_retry_after,
)
from cachelayers.engines.parallel import Outcome, gather_bounded, with_fallbacks
from cachelayers.engines.tiered import FunctionCache, TieredCache, default_cache, namespace_tag

__all__ = [
    "Adaptive",
    "BatchInfo",
    "Batcher",
    "CircuitBreaker",
    "FunctionCache",
    "LimitedFunction",
    "LimiterInfo",
    "Outcome",
    "Permit",
    "QueueFullPolicy",
    "RateLimiter",
    "Rows",
    "TieredCache",
    "default_cache",
    "default_limiter",
    "gather_bounded",
    "namespace_tag",
    "rate_limit_retry_after",
    "with_fallbacks",
]
