"""The Redis tier (``redis://``, ``rediss://``, ``redis+cluster://``, ``unix://``), asyncio only.

redis-py's asyncio client cannot run under trio: there every operation raises `BackendError`, which the
engine treats like any failing tier (a miss, counted, logged once). The modules: `options` (URL options and
the client), `autopipeline` (reads of one tick as one ``MGET``), `pubsub`, `locks`, and `backend`
(`RedisBackend`).
"""

from cachelayers.backends.redis.backend import RedisBackend

__all__ = ["RedisBackend"]
