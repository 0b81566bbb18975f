"""The memcached tier, through aiocache (``memcached://host:port``).

Memcached has neither sets nor key scans, so the tier keeps the storage contract with small stored tokens:
every entry carries the generation of its store and the version of each of its tags; `clear` and
`delete_tags` replace those tokens, and an entry whose tokens are no longer current is never returned.
See `MemcachedBackend` and the page ``docs/backends/memcached.md``.
"""

from cachelayers.backends.memcached.backend import MemcachedBackend

__all__ = ["MemcachedBackend"]
