"""Shared mode of the semantic cache: entries in Redis, a usearch replica in every process.

Vectors and payloads live in Redis (see `cachelayers.backends.semantic_redis`); each process keeps a local
replica of the vectors (one usearch index per partition, as in memory mode) and of the texts, so a lookup
is a local search plus one Redis read of the payload on a hit. Replicas follow a Redis stream of changes:

* **a new process** notes the newest change, loads every live entry (ids from the ``all`` set, vectors and
  texts in pipelined batches), then applies the changes made since the note — so nothing is missed;
* **before each lookup** a process pulls the changes it has not seen, at most every ``sync_interval``
  seconds (0.1 by default), so another process's write is found within that interval — no background
  task, no polling while idle. Applying a change twice is harmless (adds and removals are idempotent);
* if the stream was trimmed past the last change a process saw, it reloads everything.

Payloads are sealed with the codec and bound to the entry's partition and text, and a hit always reads the
payload from Redis: an entry removed or expired elsewhere is a miss, never a stale answer. Entry ids come
from a Redis counter and are never reused (usearch reuses the freed graph slots).

Shared mode runs on asyncio (redis-py's asyncio client); under trio the store fails to open and calls run
uncached, counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

from cachelayers.backends.base import BackendURL
from cachelayers.backends.memory import MISSING
from cachelayers.backends.semantic_redis import RedisVectorStore, StoredEntry
from cachelayers.backends.usearch_index import int_option
from cachelayers.durations import parse_duration
from cachelayers.engines.semantic import SemanticStore, _Entry
from cachelayers.errors import SerializationError
from cachelayers.settings import get_settings

__all__ = ["RedisStore"]

_BATCH = 1000


class RedisStore(SemanticStore):
    """The shared store: Redis holds the entries, this process a replica of their vectors (see module doc)."""

    persistent = True
    reuse_keys = False

    def __init__(self, url: BackendURL, namespace: str, **common: Any) -> None:
        super().__init__(**common)
        self.url = url
        self.namespace = namespace
        raw_interval = url.options.get("sync_interval", "0.1")
        self.sync_interval = parse_duration(raw_interval, url.option_field("sync_interval"), allow_zero=True)
        self.stream_maxlen = int_option(url, "stream_maxlen") or 100_000
        self.redis: RedisVectorStore | None = None
        self._last_event = "0-0"
        self._seen = 0  # changes ever logged up to and including _last_event
        self._synced_at = float("-inf")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._syncing = False

    def usable(self) -> bool:
        """Whether the store can serve on the running event loop (its client is bound to one loop)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _base(self) -> str:
        prefix = self.namespace.split(":", 1)[0] + ":" if ":" in self.namespace else ""
        tag = hashlib.blake2b(f"{self.namespace}\x00{self.embedder}\x00{self.options.dtype}".encode(),
                              digest_size=10).hexdigest()
        return f"{prefix}sem:{{{tag}}}:"

    def _payload_key(self, partition: str, text: str) -> str:
        return f"sem:{partition}:{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}"

    async def open(self, embedder: str, ndim: int | None) -> None:
        """Connect and load the replica from Redis."""
        await super().open(embedder, ndim)
        self._loop = asyncio.get_running_loop()
        self.redis = RedisVectorStore(self.url, self._base(), timeout=get_settings().tier_timeout * 4,
                                      stream_maxlen=self.stream_maxlen)
        await self._reload()

    async def _reload(self) -> None:
        assert self.redis is not None
        for part in self.partitions.values():
            part.index.clear()
        self.partitions.clear()
        self.entries.clear()
        self._expiry.clear()
        self._last_event, self._seen = await self.redis.log_position()
        ids = await self.redis.live_ids(self._now_ms())
        self._adopt_stored([e for e in await self.redis.fetch(ids) if e is not None])
        self._synced_at = self._monotonic()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def _monotonic() -> float:
        return asyncio.get_running_loop().time()

    def _adopt_stored(self, stored: Sequence[StoredEntry]) -> None:
        now_ms = self._now_ms()
        for item in stored:
            if item.id in self.entries or (item.expires_at_ms is not None and item.expires_at_ms <= now_ms):
                continue
            vector = np.frombuffer(item.vector, dtype=np.float32)
            if self.ndim is None:
                self.ndim = int(vector.shape[0])
            if vector.shape != (self.ndim,):
                continue  # written by a process with another embedder configuration: never compared
            partition = bytes.fromhex(item.partition)
            part = self._partition(partition)
            previous = part.exact.get(item.text)
            if previous is not None and previous < item.id:
                self._drop(self.entries[previous])  # the same text stored twice: the newer one wins
            elif previous is not None:
                continue
            expires_at = item.expires_at_ms / 1000 if item.expires_at_ms is not None else None
            part.index.add(item.id, vector)
            self._adopt(_Entry(item.id, item.id, partition, item.text, expires_at, MISSING), part)

    async def sync(self) -> None:
        """Apply the changes other processes made, at most every ``sync_interval`` seconds."""
        if self.redis is None or self._syncing:
            return
        now = self._monotonic()
        if now - self._synced_at < self.sync_interval:
            return
        self._syncing = True
        try:
            while True:
                events, logged = await self.redis.events(self._last_event, _BATCH)
                if len(events) < _BATCH and logged - self._seen > len(events):
                    await self._reload()  # changes we never saw were trimmed from the log
                    self._synced_at = now
                    return
                self._seen += len(events)
                added: list[int] = []
                for event in events:
                    self._last_event = event.event_id
                    if event.op == "a":
                        added.append(event.id)
                    elif event.op == "d":
                        entry = self.entries.get(event.id)
                        if entry is not None:
                            self._drop(entry)
                        if event.id in added:
                            added.remove(event.id)
                    elif event.op == "c":
                        added.clear()
                        await super().clear()
                if added:
                    self._adopt_stored([e for e in await self.redis.fetch(added) if e is not None])
                if len(events) < _BATCH:
                    break
            self._synced_at = now
        finally:
            self._syncing = False

    async def read_value(self, entry: _Entry) -> Any:
        """Read the payload from Redis and check it; `MISSING` when removed or expired elsewhere."""
        assert self.redis is not None
        partition = entry.partition.hex()
        blob = await self.redis.payload(entry.key, partition, self._now_ms())
        if blob is None:
            return MISSING
        try:
            return self.codec.open(self._payload_key(partition, entry.text), blob).value
        except SerializationError as exc:
            self.log.failure("shared semantic payload", exc)
            return MISSING

    async def insert(self, partition: bytes, text: str, vector: np.ndarray, value: Any,
                     expires_at: float | None) -> bool:
        """Store the entry in Redis (evicting there), then in the replica."""
        assert self.redis is not None
        await self.sweep()
        part_hex = partition.hex()
        try:
            payload = self.codec.seal(self._payload_key(part_hex, text), value, expires_at)
        except SerializationError as exc:
            self.stats.unstorable += 1
            self.log.failure(f"encoding values of type {type(value).__qualname__}", exc)
            return False
        part = self.partitions.get(partition)
        replace = part.exact.get(text) if part is not None else None
        vec = np.ascontiguousarray(vector, dtype=np.float32)
        id_, evicted = await self.redis.insert(
            part_hex, text, vec.tobytes(), payload, None if expires_at is None else int(expires_at * 1000),
            self._now_ms(), self.max_entries, replace)
        for victim_id in evicted:
            victim = self.entries.get(victim_id)
            if victim is not None:
                if victim.text != text:
                    self.stats.evictions += 1
                self._drop(victim)
        if id_ not in self.entries:
            part = self._partition(partition)
            part.index.add(id_, vec)
            self._adopt(_Entry(id_, id_, partition, text, expires_at, MISSING), part)
            self._maybe_compact(part)
        return True

    async def sweep(self, limit: int = 64) -> None:
        """Forget expired entries locally (Redis expires its own copies)."""
        now = self.clock()
        heap = self._expiry
        dropped = 0
        while heap and heap[0][0] <= now and dropped < limit:
            _, key, seq = heapq.heappop(heap)
            entry = self.entries.get(key)
            if entry is not None and entry.seq == seq:
                self._drop(entry)
                self.stats.expirations += 1
                dropped += 1

    async def _persist_remove(self, entries: Sequence[_Entry]) -> None:
        assert self.redis is not None
        await self.redis.remove([(e.key, e.partition.hex()) for e in entries])

    async def clear(self) -> None:
        """Remove every entry in Redis (every process drops its replica when it sees the change)."""
        await super().clear()
        if self.redis is not None:
            await self.redis.clear()

    async def aclose(self) -> None:
        """Close the Redis connections."""
        await self.wait_compactions()
        if self.redis is not None:
            redis, self.redis = self.redis, None
            await redis.aclose()

