"""The ``redis://`` scheme: entries in Redis, shared by processes, each keeping a replica of the vectors.

A lookup is a local search plus one Redis read of the payload on a hit. Replicas follow the Redis stream of
changes (see `cachelayers.backends.vectors.redis_commands` and the semantic caching guide).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cachelayers.backends.base import BackendURL
from cachelayers.backends.vectors.base import GONE, Appended, EntryRef, Loaded, Replica, StoredRow
from cachelayers.backends.vectors.options import IndexOptions, int_option
from cachelayers.backends.vectors.redis_commands import RedisVectorStore, StoredEntry
from cachelayers.backends.vectors.sealing import open_row, seal_row
from cachelayers.breaker import CircuitBreaker
from cachelayers.codec import Codec
from cachelayers.durations import parse_duration
from cachelayers.errors import IntegrityError, SerializationError
from cachelayers.metrics import StateLog
from cachelayers.settings import get_settings

__all__ = ["RedisStore"]

_BATCH = 1000


class RedisStore:
    """A shared `VectorPersistence`: Redis holds the entries, each process a replica of their vectors.

    * **opening**, a process notes the newest change, loads every live entry, then applies the changes
      made since the note, so nothing is missed;
    * **before each lookup** (`sync`) it pulls the changes it has not seen, at most every ``sync_interval``
      seconds (0.1 by default): no background task, no polling while idle. Applying a change twice is
      harmless; if the stream was trimmed past the last change it saw, it reloads everything.

    Rows (partition, text, vector, expiry) and payloads are sealed with the codec and bound to the entry's id
    (`cachelayers.backends.vectors.sealing`): a row that fails its check is deleted and counted before it is
    findable, a payload that fails is a counted miss. A hit always reads the payload from Redis: an entry
    removed or expired elsewhere is a miss, never a stale answer. Entry ids come from a Redis counter that skips
    live ids; a Redis that lost the keys (restarted empty, flushed) has a new epoch, and replicas reload rather
    than mix the ids of two generations. Runs on asyncio (redis-py's asyncio client).

    Args:
        url: The ``redis://``, ``rediss://`` or ``redis+cluster://`` URL (on a cluster each partition's
            entries share one hash slot, see `RedisVectorStore`); options ``sync_interval`` and
            ``stream_maxlen``.
        namespace: The function's namespace (part of every key).
        codec: Seals the values.
        log: Failure log.
        clock: Wall-clock time source for expiry.
    """

    shared = True

    def __init__(self, url: BackendURL, namespace: str, *, codec: Codec, log: StateLog,
                 clock: Callable[[], float]) -> None:
        self.url = url
        self.namespace = namespace
        self.codec = codec
        self.log = log
        self.clock = clock
        raw_interval = url.options.get("sync_interval", "0.1")
        self.sync_interval = parse_duration(raw_interval, url.option_field("sync_interval"), allow_zero=True)
        self.stream_maxlen = int_option(url, "stream_maxlen") or 100_000
        self.redis: RedisVectorStore | None = None
        self._replica: Replica | None = None
        self._last_event = "0-0"
        self._seen = 0  # changes ever logged up to and including _last_event
        self._epoch: str | None = None  # the epoch of the keys the replica was loaded from
        self._clears = 0  # how many times the entries were cleared, as of the last sync
        self._synced_at = float("-inf")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._syncing = False

    def usable(self) -> bool:
        """Whether it can serve on the running event loop (its client is bound to one loop)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    @staticmethod
    def _base(namespace: str, embedder: str, dtype: str) -> str:
        prefix = namespace.split(":", 1)[0] + ":" if ":" in namespace else ""
        tag = hashlib.blake2b(f"{namespace}\x00{embedder}\x00{dtype}".encode(), digest_size=10).hexdigest()
        return f"{prefix}sem:{{{tag}}}:"

    def _row_binding(self, id_: int) -> str:
        assert self.redis is not None
        return f"{self.redis.base}row:{id_}"

    def _payload_binding(self, id_: int, partition: bytes, text: str) -> str:
        """What a payload is sealed against: its entry's id, partition and text, so that a payload is never
        taken for another entry's, even one that got the same id (a Redis restarted empty hands ids out again)."""
        assert self.redis is not None
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return f"{self.redis.base}val:{id_}:{partition.hex()}:{digest}"

    @property
    def clears(self) -> tuple[str | None, int]:
        """The epoch and the count of clears as of the last sync (see `SemanticStore.clears`): an insert whose
        computation began before a clear, or before Redis lost its keys (whose count then starts again), is
        dropped."""
        return self._epoch, self._clears

    async def open(self, replica: Replica, embedder: str, ndim: int | None, options: IndexOptions) -> Loaded:
        """Connect and load the replica from Redis."""
        self._replica = replica
        self._loop = asyncio.get_running_loop()
        settings = get_settings()
        self.redis = RedisVectorStore(self.url, self._base(self.namespace, embedder, options.dtype),
                                      timeout=settings.tier_timeout * 4, stream_maxlen=self.stream_maxlen,
                                      breaker=CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown,
                                                             time.monotonic))
        await self._reload()
        return Loaded(None, 0)

    async def _reload(self) -> None:
        assert self.redis is not None
        assert self._replica is not None
        self._replica.forget_all()
        self._epoch = await self.redis.epoch()
        self._clears = await self.redis.cleared()
        self._last_event, self._seen = await self.redis.log_position()
        ids = await self.redis.live_ids(self._now_ms())
        await self._adopt([e for e in await self.redis.fetch(ids) if e is not None])
        self._synced_at = self._monotonic()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def _monotonic() -> float:
        return asyncio.get_running_loop().time()

    async def _adopt(self, stored: Sequence[StoredEntry]) -> None:
        """Make the entries that pass their check findable; delete and count the others."""
        assert self._replica is not None
        assert self.redis is not None
        rows: list[StoredRow] = []
        bad: list[tuple[int, str]] = []
        error: IntegrityError | None = None
        encrypted = self.codec.encrypted
        for item in stored:
            try:
                partition = bytes.fromhex(item.partition)
                row = open_row(self.codec, self._row_binding(item.id), item.vector, partition=partition,
                               text=None if encrypted else item.text,
                               expires_at=None if item.expires_at_ms is None else item.expires_at_ms / 1000,
                               check_expiry=True)
            except (IntegrityError, ValueError) as exc:
                bad.append((item.id, item.partition))
                error = exc if isinstance(exc, IntegrityError) else IntegrityError(f"malformed partition: {exc}")
                continue
            rows.append(StoredRow(item.id, item.id, row.partition, row.text, row.expires_at, row.vector))
        self._replica.adopt(rows)
        if bad:
            assert error is not None
            self._replica.corrupt(len(bad), "shared semantic rows", error)
            await self.redis.remove(bad)

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
                events, logged, epoch, self._clears = await self.redis.events(self._last_event, _BATCH)
                if epoch != self._epoch or logged < self._seen or (
                        len(events) < _BATCH and logged - self._seen > len(events)):
                    # Redis lost the keys the replica came from (restarted empty, flushed: ids start again), or
                    # changes we never saw were trimmed from the log
                    await self._reload()
                    self._synced_at = now
                    return
                self._seen += len(events)
                await self._apply(events)
                if len(events) < _BATCH:
                    break
            self._synced_at = now
        finally:
            self._syncing = False

    async def _apply(self, events: Sequence[Any]) -> None:
        assert self.redis is not None
        assert self._replica is not None
        added: dict[int, str] = {}
        for event in events:
            self._last_event = event.event_id
            if event.op == "a":
                added[event.id] = event.partition
            elif event.op == "d":
                self._replica.forget(event.id)
                added.pop(event.id, None)
            elif event.op == "c":
                added.clear()
                self._replica.forget_all()
        if added:
            await self._adopt([e for e in await self.redis.fetch(list(added.items())) if e is not None])

    async def read(self, entry: EntryRef) -> Any:
        """Read the payload from Redis and check it; `GONE` when removed or expired elsewhere."""
        assert self.redis is not None
        partition = entry.partition.hex()
        blob = await self.redis.payload(entry.key, partition, self._now_ms())
        if blob is None:
            return GONE
        try:
            return self.codec.open(self._payload_binding(entry.key, entry.partition, entry.text), blob).value
        except IntegrityError as exc:
            assert self._replica is not None
            self._replica.forget(entry.key)
            self._replica.corrupt(1, "shared semantic payload", exc)
            await self.redis.remove([(entry.key, partition)])
            return GONE
        except SerializationError as exc:
            self.log.failure("shared semantic payload", exc)
            return GONE

    async def append(self, entry: EntryRef, value: Any, vector: np.ndarray, evict: Sequence[EntryRef],
                     capacity: int) -> Appended:
        """Store the entry in Redis, replacing ``evict`` (its text's) and evicting beyond ``capacity`` there."""
        assert self.redis is not None
        part_hex = entry.partition.hex()
        payload_body = self.codec.pack_body(value)  # raises SerializationError before anything is written
        id_ = await self.redis.next_id()
        payload = self.codec.seal_body(self._payload_binding(id_, entry.partition, entry.text), payload_body,
                                       entry.expires_at)
        row = seal_row(self.codec, self._row_binding(id_), entry.partition, entry.text, vector, entry.expires_at)
        stamp = entry.stamp if isinstance(entry.stamp, tuple) else None
        id_, evicted, dropped = await self.redis.insert(
            id_, part_hex, "" if self.codec.encrypted else entry.text, row, payload,
            None if entry.expires_at is None else int(entry.expires_at * 1000), self._now_ms(), capacity,
            evict[0].key if evict else None, stamp)
        if dropped:  # cleared since: sync at the next lookup, so that new computations know it
            self._synced_at = float("-inf")
        return Appended(id_, evicted, dropped)

    async def remove(self, entries: Sequence[EntryRef]) -> None:
        """Remove entries from Redis (every replica drops them when it sees the change)."""
        assert self.redis is not None
        await self.redis.remove([(e.key, e.partition.hex()) for e in entries])

    async def clear(self) -> None:
        """Remove every entry in Redis (every process drops its replica when it sees the change)."""
        if self.redis is not None:
            await self.redis.clear()

    async def save(self) -> None:
        """Nothing to do: every write is in Redis already."""

    async def aclose(self) -> None:
        """Close the Redis connections."""
        if self.redis is not None:
            redis, self.redis = self.redis, None
            await redis.aclose()
