"""Redis commands of the shared semantic store (plain Redis 7, no modules): entries, LRU sets, a change log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from cachelayers.backends.base import BackendURL
from cachelayers.errors import MissingDependencyError

__all__ = ["Event", "RedisVectorStore", "StoredEntry"]

_INSERT = """
local base = ARGV[1]
local part = ARGV[2]
local expires = ARGV[6]
local now = tonumber(ARGV[7])
local cap = tonumber(ARGV[8])
local maxlen = ARGV[9]
local replace = ARGV[10]
local pkey = base .. 'p:' .. part
local evicted = {}
local function drop(victim)
  redis.call('DEL', base .. 'e:' .. victim)
  redis.call('ZREM', pkey, victim)
  redis.call('ZREM', base .. 'all', victim)
  redis.call('XADD', base .. 'log', 'MAXLEN', '~', maxlen, '*', 'op', 'd', 'id', victim, 'p', part)
  table.insert(evicted, victim)
end
if replace ~= '' and redis.call('ZSCORE', pkey, replace) then drop(replace) end
local id = ARGV[11]
local ekey = base .. 'e:' .. id
redis.call('HSET', ekey, 'p', part, 't', ARGV[3], 'v', ARGV[4], 'd', ARGV[5], 'x', expires)
if expires ~= '' then redis.call('PEXPIREAT', ekey, expires) end
redis.call('ZADD', pkey, now, id)
redis.call('ZADD', base .. 'all', expires == '' and '+inf' or expires, id)
redis.call('ZREMRANGEBYSCORE', base .. 'all', '-inf', now)
redis.call('XADD', base .. 'log', 'MAXLEN', '~', maxlen, '*', 'op', 'a', 'id', id, 'p', part)
while redis.call('ZCARD', pkey) > cap do
  local victim = redis.call('ZPOPMIN', pkey)[1]
  drop(victim)
end
return {id, evicted}
"""

_REMOVE = """
local base = ARGV[1]
local maxlen = ARGV[2]
local removed = 0
for i = 3, #ARGV, 2 do
  local id, part = ARGV[i], ARGV[i + 1]
  removed = removed + redis.call('DEL', base .. 'e:' .. id)
  redis.call('ZREM', base .. 'p:' .. part, id)
  redis.call('ZREM', base .. 'all', id)
  redis.call('XADD', base .. 'log', 'MAXLEN', '~', maxlen, '*', 'op', 'd', 'id', id, 'p', part)
end
return removed
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


