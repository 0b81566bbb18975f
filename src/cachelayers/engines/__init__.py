"""Engines do the work behind the decorators; each can be used directly."""

from cachelayers.engines.breaker import CircuitBreaker
from cachelayers.engines.tiered import FunctionCache, TieredCache, default_cache, namespace_tag

__all__ = ["CircuitBreaker", "FunctionCache", "TieredCache", "default_cache", "namespace_tag"]
