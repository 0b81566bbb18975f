"""The rate limiter engine: fair waiting under named, weighted, distributed limits (see the rate-limiting guide)."""

from cachelayers.engines.limiter.adaptive import Adaptive
from cachelayers.engines.limiter.function import LimitedFunction
from cachelayers.engines.limiter.info import LimiterInfo
from cachelayers.engines.limiter.limiter import Permit, RateLimiter, default_limiter
from cachelayers.engines.limiter.limits import DEFAULT_STRATEGY, STRATEGIES, Limit, parse_limit
from cachelayers.engines.limiter.options import LimitOptions
from cachelayers.engines.limiter.retry_after import rate_limit_retry_after

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Adaptive", "Limit", "LimitOptions", "LimitedFunction", "LimiterInfo",
           "Permit", "RateLimiter", "default_limiter", "parse_limit", "rate_limit_retry_after"]