class RedisVectorStore:
    """Commands of the shared semantic store, on a redis-py asyncio client made on first use.

    Keys, all under ``<prefix>sem:{<tag>}:`` (one hash tag, so a cluster keeps them in
    one slot; the tag digests the function's namespace, the embedder and the scalar type, so vectors of two
    embedders never meet):

    ``seq``
        counter handing out entry ids (never reused, so an id names one entry forever);
    ``e:<id>``
        hash of one entry: ``p`` partition (hex), ``t`` text (empty with encryption), ``v`` the sealed row
        (partition, text, float32 vector and expiry, bound to the id: see `cachelayers.backends.vectors.sealing`),
        ``x`` expiry in ms (empty: never), ``d`` sealed payload; expires with the entry (``PEXPIREAT``);
    ``p:<partition>``
        sorted set of the partition's ids by last use (ms): the LRU order for the per-partition capacity;
    ``all``
        sorted set of every id by expiry (ms, ``+inf`` for never): what a new process loads;
    ``log``
        stream of changes, ``op`` = ``a`` (added), ``d`` (removed) or ``c`` (cleared), with ``id`` and ``p``;
        trimmed to about ``stream_maxlen`` entries. Replicas read it to stay in sync.

    An insert takes its id first (`next_id`: the row and payload are sealed bound to it), then the entry with
    the evictions it causes is one Lua script: atomic, one round trip.

    Args:
        url: A ``redis://`` or ``rediss://`` URL.
        base: Prefix of every key, ending with ``:``.
        timeout: Socket timeout of every command, in seconds.
        stream_maxlen: Approximate length the change log is trimmed to.
    """

    def __init__(self, url: BackendURL, base: str, *, timeout: float, stream_maxlen: int) -> None:
        self.url = url
        self.base = base
        self.timeout = timeout
        self.stream_maxlen = stream_maxlen
        self._client: Any = None
        self._insert: Any = None
        self._remove: Any = None

    @property
    def client(self) -> Any:
        """The redis-py asyncio client (made on first use, on the running event loop)."""
        if self._client is None:
            try:
                import redis.asyncio as aioredis
            except ImportError:
                raise MissingDependencyError(self.url.field, self.url.redacted(), "redis", "redis") from None
            query = self.url.url.split("?", 1)[0]
            self._client = aioredis.Redis.from_url(query, socket_timeout=self.timeout,
                                                   socket_connect_timeout=self.timeout)
            self._insert = self._client.register_script(_INSERT)
            self._remove = self._client.register_script(_REMOVE)
        return self._client

    async def next_id(self) -> int:
        """A new entry id (never handed out before)."""
        return int(await self.client.incr(f"{self.base}seq"))

    async def insert(self, id_: int, partition: str, text: str, row: bytes, payload: bytes,
                     expires_at_ms: int | None, now_ms: int, capacity: int,
                     replace: int | None) -> tuple[int, list[int]]:
        """Store entry ``id_`` (from `next_id`), evict beyond ``capacity``; return its id and the evicted ids."""
        _ = self.client
        result = await self._insert(args=[
            self.base, partition, text, row, payload, "" if expires_at_ms is None else str(expires_at_ms),
            str(now_ms), str(capacity), str(self.stream_maxlen), "" if replace is None else str(replace), str(id_)])
        return int(result[0]), [int(v) for v in result[1]]

    async def remove(self, items: Sequence[tuple[int, str]]) -> int:
        """Remove entries given as ``(id, partition)``; return how many existed."""
        if not items:
            return 0
        _ = self.client
        args: list[str] = [self.base, str(self.stream_maxlen)]
        for id_, partition in items:
            args += [str(id_), partition]
        return int(await self._remove(args=args))

    async def payload(self, id_: int, partition: str, now_ms: int) -> bytes | None:
        """The sealed payload of entry ``id_`` (marking it used), or ``None`` when it is gone."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(f"{self.base}e:{id_}", "d")
            pipe.zadd(f"{self.base}p:{partition}", {str(id_): now_ms}, xx=True)
            blob, _ = await pipe.execute()
        return None if blob is None else bytes(blob)

    async def fetch(self, ids: Sequence[int]) -> list[StoredEntry | None]:
        """The entries of ``ids`` (``None`` for those gone), without payloads."""
        out: list[StoredEntry | None] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            async with self.client.pipeline(transaction=False) as pipe:
                for id_ in chunk:
                    pipe.hmget(f"{self.base}e:{id_}", "p", "t", "v", "x")
                rows = await pipe.execute()
            for id_, row in zip(chunk, rows, strict=True):
                if row is None or row[0] is None or row[2] is None:
                    out.append(None)
                    continue
                expires = _str(row[3]) if row[3] is not None else ""
                out.append(StoredEntry(int(id_), _str(row[0]), _str(row[1]), bytes(row[2]),
                                       int(expires) if expires else None))
        return out

    async def live_ids(self, now_ms: int) -> list[int]:
        """Ids of every entry not expired at ``now_ms``, oldest first."""
        ids = await self.client.zrangebyscore(f"{self.base}all", f"({now_ms}", "+inf")
        return sorted(int(_str(i)) for i in ids)

    async def log_position(self) -> tuple[str, int]:
        """The id of the newest change and the number of changes ever logged (``("0-0", 0)`` without a log)."""
        try:
            info = await self.client.xinfo_stream(f"{self.base}log")
        except Exception as exc:  # no such key: nothing was ever logged
            if "no such key" in str(exc).lower():
                return "0-0", 0
            raise
        return _str(info["last-generated-id"]), int(info["entries-added"])

    async def events(self, after: str, count: int = 1000) -> tuple[list[Event], int]:
        """Changes after ``after`` (up to ``count``) and, read atomically with them, the number of changes
        ever logged — with which a reader tells whether changes it never saw were trimmed away."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xread({f"{self.base}log": after}, count=count)
            pipe.xlen(f"{self.base}log")
            pipe.execute_command("XINFO", "STREAM", f"{self.base}log")
            try:
                read, length, info = await pipe.execute(raise_on_error=True)
            except Exception as exc:
                if "no such key" in str(exc).lower():
                    return [], 0
                raise
        fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else dict(info)
        added = int(fields.get(b"entries-added", fields.get("entries-added", length)))
        events: list[Event] = []
        for _, items in read or []:
            for event_id, data in items:
                values = {_str(k): _str(v) for k, v in data.items()}
                events.append(Event(_str(event_id), values.get("op", ""), int(values.get("id") or 0),
                                    values.get("p", "")))
        return events, added

    async def clear(self) -> None:
        """Delete every entry (the id counter is kept, so ids are never reused) and log a ``c`` change."""
        client = self.client
        batch: list[Any] = []
        async for key in client.scan_iter(match=f"{self.base}*", count=500):
            if _str(key) in (f"{self.base}seq", f"{self.base}log"):
                continue
            batch.append(key)
            if len(batch) >= 500:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
        await client.xadd(f"{self.base}log", {"op": "c", "id": "0", "p": ""}, maxlen=self.stream_maxlen,
                          approximate=True)

    async def aclose(self) -> None:
        """Close the connections."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
