"""The exact cache: read-through over ordered tiers, back-fill, single-flight, fail-open writes.

`TieredCache` owns the tiers of one `Settings` (the first may be the in-process memory tier, a `LocalTier`
holding live objects; every other tier holds sealed envelopes) and offers a key/value API. `FunctionCache` is
the engine of one function decorated with `multilevel_cached` (`BatchFunctionCache` of one cached per item);
the decorator only constructs it. The rules they keep (expiry, back-fill, fail-open, invalidation across
processes, locks) are told in the guides "Exact caching" and "Tiers".
"""

from cachelayers.engines.tiered.batch import BatchFunctionCache
from cachelayers.engines.tiered.cache import TieredCache, default_cache
from cachelayers.engines.tiered.function import FunctionCache
from cachelayers.engines.tiered.options import CacheOptions
from cachelayers.engines.tiered.tags import namespace_tag, user_tags

__all__ = ["BatchFunctionCache", "CacheOptions", "FunctionCache", "TieredCache", "default_cache", "namespace_tag",
           "user_tags"]
