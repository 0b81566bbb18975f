"""The store policy of the semantic cache: partitions, vectors, exact texts, LRU eviction and expiry in memory.

Where the entries are kept beyond the process (a SQLite file, Redis) is a `VectorPersistence` of
`cachelayers.backends.vectors`, chosen by the ``vector_index`` URL through the backend registry.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import numpy as np

from cachelayers import audit
from cachelayers.backends import registry
from cachelayers.backends.vectors import (
    GONE,
    Compaction,
    IndexOptions,
    PartitionGraph,
    StoredRow,
    VectorIndex,
    VectorPersistence,
    parse_vector_index,
    require_usearch,
)
from cachelayers.codec import Codec
from cachelayers.engines.semantic.budget import budget
from cachelayers.engines.semantic.info import SemanticStats
from cachelayers.engines.semantic.options import DEFAULT_MAX_TOTAL_ENTRIES
from cachelayers.errors import SerializationError
from cachelayers.metrics import StateLog
from cachelayers.settings import get_settings
from cachelayers.workers import start_worker

__all__ = ["Entry", "Partition", "SemanticStore", "enforce_process_bound", "open_store"]


class Entry:
    """One cached call: where it lives, what it said, until when, and (without persistence) its value."""

    __slots__ = ("expires_at", "key", "partition", "seq", "stamp", "text", "used", "value")

    def __init__(self, key: int, seq: int, partition: bytes, text: str, expires_at: float | None,
                 value: Any, stamp: object = None) -> None:
        self.key = key
        self.seq = seq
        self.partition = partition
        self.text = text
        self.expires_at = expires_at
        self.value = value
        self.used = 0  # the process-wide stamp of its last use (`budget.ProcessBudget.stamp`)
        self.stamp = stamp  # the storage's clears when its computation began (`clears`)


def eviction_batch(capacity: int) -> int:
    """How many entries a full capacity evicts at once: 1 per 1,000 of capacity, from 1 to 64."""
    return max(1, min(64, capacity // 1000))


class Partition:
    """The entries of one partition: their index, exact texts and LRU order, and a running compaction."""

    __slots__ = ("compaction", "exact", "index", "lru")

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self.lru: OrderedDict[int, None] = OrderedDict()  # keys, least recently used first
        self.exact: dict[str, int] = {}
        self.compaction: tuple[Compaction, threading.Thread] | None = None


class SemanticStore:
    """Entries of one semantically cached function, in memory: partitions, vectors, exact texts, LRU, expiry.

    Without ``persistence`` (``memory://``) values stay in the entries; with one, they live there and the
    store keeps what lookups need. The engine calls it from one event loop; compactions run in worker
    threads that touch only their own snapshot.

    Three bounds hold after every insert: ``max_entries`` per partition, ``max_total_entries`` across all
    partitions (the least recently used entry of the whole store goes first), and
    ``Settings.semantic_max_entries`` across every store of the process (`budget`). A partition whose last entry
    leaves (evicted, expired, invalidated) is freed with its index, so a partition per tenant costs nothing
    once the tenant's entries are gone.

    Args:
        max_entries: Capacity of each partition.
        max_total_entries: Capacity of the whole store, across partitions.
        options: usearch options.
        clock: Wall-clock time source for expiry.
        stats: Counters to bump.
        log: Failure log.
        codec: Codec of the values (the persistence seals with it).
        persistence: Where entries are kept beyond memory, or ``None``.
    """

    def __init__(self, *, max_entries: int, options: IndexOptions, clock: Callable[[], float],
                 stats: SemanticStats, log: StateLog, codec: Codec,
                 persistence: VectorPersistence | None = None, max_total_entries: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_total_entries = max_total_entries if max_total_entries is not None else DEFAULT_MAX_TOTAL_ENTRIES
        self.options = options
        self.clock = clock
        self.stats = stats
        self.log = log
        self.codec = codec
        self.persistence = persistence
        self._shared = persistence is not None and persistence.shared
        self.ndim: int | None = None
        self.embedder = ""
        self.entries: dict[int, Entry] = {}
        self.partitions: dict[bytes, Partition] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # keys of every partition, least recently used first
        self._orphans: list[threading.Thread] = []  # compactions of freed partitions, joined on close
        self._free: list[int] = []
        self._next_key = 0
        self._seq = 0
        self._expiry: list[tuple[float, int, int]] = []  # (expires_at, key, seq), a min-heap
        budget.register(self)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def open(self, embedder: str, ndim: int | None) -> None:
        """Prepare for use with ``embedder`` vectors of dimension ``ndim`` (loading stored entries).

        Raises:
            MissingDependencyError: usearch is not installed.
        """
        require_usearch()
        self.embedder = embedder
        self.ndim = ndim
        if self.persistence is None:
            return
        loaded = await self.persistence.open(self, embedder, ndim, self.options)
        if self.ndim is None:
            self.ndim = loaded.ndim
        self._seq = max(self._seq, loaded.last_seq)
        if not self._shared:
            self._next_key = max(self.entries, default=-1) + 1
            self._free = [k for k in range(self._next_key) if k not in self.entries]
            heapq.heapify(self._free)

    async def fit_dimension(self, ndim: int) -> None:
        """Take the dimension the embedder returns: entries of another one (a new model under the same name)
        are dropped, never compared. Shared, only this process's replica forgets them (processes still on the
        old model keep theirs, and this one never adopts a row of the other dimension)."""
        if self.ndim is not None and self.ndim != ndim:
            self.log.failure(f"semantic entries of dimension {self.ndim}", f"the embedder returns {ndim} now: "
                             "dropping them")
            if self._shared:
                self.forget_all()
            else:
                await self.clear()
        self.ndim = ndim

    def usable(self) -> bool:
        """Whether the store can serve on the running event loop (a shared store's client is bound to one)."""
        return self.persistence is None or self.persistence.usable()

    async def sync(self) -> None:
        """Catch up with writes made elsewhere (a no-op unless shared)."""
        if self.persistence is not None:
            await self.persistence.sync()

    async def save(self) -> None:
        """Persist what is not persisted yet (a no-op in memory)."""
        if self.persistence is not None:
            await self.persistence.save()

    async def aclose(self) -> None:
        """Save and release files or connections."""
        await self.save()
        await self.wait_compactions()
        if self.persistence is not None:
            await self.persistence.aclose()

    async def clear(self) -> None:
        """Remove every entry."""
        self.forget_all()
        if self.persistence is not None:
            await self.persistence.clear()

    # -- reading ------------------------------------------------------------------------------------------

    def find_exact(self, partition: bytes, text: str) -> Entry | None:
        """The live entry of ``partition`` with exactly ``text``."""
        part = self.partitions.get(partition)
        if part is None:
            return None
        key = part.exact.get(text)
        if key is None:
            return None
        entry = self.entries[key]
        if entry.expires_at is not None and entry.expires_at <= self.clock():
            return None
        return entry

    def find_similar(self, partition: bytes, vector: np.ndarray, count: int) -> list[tuple[Entry, float]]:
        """Up to ``count`` live entries of ``partition`` nearest to ``vector``, with similarities, best first."""
        part = self.partitions.get(partition)
        if part is None:
            return []
        self._commit_compaction(part)
        found = part.index.search(vector, count)
        now = self.clock()
        out: list[tuple[Entry, float]] = []
        for key, similarity in zip(found.keys, found.similarities, strict=True):
            entry = self.entries.get(key)
            if entry is None or entry.partition != partition:
                continue  # cannot happen while the structures agree; never serve across partitions
            if entry.expires_at is not None and entry.expires_at <= now:
                continue
            out.append((entry, min(1.0, similarity)))  # float32 rounding can give 1.0000001 for the same vector
        return out

    def touch(self, entry: Entry) -> None:
        """Mark ``entry`` recently used (its expiry is unchanged)."""
        part = self.partitions.get(entry.partition)
        if part is not None and entry.key in part.lru:
            part.lru.move_to_end(entry.key)
            self.lru.move_to_end(entry.key)
            entry.used = budget.stamp()

    async def read_value(self, entry: Entry) -> Any:
        """The value of ``entry``, or `GONE` when it is gone."""
        if self.persistence is None:
            return entry.value
        return await self.persistence.read(entry)

    # -- writing ------------------------------------------------------------------------------------------

    @property
    def clears(self) -> object:
        """The storage's clears as far as this process knows (``None`` unless shared): taken when a computation
        begins and given to `insert`, so that a shared storage cleared meanwhile drops its result."""
        return getattr(self.persistence, "clears", None)

    async def insert(self, partition: bytes, text: str, vector: np.ndarray, value: Any,
                     expires_at: float | None, stamp: object = None) -> bool:
        """Store a computed call; return ``False`` when its value could not be stored (or, shared, was dropped
        because the storage was cleared after ``stamp``, its `clears` when the computation began).

        Expired entries are swept first; an entry of the same partition with the same text is replaced; the
        least recently used entries are evicted while the partition is full (by the storage, when shared), then
        the least recently used of the whole store while it holds more than ``max_total_entries``.
        """
        await self.sweep()
        evict = self._victims(partition, text)
        self._seq += 1
        key = -1 if self._shared else self._alloc_key()
        entry = Entry(key, self._seq, partition, text, expires_at, value, stamp)
        if self.persistence is not None:
            try:
                stored = await self.persistence.append(entry, value, vector, evict, self.max_entries)
            except SerializationError as exc:
                self.stats.unstorable += 1
                self.log.failure(f"encoding values of type {type(value).__qualname__}", exc)
                if not self._shared:
                    self._release_key(key)
                return False
            entry.value = GONE  # the persistence holds it; memory keeps only what lookups need
            if self._shared:
                entry.key = entry.seq = stored.key
                evict = [e for e in map(self.entries.get, stored.removed) if e is not None]
                if stored.dropped:
                    for victim in evict:
                        self._drop(victim)
                    return False
        for victim in evict:
            if victim.text != text or victim.partition != partition:
                self.stats.evictions += 1
            self._drop(victim)
        if not self._known(entry.key, partition, text):
            part = self._partition(partition)  # after the drops: dropping the last victim removes a partition
            part.index.add(entry.key, vector)
            self._adopt(entry, part)
            self._maybe_compact(part)
        if self._shared and len(self.entries) > self.max_total_entries:
            overflow = list(self._oldest(len(self.entries) - self.max_total_entries, ()))
            self.stats.evictions += len(overflow)
            await self.remove(overflow)
        await enforce_process_bound()
        return True

    def _victims(self, partition: bytes, text: str) -> list[Entry]:
        """The entry ``text`` replaces, then (unless shared) the least recently used beyond the capacities.

        A full capacity is relieved by `eviction_batch` entries at once: usearch's first insert after a removal
        costs about 3 ms more at 100,000 vectors, whatever the number of removals before it.
        """
        evict: list[Entry] = []
        part = self.partitions.get(partition)
        if part is not None:
            same = part.exact.get(text)
            if same is not None:
                evict.append(self.entries[same])
            if not self._shared and len(part.lru) - len(evict) >= self.max_entries:
                lru = iter(part.lru)
                keep = self.max_entries - eviction_batch(self.max_entries)
                while len(part.lru) - len(evict) > keep:
                    victim = self.entries[next(lru)]
                    if victim not in evict:
                        evict.append(victim)
        over = len(self.entries) - len(evict) + 1 - self.max_total_entries
        if over > 0 and not self._shared:
            evict += self._oldest(over + eviction_batch(self.max_total_entries) - 1, evict)
        return evict

    def _oldest(self, count: int, skip: Sequence[Entry]) -> list[Entry]:
        """The ``count`` least recently used entries of the whole store that are not in ``skip``."""
        out: list[Entry] = []
        for key in self.lru:
            if len(out) >= count:
                break
            entry = self.entries[key]
            if entry not in skip:
                out.append(entry)
        return out

    async def remove(self, entries: Sequence[Entry]) -> None:
        """Remove entries (vector and payload)."""
        live = [e for e in entries if self.entries.get(e.key) is e]
        if not live:
            return
        if self.persistence is not None:
            await self.persistence.remove(live)
        for entry in live:
            self._drop(entry)

    async def sweep(self, limit: int = 64) -> None:
        """Remove up to ``limit`` expired entries (cheap; runs before every insert).

        A shared storage expires its own copies: the entries are then only forgotten locally.
        """
        now = self.clock()
        expired: list[Entry] = []
        heap = self._expiry
        while heap and heap[0][0] <= now and len(expired) < limit:
            _, key, seq = heapq.heappop(heap)
            entry = self.entries.get(key)
            if entry is not None and entry.seq == seq:
                expired.append(entry)
        if not expired:
            return
        self.stats.expirations += len(expired)
        if self._shared:
            for entry in expired:
                self._drop(entry)
        else:
            await self.remove(expired)

    # -- what a persistence sees (`cachelayers.backends.vectors.Replica`) --------------------------------

    def graphs(self) -> list[PartitionGraph]:
        """Every partition's keys (LRU order), sequence numbers and index, for a snapshot."""
        out = []
        for partition, part in self.partitions.items():
            keys = np.array(list(part.lru), dtype=np.uint64)
            seqs = np.array([self.entries[int(k)].seq for k in keys], dtype=np.uint64)
            out.append(PartitionGraph(partition, keys, seqs, part.index))
        return out

    def adopt(self, rows: Sequence[StoredRow], graphs: Mapping[bytes, VectorIndex] | None = None) -> None:
        """Make stored entries findable (values stay in the persistence).

        Expired rows, rows already known and rows of another dimension are skipped; of two rows with the same
        partition and text the newer wins. A row whose key is known for another partition or text replaces
        that entry (the key was handed out again: the entry it named is gone). ``graphs`` are indexes already
        holding their partitions' vectors.
        """
        now = self.clock()
        for row in rows:
            if self._known(row.key, row.partition, row.text) or (
                    row.expires_at is not None and row.expires_at <= now):
                continue
            if self.ndim is None:
                self.ndim = int(row.vector.shape[0])
            if row.vector.shape != (self.ndim,):
                continue  # written with another embedder configuration: never compared
            part = self._adopted_partition(row.partition, graphs)
            previous = part.exact.get(row.text)
            if previous is not None:
                if self.entries[previous].seq >= row.seq:
                    continue
                self._drop(self.entries[previous])  # the same text stored twice: the newer one wins
                part = self._adopted_partition(row.partition, graphs)
            if row.key not in part.index:
                part.index.add(row.key, row.vector)
            self._adopt(Entry(row.key, row.seq, row.partition, row.text, row.expires_at, GONE), part)

    def _known(self, key: int, partition: bytes, text: str) -> bool:
        """Whether ``key`` names this partition's entry of ``text`` already; an entry of another partition or
        text under ``key`` is dropped (the key now names a new entry)."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        if entry.partition == partition and entry.text == text:
            return True
        self._drop(entry)
        return False

    def _adopted_partition(self, partition: bytes, graphs: Mapping[bytes, VectorIndex] | None) -> Partition:
        if partition not in self.partitions and graphs is not None and partition in graphs:
            self.partitions[partition] = Partition(graphs[partition])
        return self._partition(partition)

    def forget(self, key: int) -> None:
        """Forget the entry of ``key`` locally (it was removed elsewhere)."""
        entry = self.entries.get(key)
        if entry is not None:
            self._drop(entry)

    def corrupt(self, count: int, what: str, exc: BaseException) -> None:
        """Count stored entries that failed their integrity check (the persistence dropped them); log once."""
        self.stats.corrupt += count
        self.log.failure(what, exc)
        # The reason names the error's type only: its message may quote what was read.
        audit.integrity_failure("semantic", what, reason=f"entries dropped ({type(exc).__name__})", count=count)

    def forget_all(self) -> None:
        """Forget every entry locally."""
        for part in self.partitions.values():
            part.index.clear()
        self.partitions.clear()
        self.lru.clear()
        self.entries.clear()
        self._free.clear()
        self._expiry.clear()

    # -- structure ----------------------------------------------------------------------------------------

    def _partition(self, partition: bytes) -> Partition:
        part = self.partitions.get(partition)
        if part is None:
            assert self.ndim is not None
            o = self.options
            part = self.partitions[partition] = Partition(VectorIndex(
                self.ndim, dtype=o.dtype, connectivity=o.connectivity, expansion_add=o.expansion_add,
                expansion_search=o.expansion_search))
        else:
            self._commit_compaction(part)
        return part

    def _alloc_key(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        key = self._next_key
        self._next_key += 1
        return key

    def _release_key(self, key: int) -> None:
        if key not in self.entries:
            heapq.heappush(self._free, key)

    def _adopt(self, entry: Entry, part: Partition) -> None:
        """Make ``entry`` (whose vector is in ``part.index`` already) findable."""
        self.entries[entry.key] = entry
        self.lru[entry.key] = None
        entry.used = budget.stamp()
        part.lru[entry.key] = None
        part.exact[entry.text] = entry.key
        if entry.expires_at is not None:
            heap = self._expiry
            if len(heap) > 2 * len(self.entries) + 64:  # evicted entries' times pile up: keep the live ones
                heap[:] = [item for item in heap if (e := self.entries.get(item[1])) is not None and e.seq == item[2]]
                heapq.heapify(heap)
            heapq.heappush(heap, (entry.expires_at, entry.key, entry.seq))

    def _drop(self, entry: Entry) -> None:
        """Forget ``entry`` locally: vector, exact text, LRU slot; its key becomes reusable (unless shared)."""
        if self.entries.get(entry.key) is not entry:
            return
        del self.entries[entry.key]
        self.lru.pop(entry.key, None)
        part = self.partitions.get(entry.partition)
        if part is not None:
            part.index.remove(entry.key)
            part.lru.pop(entry.key, None)
            if part.exact.get(entry.text) == entry.key:
                del part.exact[entry.text]
            if not part.lru:
                self._free_partition(entry.partition, part)
            else:
                self._maybe_compact(part)
        if not self._shared:
            heapq.heappush(self._free, entry.key)

    def _free_partition(self, partition: bytes, part: Partition) -> None:
        """Drop the empty ``part`` and its index; a compaction still building is left to finish, unused."""
        del self.partitions[partition]
        if part.compaction is not None:
            self._orphans = [t for t in self._orphans if t.is_alive()]
            self._orphans.append(part.compaction[1])
            part.compaction = None

    # -- compaction ---------------------------------------------------------------------------------------

    def _start_compaction(self, part: Partition) -> None:
        job = part.index.begin_compaction()
        # A worker the interpreter waits for at exit rather than killing usearch mid-build (SIGABRT).
        thread = start_worker(job.build, name="cachelayers-compaction")
        if thread is None:  # the interpreter is exiting: the rebuild is skipped, and committing the job never
            part.index.commit_compaction(job)  # built abandons it (the index stops journaling writes for it)
            return
        part.compaction = (job, thread)

    def _maybe_compact(self, part: Partition) -> None:
        if part.compaction is None and part.index.needs_compaction():
            self._start_compaction(part)

    def _commit_compaction(self, part: Partition) -> None:
        pending = part.compaction
        if pending is None or pending[1].is_alive():
            return
        part.compaction = None
        job = pending[0]
        if part.index.commit_compaction(job):
            self.stats.compactions += 1
        elif job.error is not None:
            self.stats.index_errors += 1
            self.log.failure("semantic index compaction", job.error)

    async def wait_compactions(self) -> None:
        """Wait for running compactions and swap their graphs in."""
        orphans, self._orphans = self._orphans, []
        for thread in orphans:
            await anyio.to_thread.run_sync(thread.join)
        for partition, part in list(self.partitions.items()):
            pending = part.compaction
            if pending is not None:
                await anyio.to_thread.run_sync(pending[1].join)
                self._commit_compaction(part)
                if not part.lru and self.partitions.get(partition) is part:
                    del self.partitions[partition]

    async def compact(self) -> None:
        """Rebuild every partition's graph that has removals, and wait for it."""
        for part in list(self.partitions.values()):
            if part.compaction is None and part.index.removed_since_build:
                self._start_compaction(part)
        await self.wait_compactions()

    def __len__(self) -> int:
        return len(self.entries)


async def enforce_process_bound() -> int:
    """Evict the least recently used entries of the whole process while there are more than
    ``Settings.semantic_max_entries``; return how many were evicted.

    Only stores usable on the running event loop are evicted from (a shared store is bound to its loop). A
    failing removal is counted and logged by the store it failed in, and ends this round.
    """
    over = budget.total() - get_settings().semantic_max_entries
    evicted = 0
    while over > evicted:
        found = budget.oldest()
        if found is None:
            break
        store, entry = found
        assert isinstance(store, SemanticStore)
        try:
            await store.remove([entry])
        except Exception as exc:
            store.stats.index_errors += 1
            store.log.failure("evicting for the process-wide semantic bound", exc)
            break
        store.stats.evictions += 1
        evicted += 1
    return evicted


def open_store(url: str, *, namespace: str, max_entries: int, clock: Callable[[], float], stats: SemanticStats,
               log: StateLog, codec: Codec, max_total_entries: int | None = None) -> SemanticStore:
    """Make the store ``url`` names for the function of ``namespace`` (not opened yet).

    The URL's scheme is resolved with `cachelayers.backends.registry.load` (kind ``"vector_index"``).

    Raises:
        ConfigError: The URL is invalid.
        MissingDependencyError: The store's driver is not installed.
    """
    parsed, options = parse_vector_index(url)
    storage = registry.load(parsed, "vector_index")
    persistence = storage(parsed, namespace, codec=codec, log=log, clock=clock)
    return SemanticStore(max_entries=max_entries, options=options, clock=clock, stats=stats, log=log, codec=codec,
                         persistence=persistence, max_total_entries=max_total_entries)
