"""Redis commands of the shared semantic store (plain Redis 7, no modules): entries, LRU sets, a change log."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, Final, NamedTuple, ParamSpec, TypeVar

import anyio

from cachelayers.backends.base import BackendURL
from cachelayers.backends.redis.options import DEFAULT_MAX_CONNECTIONS
from cachelayers.breaker import CircuitBreaker
from cachelayers.errors import CircuitOpenError, MissingDependencyError

__all__ = ["Event", "RedisVectorStore", "StoredEntry"]

# The partition's slot: its LRU set (KEYS[1]) and entries (KEYS[2] is the new one; victims share its slot).
_INSERT = """
local pkey = KEYS[1]
local ekey = KEYS[2]
local ebase = ARGV[1]
local expires = ARGV[5]
local now = tonumber(ARGV[6])
local cap = tonumber(ARGV[7])
local replace = ARGV[8]
local id = ARGV[9]
local evicted = {}
local function drop(victim)
  redis.call('DEL', ebase .. victim)
  redis.call('ZREM', pkey, victim)
  table.insert(evicted, victim)
end
if replace ~= '' and redis.call('ZSCORE', pkey, replace) then drop(replace) end
redis.call('HSET', ekey, 'p', ARGV[2], 't', ARGV[3], 'v', ARGV[4], 'd', ARGV[10], 'x', expires)
if expires ~= '' then redis.call('PEXPIREAT', ekey, expires) end
redis.call('ZADD', pkey, now, id)
while redis.call('ZCARD', pkey) > cap do
  drop(redis.call('ZPOPMIN', pkey)[1])
end
return evicted
"""

# The function's slot: a new entry id from the counter (KEYS[1]) that no live entry (KEYS[2]) has, even after the
# counter was reset (a restore, or a writer that set it): an id names one entry as long as it is live.
_NEXT_ID = """
local id = redis.call('INCR', KEYS[1])
local tries = 0
while redis.call('ZSCORE', KEYS[2], id) and tries < 10000000 do
  id = redis.call('INCR', KEYS[1])
  tries = tries + 1
end
return id
"""

# The function's slot: the epoch of the function's keys (KEYS[1]), made when missing (ARGV[1] a new random token).
_EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# The partition's slot: remove entries (ARGV ids) from its LRU set (KEYS[1]).
_REMOVE = """
local ebase = ARGV[1]
local removed = 0
for i = 2, #ARGV do
  removed = removed + redis.call('DEL', ebase .. ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return removed
"""

# The function's slot: the change log (KEYS[1]), the live ids by expiry (KEYS[2]), their partitions (KEYS[3]), the
# count of clears (KEYS[4]) and the epoch (KEYS[5]). ARGV: maxlen, now, partition, added id ('' for none), its
# expiry, the clears and the epoch its writer knew when its computation began ('' for no check), then removed
# ids. An added id whose computation began before a clear (or before Redis lost its keys: another epoch) is not
# logged (no replica ever finds it) and 1 is returned: the writer then deletes it.
_LOG = """
local maxlen, part, added = ARGV[1], ARGV[3], ARGV[4]
local stale = 0
if added ~= '' and ARGV[6] ~= '' and (redis.call('GET', KEYS[5]) ~= ARGV[7]
    or tonumber(redis.call('GET', KEYS[4]) or '0') > tonumber(ARGV[6])) then
  stale = 1
  added = ''
end
if added ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5] == '' and '+inf' or ARGV[5], added)
  redis.call('HSET', KEYS[3], added, part)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'op', 'a', 'id', added, 'p', part)
