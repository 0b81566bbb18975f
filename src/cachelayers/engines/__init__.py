"""Engines do the work behind the decorators; each can be used directly."""

from cachelayers.engines.batcher import Batcher, BatchInfo, QueueFullPolicy, Rows
from cachelayers.engines.breaker import CircuitBreaker
from cachelayers.engines.parallel import Outcome, gather_bounded, with_fallbacks
from cachelayers.engines.tiered import FunctionCache, TieredCache, default_cache, namespace_tag

__all__ = [
    "BatchInfo",
    "Batcher",
    "CircuitBreaker",
    "FunctionCache",
    "Outcome",
    "QueueFullPolicy",
    "Rows",
    "TieredCache",
    "default_cache",
    "gather_bounded",
    "namespace_tag",
    "with_fallbacks",
]