end
for i = 8, #ARGV do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'op', 'd', 'id', ARGV[i], 'p', part)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
return stale
"""


class StoredEntry(NamedTuple):
    """An entry as stored, without its payload."""

    id: int
    partition: str
    text: str
    vector: bytes
    expires_at_ms: int | None


class Event(NamedTuple):
    """One change from the log: ``op`` is ``"a"``, ``"d"`` or ``"c"``."""

    event_id: str
    op: str
    id: int
    partition: str


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


COMMANDS_IN_FLIGHT: Final = 50
"""Operations one store runs on Redis at once; more wait their turn. Each holds at most one connection per node,
so a burst of misses stays within redis-py's 100 connections per node of a cluster client, which raises rather
than waits when they are all in use."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _gated(method: Callable[Concatenate[RedisVectorStore, _P], Coroutine[Any, Any, _R]],
           ) -> Callable[Concatenate[RedisVectorStore, _P], Coroutine[Any, Any, _R]]:
    """Run ``method`` within the store's `COMMANDS_IN_FLIGHT`."""

    async def run(self: RedisVectorStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with self.gate:
            breaker = self.breaker
            if not breaker.allow():  # Redis kept failing or stalling to the timeout: fail at once for a while
                raise CircuitOpenError(f"Redis at {self.url.redacted()} is failing: not tried for "
                                            f"{breaker.cooldown:g} s after {breaker.threshold} failures in a row")
            try:
                result = await method(self, *args, **kwargs)
            except Exception:
                breaker.failure()
                raise
            breaker.success()
            return result

    run.__name__, run.__qualname__, run.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return run


class RedisVectorStore:
    """Commands of the shared semantic store, on a redis-py asyncio client made on first use.

    Keys of the function (under ``<prefix>sem:{<tag>}:``, one hash slot; the tag digests the function's
    namespace, the embedder and the scalar type, so vectors of two embedders never meet):

    ``seq``
        counter handing out entry ids (an id already live is skipped, so a counter reset by a restore or by
        another writer never gives one id to two live entries);
    ``clears``
        how many times the function's entries were cleared: counted before a clear deletes anything, read by
        every replica as it syncs, and checked when an insert is logged, so that a computation that began
        before a clear (in any process) does not put back what the clear removed;
    ``epoch``
        a random token made by the first process that opens the store: a Redis restarted empty or flushed has
        another (or none), and every replica then reloads instead of mixing ids of two generations;
    ``all``
        sorted set of every id by expiry (ms, ``+inf`` for never): what a new process loads;
    ``where``
        hash of every id in ``all`` to its partition (hex): where a new process finds the entry;
    ``log``
        stream of changes, ``op`` = ``a`` (added), ``d`` (removed) or ``c`` (cleared), with ``id`` and ``p``;
        trimmed to about ``stream_maxlen`` entries. Replicas read it to stay in sync.

    Keys of one partition (under ``<prefix>sem:{<tag>:<partition>}:``: one hash slot per partition, so on a
    Redis Cluster the partitions spread over the nodes while each one's keys stay together):

    ``e:<id>``
        hash of one entry: ``p`` partition (hex), ``t`` text (empty with encryption), ``v`` the sealed row
        (partition, text, float32 vector and expiry, bound to the id: see `cachelayers.backends.vectors.sealing`),
        ``x`` expiry in ms (empty: never), ``d`` sealed payload; expires with the entry (``PEXPIREAT``);
    ``p``
        sorted set of the partition's ids by last use (ms): the LRU order for the per-partition capacity.

    An insert takes its id first (`next_id`: the row and payload are sealed bound to it); then the entry with
    the evictions it causes is one Lua script in the partition's slot (atomic), and the change is logged by a
    second script in the function's slot. A process that dies between the two leaves an entry nobody finds
    (it expires or is evicted like any other); a removal logged late is never served meanwhile, since a hit
    reads the payload from the partition's keys.

    Args:
        url: A ``redis://``, ``rediss://`` or ``redis+cluster://`` URL.
        base: Prefix of the function's keys, ending with ``}:``.
        timeout: Socket timeout of every command, in seconds.
        stream_maxlen: Approximate length the change log is trimmed to.
        breaker: The circuit breaker of its operations (5 failures, 2 s by default).
    """

    def __init__(self, url: BackendURL, base: str, *, timeout: float, stream_maxlen: int,
                 breaker: CircuitBreaker | None = None) -> None:
        self.url = url
        self.breaker = breaker if breaker is not None else CircuitBreaker(5, 2.0, time.monotonic)
        """Stops calling Redis for a while after consecutive failures (timeouts of a stalled server included), so
        that a burst of calls does not each wait out the timeout; then lets one probe through."""
        self.base = base
        self.timeout = timeout
        self.stream_maxlen = stream_maxlen
        self._client: Any = None
        self.gate = anyio.Semaphore(COMMANDS_IN_FLIGHT)
        """Bounds the operations in flight (see `COMMANDS_IN_FLIGHT`); within it, `breaker` decides whether to try."""
        self._insert: Any = None
        self._remove: Any = None
        self._log: Any = None
        self._log_keys = [f"{base}log", f"{base}all", f"{base}where", f"{base}clears", f"{base}epoch"]
        self._next_id: Any = None
        self._epoch: Any = None

    def partition_base(self, partition: str) -> str:
        """Prefix of the keys of ``partition`` (hex): the function's hash tag extended by the partition."""
        return f"{self.base[:-2]}:{partition}}}:"

    @property
    def client(self) -> Any:
        """The redis-py asyncio client (made on first use, on the running event loop)."""
        if self._client is None:
            try:
                import redis.asyncio as aioredis
                from redis.asyncio.cluster import RedisCluster
            except ImportError:
                raise MissingDependencyError(self.url.field, self.url.redacted(), "redis", "redis") from None
            query = self.url.url.split("?", 1)[0]
            if self.url.scheme == "redis+cluster":
                self._client = RedisCluster.from_url("redis://" + query.split("://", 1)[1],
                                                      socket_timeout=self.timeout,
                                                      socket_connect_timeout=self.timeout)
            else:  # a pool that waits for a free connection under a burst rather than raising (as the tiers do)
                pool = aioredis.BlockingConnectionPool.from_url(
                    query, max_connections=DEFAULT_MAX_CONNECTIONS, timeout=self.timeout,
                    socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
                self._client = aioredis.Redis(connection_pool=pool)
            self._insert = self._client.register_script(_INSERT)
            self._remove = self._client.register_script(_REMOVE)
            self._log = self._client.register_script(_LOG)
            self._next_id = self._client.register_script(_NEXT_ID)
            self._epoch = self._client.register_script(_EPOCH)
        return self._client

    @_gated
    async def next_id(self) -> int:
        """A new entry id (no live entry has it)."""
        _ = self.client
        return int(await self._next_id(keys=[f"{self.base}seq", f"{self.base}all"]))

    @_gated
    async def epoch(self) -> str:
        """The epoch of the function's keys in this Redis, made now if missing (see the class)."""
        _ = self.client
        return _str(await self._epoch(keys=[f"{self.base}epoch"], args=[secrets.token_hex(8)]))

    @_gated
    async def insert(self, id_: int, partition: str, text: str, row: bytes, payload: bytes,
                     expires_at_ms: int | None, now_ms: int, capacity: int,
                     replace: int | None, stamp: tuple[str | None, int] | None = None,
                     ) -> tuple[int, list[int], bool]:
        """Store entry ``id_`` (from `next_id`), evict beyond ``capacity``; return its id, the evicted ids and
        whether it was dropped again because the entries were cleared after ``stamp`` (the epoch and the clears
        its writer knew when its computation began; ``None``: no check)."""
        _ = self.client
        pbase = self.partition_base(partition)
        expires = "" if expires_at_ms is None else str(expires_at_ms)
        evicted = await self._insert(keys=[f"{pbase}p", f"{pbase}e:{id_}"], args=[
            f"{pbase}e:", partition, text, row, expires, str(now_ms), str(capacity),
            "" if replace is None else str(replace), str(id_), payload])
        removed = [int(v) for v in evicted]
        count, epoch = ("", "") if stamp is None else (str(stamp[1]), stamp[0] or "")
        stale = await self._log(keys=self._log_keys, args=[
            str(self.stream_maxlen), str(now_ms), partition, str(id_), expires, count, epoch, *map(str, removed)])
        if stale:  # never logged, so no replica knows it: only its keys are left to delete
            await self._remove(keys=[f"{pbase}p"], args=[f"{pbase}e:", str(id_)])
        return id_, removed, bool(stale)

    @_gated
    async def remove(self, items: Sequence[tuple[int, str]]) -> int:
        """Remove entries given as ``(id, partition)``; return how many existed."""
        if not items:
            return 0
        _ = self.client
        by_partition: dict[str, list[str]] = {}
        for id_, partition in items:
            by_partition.setdefault(partition, []).append(str(id_))
        removed = 0
        now = "-inf"
        for partition, ids in by_partition.items():
            pbase = self.partition_base(partition)
            removed += int(await self._remove(keys=[f"{pbase}p"], args=[f"{pbase}e:", *ids]))
            await self._log(keys=self._log_keys, args=[
                str(self.stream_maxlen), now, partition, "", "", "", "", *ids])
        return removed

    @_gated
    async def payload(self, id_: int, partition: str, now_ms: int) -> bytes | None:
        """The sealed payload of entry ``id_`` (marking it used), or ``None`` when it is gone."""
        pbase = self.partition_base(partition)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(f"{pbase}e:{id_}", "d")
            pipe.zadd(f"{pbase}p", {str(id_): now_ms}, xx=True)
            blob, _ = await pipe.execute()
        return None if blob is None else bytes(blob)

    @_gated
    async def fetch(self, items: Sequence[tuple[int, str]]) -> list[StoredEntry | None]:
        """The entries given as ``(id, partition)`` (``None`` for those gone), without payloads."""
        out: list[StoredEntry | None] = []
        for start in range(0, len(items), 500):
            chunk = items[start:start + 500]
            async with self.client.pipeline(transaction=False) as pipe:
                for id_, partition in chunk:
                    pipe.hmget(f"{self.partition_base(partition)}e:{id_}", "p", "t", "v", "x")
                rows = await pipe.execute()
            for (id_, _), row in zip(chunk, rows, strict=True):
                if row is None or row[0] is None or row[2] is None:
                    out.append(None)
                    continue
                expires = _str(row[3]) if row[3] is not None else ""
                out.append(StoredEntry(int(id_), _str(row[0]), _str(row[1]), bytes(row[2]),
                                       int(expires) if expires else None))
        return out

    @_gated
    async def live_ids(self, now_ms: int) -> list[tuple[int, str]]:
        """``(id, partition)`` of every entry not expired at ``now_ms``, oldest first."""
        ids = [_str(i) for i in await self.client.zrangebyscore(f"{self.base}all", f"({now_ms}", "+inf")]
        out = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            partitions = await self.client.hmget(f"{self.base}where", chunk)
            out += [(int(i), _str(p)) for i, p in zip(chunk, partitions, strict=True) if i.isdecimal() and p]
        return sorted(out)

    @_gated
    async def log_position(self) -> tuple[str, int]:
        """The id of the newest change and the number of changes ever logged (``("0-0", 0)`` without a log)."""
        try:
            info = await self.client.xinfo_stream(f"{self.base}log")
        except Exception as exc:  # no such key: nothing was ever logged
            if "no such key" in str(exc).lower():
                return "0-0", 0
            raise
        return _str(info["last-generated-id"]), int(info["entries-added"])

    @_gated
    async def events(self, after: str, count: int = 1000) -> tuple[list[Event], int, str | None, int]:
        """Changes after ``after`` (up to ``count``) and, read atomically with them, the number of changes
        ever logged — with which a reader tells whether changes it never saw were trimmed away —, the epoch
        (``None`` when missing: Redis lost the function's keys) and the count of clears."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(f"{self.base}clears")
            pipe.get(f"{self.base}epoch")
            pipe.xread({f"{self.base}log": after}, count=count)
            pipe.xlen(f"{self.base}log")
            pipe.execute_command("XINFO", "STREAM", f"{self.base}log")
            try:
                clears, epoch, read, length, info = await pipe.execute(raise_on_error=True)
            except Exception as exc:
                if "no such key" in str(exc).lower():
                    clears, epoch = await self.client.mget(f"{self.base}clears", f"{self.base}epoch")
                    return [], 0, None if epoch is None else _str(epoch), int(clears or 0)
                raise
        fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else dict(info)
        added = int(fields.get(b"entries-added", fields.get("entries-added", length)))
        events: list[Event] = []
        for _, items in read or []:
            for event_id, data in items:
                values = {_str(k): _str(v) for k, v in data.items()}
                events.append(Event(_str(event_id), values.get("op", ""), int(values.get("id") or 0),
                                    values.get("p", "")))
        return events, added, None if epoch is None else _str(epoch), int(clears or 0)

    @_gated
    async def cleared(self) -> int:
        """How many times the entries were cleared."""
        return int(await self.client.get(f"{self.base}clears") or 0)

    @_gated
    async def clear(self) -> None:
        """Count the clear, delete every entry (the id counter is kept) and log a ``c`` change."""
        client = self.client
        await client.incr(f"{self.base}clears")  # first: an insert logged from now on whose computation began
        batch: list[Any] = []  # before it is dropped, one logged before it is deleted below
        # Every key of the function and of its partitions starts with the function's base less its "}:".
        async for key in client.scan_iter(match=f"{self.base[:-2]}*", count=500):
            if _str(key) in (f"{self.base}seq", f"{self.base}log", f"{self.base}epoch", f"{self.base}clears"):
                continue
            batch.append(key)
            if len(batch) >= 500:
                await self._delete(batch)
                batch = []
        if batch:
            await self._delete(batch)
        await client.xadd(f"{self.base}log", {"op": "c", "id": "0", "p": ""}, maxlen=self.stream_maxlen,
                          approximate=True)

    async def _delete(self, keys: list[Any]) -> None:
        """Delete ``keys`` (one command per key on a cluster, where they span slots)."""
        if self.url.scheme != "redis+cluster":
            await self.client.delete(*keys)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.delete(key)
            await pipe.execute()

    async def aclose(self) -> None:
        """Close the connections."""
        if self._client is not None:
            client, self._client = self._client, None
            if hasattr(client, "connection_pool"):  # a pool given to the client is not closed with it otherwise
                await client.aclose(close_connection_pool=True)
            else:
                await client.aclose()
