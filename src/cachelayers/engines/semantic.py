"""The semantic cache engine: answer a call from a *similar* earlier call of the same partition.

A call is split in two:

* the **partition** — an exact key made of every argument except the semantic text (model, system prompt,
  temperature, tenant...), or what a ``partition=`` function returns, always with the function's identity,
  namespace and version. Each partition has its own usearch index, so a call can only ever be answered by
  an entry of its own partition: there is no filter to get wrong;
* the **semantic text** — one argument, or what a ``text=`` function returns (the last user message).

A call is answered at one of four *levels*, which the caller can read with `explain` or `last_lookup`:

``exact``
    an entry of the same partition has exactly this text (no embedding is computed);
``semantic``
    the nearest entries of the partition have cosine similarity >= the threshold, and the verifier (if any)
    accepted one of them;
``computed``
    no entry qualified: the function ran and its result was stored;
``uncached``
    the cache could not be used (embedder or index failure, empty text): the function ran, nothing was
    stored. Failures are counted and logged once per change of state; the call itself never fails because
    of the cache (unless ``Settings.strict``).

Entries have an absolute expiry (a hit never extends it) and each partition a capacity with LRU eviction
that removes the vector and the payload together. Removed keys are reused; when removals pile up in a
partition its graph is rebuilt in a worker thread (see `cachelayers.backends.usearch_index`).

Where entries live is chosen by ``Settings.vector_index``: ``memory://`` (in-process), ``usearch:///dir``
(SQLite rows plus atomic graph snapshots in ``dir``, reloaded on start, see
`cachelayers.backends.semantic_disk`) or ``redis://host:port/db`` (shared by processes, see
`cachelayers.backends.semantic_redis`). Options in the URL's query: ``dtype``, ``connectivity``,
``expansion_add``, ``expansion_search``; for disk ``save_every`` (writes between snapshots); for Redis
``sync_interval`` (seconds between pulls of other processes' writes) and ``stream_maxlen``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import heapq
import inspect
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, Literal, NamedTuple, ParamSpec, TypeVar, cast

import anyio
import numpy as np

from cachelayers.backends.memory import MISSING
from cachelayers.backends.usearch_index import (
    Compaction,
    IndexOptions,
    VectorIndex,
    int_option,
    parse_vector_index,
    require_usearch,
)
from cachelayers.codec import Codec
from cachelayers.durations import parse_duration
from cachelayers.embedders import HashingEmbedder, embed, embedder_name
from cachelayers.engines.batcher import Batcher
from cachelayers.engines.flight import Flight
from cachelayers.engines.tiered import TieredCache, default_cache
from cachelayers.errors import (
    BackendError,
    BatchError,
    ConfigError,
    EmbeddingError,
    SerializationError,
    UnkeyableArgumentError,
)
from cachelayers.keys import KeyBuilder, canonical_bytes
from cachelayers.metrics import LatencyRing, StateLog, register_stats_source
from cachelayers.settings import Settings, get_settings
from cachelayers.validation import similarity as check_similarity

__all__ = ["Candidate", "Explanation", "Level", "Lookup", "SemanticCacheInfo", "SemanticFunction",
           "SemanticStore", "explain", "last_lookup", "open_store"]

P = ParamSpec("P")
T = TypeVar("T")

Level = Literal["exact", "semantic", "computed", "uncached"]

DEFAULT_MAX_ENTRIES: Final = 10_000
"""Entries per partition before the least recently used is evicted."""


# -- how a call was answered --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """How one call of a semantically cached function was answered.

    Attributes:
        function: The function's identity.
        level: ``"exact"``, ``"semantic"``, ``"computed"`` or ``"uncached"``.
        similarity: Cosine similarity of the entry that answered (1.0 for ``exact``); for ``computed``, of the
            best candidate that fell short (``None`` when the partition was empty).
        matched_text: The semantic text of the entry that answered (``None`` unless exact or semantic).
        text: The call's own semantic text.
        partition: Hex digest of the call's partition.
        rejected: Candidates above the threshold that the verifier rejected.
        reason: Why the call was ``uncached``, or ``None``.
    """

    function: str
    level: Level
    similarity: float | None
    matched_text: str | None
    text: str | None
    partition: str
    rejected: int = 0
    reason: str | None = None


class Explanation:
    """The `Lookup` of every semantically cached call made inside an `explain` block, in order."""

    __slots__ = ("_lookups",)

    def __init__(self) -> None:
        self._lookups: list[Lookup] = []

    def __iter__(self) -> Iterator[Lookup]:
        return iter(self._lookups)

    def __len__(self) -> int:
        return len(self._lookups)

    def __getitem__(self, index: int) -> Lookup:
        return self._lookups[index]

    @property
    def last(self) -> Lookup | None:
        """The most recent lookup, or ``None``."""
        return self._lookups[-1] if self._lookups else None

    def levels(self) -> dict[str, int]:
        """How many calls were answered at each level."""
        counts: dict[str, int] = {}
        for lookup in self._lookups:
            counts[lookup.level] = counts.get(lookup.level, 0) + 1
        return counts

    def __repr__(self) -> str:
        return f"Explanation({self._lookups!r})"


_explanation: contextvars.ContextVar[Explanation | None] = contextvars.ContextVar("cachelayers_explain",
                                                                                 default=None)
_last: contextvars.ContextVar[Lookup | None] = contextvars.ContextVar("cachelayers_last_lookup", default=None)


@contextmanager
def explain() -> Iterator[Explanation]:
    """Collect how each semantically cached call in the block was answered.

    Calls made in tasks started inside the block are collected too (the collector travels with the
    context). The return values of the calls are untouched.

    Example::

        with cachelayers.explain() as info:
            answer = await ask("How do I reset my password?")
        print(info.last.level, info.last.similarity, info.last.matched_text)
    """
    collector = Explanation()
    token = _explanation.set(collector)
    try:
        yield collector
    finally:
        _explanation.reset(token)


def last_lookup() -> Lookup | None:
    """How the last semantically cached call awaited in this task (or its context) was answered."""
    return _last.get()


def _record(lookup: Lookup) -> None:
    _last.set(lookup)
    collector = _explanation.get()
    if collector is not None:
        collector._lookups.append(lookup)


class Candidate(NamedTuple):
    """A cached entry offered to a verifier: its semantic text, its value and its similarity to the call."""

    text: str
    value: Any
    similarity: float


Verifier = Callable[[str, Candidate], Awaitable[bool]]


class SemanticCacheInfo(NamedTuple):
    """What ``cache_info()`` of a semantically cached function tells.

    Latencies are in seconds, ``None`` until measured.
    """

    exact_hits: int
    semantic_hits: int
    misses: int
    uncached: int
    hit_rate: float
    entries: int
    partitions: int
    evictions: int
    expirations: int
    embed_errors: int
    index_errors: int
    verifier_rejections: int
    verifier_errors: int
    unstorable: int
    compactions: int
    cached_p50: float | None
    computed_p50: float | None


class _Stats:
    __slots__ = ("cached_latency", "compactions", "computed_latency", "embed_errors", "evictions", "exact_hits",
                 "expirations", "index_errors", "misses", "semantic_hits", "uncached", "unstorable",
                 "verifier_errors", "verifier_rejections")

    def __init__(self) -> None:
        self.exact_hits = 0
        self.semantic_hits = 0
        self.misses = 0
        self.uncached = 0
        self.evictions = 0
        self.expirations = 0
        self.embed_errors = 0
        self.index_errors = 0
        self.verifier_rejections = 0
        self.verifier_errors = 0
        self.unstorable = 0
        self.compactions = 0
        self.cached_latency = LatencyRing()
        self.computed_latency = LatencyRing()


# -- entries in memory --------------------------------------------------------------------------------------


class _Entry:
    """One cached call: where it lives, what it said, until when, and (in memory mode) its value."""

    __slots__ = ("expires_at", "key", "partition", "seq", "text", "value")

    def __init__(self, key: int, seq: int, partition: bytes, text: str, expires_at: float | None,
                 value: Any) -> None:
        self.key = key
        self.seq = seq
        self.partition = partition
        self.text = text
        self.expires_at = expires_at
        self.value = value


class _Partition:
    __slots__ = ("compaction", "exact", "index", "lru")

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self.lru: OrderedDict[int, None] = OrderedDict()  # keys, least recently used first
        self.exact: dict[str, int] = {}
        self.compaction: tuple[Compaction, threading.Thread] | None = None


class SemanticStore:
    """Entries of one semantically cached function, in memory: partitions, vectors, exact texts, LRU, expiry.

    The base class keeps values in memory (``memory://``). Subclasses persist them (disk) or share them
    (Redis); they override the ``_persist_*`` hooks and `read_value`. The engine calls it from one event
    loop; compactions run in worker threads that touch only their own snapshot.

    Args:
        max_entries: Capacity of each partition.
        options: usearch options.
        clock: Wall-clock time source for expiry.
        stats: Counters to bump.
        log: Failure log.
    """

    persistent: bool = False
    reuse_keys: bool = True

    def __init__(self, *, max_entries: int, options: IndexOptions, clock: Callable[[], float],
                 stats: _Stats, log: StateLog, codec: Codec) -> None:
        self.max_entries = max_entries
        self.options = options
        self.clock = clock
        self.stats = stats
        self.log = log
        self.codec = codec
        self.ndim: int | None = None
        self.embedder = ""
        self.entries: dict[int, _Entry] = {}
        self.partitions: dict[bytes, _Partition] = {}
        self._free: list[int] = []
        self._next_key = 0
        self._seq = 0
        self._expiry: list[tuple[float, int, int]] = []  # (expires_at, key, seq), a min-heap

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def open(self, embedder: str, ndim: int | None) -> None:
        """Prepare for use with ``embedder`` vectors of dimension ``ndim`` (loading stored entries).

        Raises:
            MissingDependencyError: usearch is not installed.
        """
        require_usearch()
        self.embedder = embedder
        self.ndim = ndim

    def usable(self) -> bool:
        """Whether the store can serve on the running event loop (a shared store's client is bound to one)."""
        return True

    async def sync(self) -> None:
        """Catch up with writes made elsewhere (a no-op unless shared)."""

    async def save(self) -> None:
        """Persist what is not persisted yet (a no-op in memory)."""

    async def aclose(self) -> None:
        """Save and release files or connections."""
        await self.save()
        await self.wait_compactions()

    async def clear(self) -> None:
        """Remove every entry."""
        for part in self.partitions.values():
            part.index.clear()
        self.partitions.clear()
        self.entries.clear()
        self._free.clear()
        self._expiry.clear()

    # -- reading ------------------------------------------------------------------------------------------

    def find_exact(self, partition: bytes, text: str) -> _Entry | None:
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

    def find_similar(self, partition: bytes, vector: np.ndarray, count: int) -> list[tuple[_Entry, float]]:
        """Up to ``count`` live entries of ``partition`` nearest to ``vector``, with similarities, best first."""
        part = self.partitions.get(partition)
        if part is None:
            return []
        self._commit_compaction(part)
        found = part.index.search(vector, count)
        now = self.clock()
        out: list[tuple[_Entry, float]] = []
        for key, similarity in zip(found.keys, found.similarities, strict=True):
            entry = self.entries.get(key)
            if entry is None or entry.partition != partition:
                continue  # cannot happen while the structures agree; never serve across partitions
            if entry.expires_at is not None and entry.expires_at <= now:
                continue
            out.append((entry, similarity))
        return out

    def touch(self, entry: _Entry) -> None:
        """Mark ``entry`` recently used (its expiry is unchanged)."""
        part = self.partitions.get(entry.partition)
        if part is not None and entry.key in part.lru:
            part.lru.move_to_end(entry.key)

    async def read_value(self, entry: _Entry) -> Any:
        """The value of ``entry``, or `MISSING` when it is gone."""
        return entry.value

    # -- writing ------------------------------------------------------------------------------------------

    async def insert(self, partition: bytes, text: str, vector: np.ndarray, value: Any,
                     expires_at: float | None) -> bool:
        """Store a computed call; return ``False`` when its value could not be stored.

        Expired entries are swept first; an entry of the same partition with the same text is replaced; the
        least recently used entries are evicted while the partition is full.
        """
        await self.sweep()
        part = self._partition(partition)
        evict: list[_Entry] = []
        same = part.exact.get(text)
        if same is not None:
            evict.append(self.entries[same])
        lru = iter(part.lru)
        while len(part.lru) - len(evict) >= self.max_entries:
            victim = self.entries[next(lru)]
            if victim not in evict:
                evict.append(victim)
        self._seq += 1
        key = self._alloc_key()
        entry = _Entry(key, self._seq, partition, text, expires_at, value)
        if not await self._persist_insert(entry, vector, evict):
            self._release_key(key)
            return False
        for victim in evict:
            if victim.text != text:
                self.stats.evictions += 1
            self._drop(victim)
        part.index.add(key, vector)
        self._adopt(entry, part)
        self._maybe_compact(part)
        return True

    async def remove(self, entries: Sequence[_Entry]) -> None:
        """Remove entries (vector and payload)."""
        live = [e for e in entries if self.entries.get(e.key) is e]
        if not live:
            return
        await self._persist_remove(live)
        for entry in live:
            self._drop(entry)

    async def sweep(self, limit: int = 64) -> None:
        """Remove up to ``limit`` expired entries (cheap; runs before every insert)."""
        now = self.clock()
        expired: list[_Entry] = []
        heap = self._expiry
        while heap and heap[0][0] <= now and len(expired) < limit:
            _, key, seq = heapq.heappop(heap)
            entry = self.entries.get(key)
            if entry is not None and entry.seq == seq:
                expired.append(entry)
        if expired:
            self.stats.expirations += len(expired)
            await self.remove(expired)

    # -- hooks for persistent stores ---------------------------------------------------------------------

    async def _persist_insert(self, entry: _Entry, vector: np.ndarray, evicted: Sequence[_Entry]) -> bool:
        return True

    async def _persist_remove(self, entries: Sequence[_Entry]) -> None:
        return None

    # -- structure ----------------------------------------------------------------------------------------

    def _partition(self, partition: bytes) -> _Partition:
        part = self.partitions.get(partition)
        if part is None:
            assert self.ndim is not None
            o = self.options
            part = self.partitions[partition] = _Partition(VectorIndex(
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

    def _adopt(self, entry: _Entry, part: _Partition) -> None:
        """Make ``entry`` (whose vector is in ``part.index`` already) findable."""
        self.entries[entry.key] = entry
        part.lru[entry.key] = None
        part.exact[entry.text] = entry.key
        if entry.expires_at is not None:
            heapq.heappush(self._expiry, (entry.expires_at, entry.key, entry.seq))

    def _drop(self, entry: _Entry) -> None:
        """Forget ``entry`` locally: vector, exact text, LRU slot; its key becomes reusable."""
        if self.entries.get(entry.key) is not entry:
            return
        del self.entries[entry.key]
        part = self.partitions.get(entry.partition)
        if part is not None:
            part.index.remove(entry.key)
            part.lru.pop(entry.key, None)
            if part.exact.get(entry.text) == entry.key:
                del part.exact[entry.text]
            if not part.lru and part.compaction is None:
                del self.partitions[entry.partition]
            else:
                self._maybe_compact(part)
        if self.reuse_keys:
            heapq.heappush(self._free, entry.key)

    # -- compaction ---------------------------------------------------------------------------------------

    def _maybe_compact(self, part: _Partition) -> None:
        if part.compaction is None and part.index.needs_compaction():
            job = part.index.begin_compaction()
            thread = threading.Thread(target=job.build, name="cachelayers-compaction", daemon=True)
            part.compaction = (job, thread)
            thread.start()

    def _commit_compaction(self, part: _Partition) -> None:
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
                job = part.index.begin_compaction()
                thread = threading.Thread(target=job.build, name="cachelayers-compaction", daemon=True)
                part.compaction = (job, thread)
                thread.start()
        await self.wait_compactions()

    def __len__(self) -> int:
        return len(self.entries)


def open_store(url: str, *, namespace: str, max_entries: int, clock: Callable[[], float], stats: _Stats,
               log: StateLog, codec: Codec) -> SemanticStore:
    """Make the store ``url`` names for the function of ``namespace`` (not opened yet).

    Raises:
        ConfigError: The URL is invalid.
        MissingDependencyError: The store's driver is not installed.
    """
    parsed, options = parse_vector_index(url)
    common: dict[str, Any] = {"max_entries": max_entries, "options": options, "clock": clock, "stats": stats,
                              "log": log, "codec": codec}
    if parsed.scheme == "memory":
        return SemanticStore(**common)
    if parsed.scheme == "usearch":
        save_every = int_option(parsed, "save_every") or 1000
        return DiskStore(Path(parsed.path), namespace, save_every=save_every, **common)
    from cachelayers.engines.semantic_shared import RedisStore

    return RedisStore(parsed, namespace, **common)


class DiskStore(SemanticStore):
    """Entries in a SQLite file (the truth) plus atomic snapshots of the graphs (see `semantic_disk`)."""

    persistent = True

    def __init__(self, directory: Path, namespace: str, *, save_every: int, **common: Any) -> None:
        super().__init__(**common)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", namespace)[-80:]
        digest = hashlib.blake2b(namespace.encode(), digest_size=6).hexdigest()
        self.directory = directory
        self.base = directory / f"{slug}-{digest}"
        self.save_every = save_every
        self._writes = 0
        self._file: Any = None
        self._saving: threading.Thread | None = None
        self._save_lock = threading.Lock()

    def _path(self, suffix: str) -> Path:
        return self.base.parent / (self.base.name + suffix)

    def _storage_key(self, key: int, seq: int) -> str:
        return f"sem:{self.embedder}:{key}:{seq}"

    async def open(self, embedder: str, ndim: int | None) -> None:
        """Load the entries and graphs saved for this function (see the module docstring)."""
        await super().open(embedder, ndim)
        await anyio.to_thread.run_sync(self._load)

    def _load(self) -> None:
        from cachelayers.backends.semantic_disk import PayloadFile, read_snapshot

        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{self.base.name}.usearch.*.tmp"):
            stale.unlink(missing_ok=True)  # a snapshot whose writer died before the rename
        self._file = PayloadFile(self._path(".sqlite"))
        meta = self._file.meta()
        if meta and (meta.get("embedder") != self.embedder or meta.get("dtype") != self.options.dtype):
            # Vectors of another embedder live in another space: never compare with them.
            self.log.failure(f"semantic store {self.base.name}",
                             f"stored entries were made by {meta.get('embedder')!r}/{meta.get('dtype')}; "
                             f"now {self.embedder!r}/{self.options.dtype}: dropping them")
            self._file.clear()
            meta = {}
        stored_ndim = int(meta["ndim"]) if meta.get("ndim") else None
        if self.ndim is None:
            self.ndim = stored_ndim
        elif stored_ndim is not None and stored_ndim != self.ndim:
            self._file.clear()
        self._seq = self._file.max_seq()
        rows = list(self._file.rows())
        now = self.clock()
        expired = [r.key for r in rows if r.expires_at is not None and r.expires_at <= now]
        if expired:
            self._file.delete(expired)
        rows = [r for r in rows if r.expires_at is None or r.expires_at > now]
        if rows and self.ndim is None:
            self.ndim = len(rows[0].vector) // 4
        snapshot = read_snapshot(self._path(".usearch"))
        graphs: dict[bytes, VectorIndex] = {}
        if snapshot is not None and snapshot[0].get("embedder") == self.embedder:
            wanted = {(r.key, r.seq) for r in rows}
            for item in snapshot[1]:
                try:
                    index = VectorIndex.from_bytes(item.graph, dtype=self.options.dtype)
                except ValueError:
                    continue
                if index.ndim != self.ndim:
                    continue
                # A vector answers for the row with its key only if the row is the one it was saved for.
                outdated = [int(k) for k, s in zip(item.keys.tolist(), item.seqs.tolist(), strict=True)
                            if (int(k), int(s)) not in wanted]
                index.remove_many(outdated)
                present = set(index.keys().tolist())
                listed = {int(k) for k in item.keys.tolist()}
                index.remove_many(present - listed)  # a vector the snapshot does not vouch for
                graphs[item.partition] = index
        by_partition: dict[bytes, list[Any]] = {}
        for row in rows:
            by_partition.setdefault(row.partition, []).append(row)
        for partition, part_rows in by_partition.items():
            restored = graphs.get(partition)
            if restored is not None:
                index = restored
            else:
                o = self.options
                index = VectorIndex(cast(int, self.ndim), dtype=o.dtype, connectivity=o.connectivity,
                                    expansion_add=o.expansion_add, expansion_search=o.expansion_search)
            present = set(index.keys().tolist())
            missing = [r for r in part_rows if r.key not in present]
            if missing:
                index.add_many([r.key for r in missing],
                               np.stack([np.frombuffer(r.vector, dtype=np.float32) for r in missing]))
            part = _Partition(index)
            self.partitions[partition] = part
            for row in part_rows:
                entry = _Entry(row.key, row.seq, partition, row.text, row.expires_at, MISSING)
                previous = part.exact.get(row.text)
                if previous is not None:  # two rows, same text: keep the newer (rows come in seq order)
                    stale_entry = self.entries.pop(previous)
                    index.remove(stale_entry.key)
                    part.lru.pop(previous, None)
                    self._file.delete([previous])
                self._adopt(entry, part)
        for partition in set(graphs) - set(by_partition):
            graphs[partition].clear()
        self._next_key = max(self.entries, default=-1) + 1
        self._free = [k for k in range(self._next_key) if k not in self.entries]
        heapq.heapify(self._free)
        self._file.set_meta(self._meta())

    def _meta(self) -> dict[str, str]:
        return {"embedder": self.embedder, "dtype": self.options.dtype, "ndim": str(self.ndim or "")}

    async def read_value(self, entry: _Entry) -> Any:
        """Read and check the payload of ``entry`` from the SQLite file."""
        blob = self._file.value(entry.key, entry.seq)
        if blob is None:
            return MISSING
        try:
            return self.codec.open(self._storage_key(entry.key, entry.seq), blob).value
        except SerializationError as exc:
            self.log.failure(f"semantic store {self.base.name}", exc)
            return MISSING

    async def _persist_insert(self, entry: _Entry, vector: np.ndarray, evicted: Sequence[_Entry]) -> bool:
        from cachelayers.backends.semantic_disk import EntryRow

        try:
            blob = self.codec.seal(self._storage_key(entry.key, entry.seq), entry.value, entry.expires_at)
        except SerializationError as exc:
            self.stats.unstorable += 1
            self.log.failure(f"encoding values of type {type(entry.value).__qualname__}", exc)
            return False
        if self.ndim is not None and not self._file.meta().get("ndim"):
            self._file.set_meta(self._meta())
        row = EntryRow(entry.key, entry.seq, entry.partition, entry.text, entry.expires_at,
                       np.ascontiguousarray(vector, dtype=np.float32).tobytes(), blob)
        self._file.write(row, [e.key for e in evicted])
        entry.value = MISSING  # the file holds it; memory keeps only what lookups need
        self._wrote(1 + len(evicted))
        return True

    async def _persist_remove(self, entries: Sequence[_Entry]) -> None:
        self._file.delete([e.key for e in entries])
        self._wrote(len(entries))

    def _wrote(self, count: int) -> None:
        self._writes += count
        if self._writes >= self.save_every and (self._saving is None or not self._saving.is_alive()):
            self._writes = 0
            payload = self._snapshot()
            self._saving = threading.Thread(target=self._write_snapshot, args=payload,
                                            name="cachelayers-snapshot", daemon=True)
            self._saving.start()

    def _snapshot(self) -> tuple[list[Any], dict[str, str]]:
        from cachelayers.backends.semantic_disk import PartitionSnapshot

        items = []
        for partition, part in self.partitions.items():
            keys = np.array(list(part.lru), dtype=np.uint64)
            seqs = np.array([self.entries[int(k)].seq for k in keys], dtype=np.uint64)
            items.append(PartitionSnapshot(partition, keys, seqs, part.index.to_bytes()))
        return items, self._meta()

    def _write_snapshot(self, items: list[Any], meta: dict[str, str]) -> None:
        from cachelayers.backends.semantic_disk import write_snapshot

        with self._save_lock:
            try:
                write_snapshot(self._path(".usearch"), items, meta)
            except OSError as exc:
                self.log.failure(f"semantic snapshot {self.base.name}", exc)

    async def save(self) -> None:
        """Write a snapshot of every graph now (atomically) and wait for it."""
        if self._file is None:
            return
        if self._saving is not None:
            await anyio.to_thread.run_sync(self._saving.join)
        items, meta = self._snapshot()
        await anyio.to_thread.run_sync(self._write_snapshot, items, meta)
        self._writes = 0

    async def aclose(self) -> None:
        """Save a snapshot and close the file."""
        await super().aclose()
        if self._file is not None:
            self._file.close()
            self._file = None

    async def clear(self) -> None:
        """Remove every entry, in memory and on disk."""
        await super().clear()
        if self._file is not None:
            self._file.clear()
            await self.save()


# -- the engine of one function ------------------------------------------------------------------------------


_functions: weakref.WeakSet[SemanticFunction[Any, Any]] = weakref.WeakSet()


class SemanticFunction(Generic[P, T]):
    """The engine of one function decorated with `semantic_cached` (see the module docstring).

    Args:
        fn: The async function.
        embed: Embedder (sync or async ``list[str] -> (n, d)``); the built-in `HashingEmbedder` by default.
        threshold: Least cosine similarity for a semantic hit, in [0, 1]; the embedder's calibrated
            ``default_threshold`` when omitted.
        text: Name of the argument holding the semantic text, or a function of the arguments (by name)
            returning it; the first parameter (after ``self``) by default. A function needs ``partition=`` too.
        partition: Function of the arguments (by name) returning the exact partition key; by default every
            argument except the text one and those in ``ignore``.
        ignore: Arguments left out of the default partition (clients, ``self``...).
        ttl: Lifetime of entries; the settings' ``default_ttl`` when omitted. A hit never extends it.
        max_entries: Capacity of each partition; the least recently used entry is evicted beyond it.
        verifier: ``async (text, Candidate) -> bool`` confirming a candidate before it is served.
        max_candidates: Candidates above the threshold offered to the verifier, best first.
        namespace: Group of entries (part of every partition); the function's identity by default.
        version: Bump it to stop serving entries of older code.
        name: Identity used instead of ``module.qualname``.
        cache: Tiered cache for embeddings; the default cache of the settings in force when omitted.
        cache_embeddings: Set to ``False`` to embed every text afresh.
        vector_index: Where entries live, overriding ``Settings.vector_index``.
        clock: Wall-clock time source (tests pass a fake one).
        embed_batch_size: Most texts per embedder call (concurrent calls are batched).
        embed_max_wait: Longest a text waits for others to share its embedder call.

    Raises:
        ConfigError: A parameter is out of range; ``text`` names no parameter; a ``text`` function without
            ``partition``; no ``threshold`` and no calibrated default.
        TypeError: ``fn`` is not an async function.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        *,
        embed: Callable[[list[str]], Any] | None = None,
        threshold: float | None = None,
        text: str | Callable[..., str] | None = None,
        partition: Callable[..., Any] | None = None,
        ignore: Iterable[str] = (),
        ttl: float | str | Any = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        verifier: Verifier | None = None,
        max_candidates: int = 4,
        namespace: str | None = None,
        version: str | int = 0,
        name: str | None = None,
        cache: TieredCache | None = None,
        cache_embeddings: bool = True,
        vector_index: str | None = None,
        clock: Callable[[], float] | None = None,
        embed_batch_size: int = 64,
        embed_max_wait: float | str = 0.0,
    ) -> None:
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"semantic_cached needs an async function, got {fn!r}")
        self._fn = fn
        self._embedder = embed if embed is not None else HashingEmbedder()
        if not callable(self._embedder):
            raise ConfigError("embed", embed, "expected a callable list[str] -> (n, d) array")
        if threshold is None:
            threshold = getattr(self._embedder, "default_threshold", None)
            if threshold is None:
                raise ConfigError("threshold", None, f"{embedder_name(self._embedder)} has no calibrated default "
                                  "threshold: pass threshold= (measure one with `cachelayers calibrate`)")
        self.threshold = check_similarity(threshold)
        self._keys = KeyBuilder(fn, namespace=namespace, version=version, ignore=ignore, name=name)
        self.identity = self._keys.identity
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params]
        if text is None:
            candidates = [n for n in names if n not in ("self", "cls")]
            if not candidates:
                raise ConfigError("text", None, f"{self.identity}() has no parameter to take the text from")
            text = candidates[0]
        if isinstance(text, str):
            if text not in names:
                raise ConfigError("text", text, f"{self.identity}() has no such parameter")
            if text in self._keys.ignored:
                raise ConfigError("ignore", text, "the text argument is never part of the partition anyway")
            self._text_arg: str | None = text
            self._text_fn: Callable[..., str] | None = None
        elif callable(text):
            if partition is None:
                raise ConfigError("partition", None, "text= is a function, so say which arguments make the "
                                  "partition with partition= (e.g. lambda model, messages, **_: (model, "
                                  "messages[:-1]))")
            self._text_arg = None
            self._text_fn = text
        else:
            raise ConfigError("text", text, "expected an argument name or a function of the arguments")
        if partition is not None and not callable(partition):
            raise ConfigError("partition", partition, "expected a function of the arguments")
        self._partition_fn = partition
        self._partition_exclude = frozenset({self._text_arg} if self._text_arg else ()) | self._keys.ignored
        self._ttl = parse_duration(ttl, "ttl") if ttl is not None else None
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries <= 0:
            raise ConfigError("max_entries", max_entries, "expected a positive integer")
        self.max_entries = max_entries
        if verifier is not None and not callable(verifier):
            raise ConfigError("verifier", verifier, "expected an async function (text, Candidate) -> bool")
        self._verifier = verifier
        if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates <= 0:
            raise ConfigError("max_candidates", max_candidates, "expected a positive integer")
        self.max_candidates = max_candidates
        self._explicit_cache = cache
        self._cache_embeddings = bool(cache_embeddings)
        if vector_index is not None:
            parse_vector_index(vector_index)
        self._vector_index = vector_index
        self._clock = clock
        self.embedder_name = embedder_name(self._embedder)
        self._embed_prefix = "emb:" + hashlib.blake2b(self.embedder_name.encode(), digest_size=8).hexdigest() + ":"
        self._ndim: int | None = getattr(self._embedder, "ndim", None)
        self._batcher: Batcher[str, [], np.ndarray] = Batcher(
            self._embed_batch, max_size=embed_batch_size, max_wait=embed_max_wait,
            name=f"embed:{self.identity}")
        self._token = self._keys.token.encode()
        self.stats = _Stats()
        self.log = StateLog()
        self._store: SemanticStore | None = None
        self._store_url: str | None = None
        self._opening: Flight | None = None
        self._inflight: dict[tuple[bytes, str], Flight] = {}
        self.wrapper = self._build_wrapper()
        _functions.add(self)
        register_stats_source(self)

    # -- arguments ----------------------------------------------------------------------------------------

    def _text_and_partition(self, arguments: dict[str, Any]) -> tuple[str, bytes]:
        if self._text_fn is not None:
            text = self._text_fn(**arguments)
            where = "text= function"
        else:
            text = arguments[cast(str, self._text_arg)]
            where = f"argument {self._text_arg!r}"
        if not isinstance(text, str):
            raise TypeError(f"semantic_cached {self.identity}(): the semantic text ({where}) must be a str, "
                            f"got {type(text).__name__}")
        if self._partition_fn is not None:
            value: Any = ("partition=", self._partition_fn(**arguments))
        else:
            value = {k: v for k, v in arguments.items() if k not in self._partition_exclude}
        try:
            encoded = canonical_bytes(value)
        except TypeError:
            raise self._unkeyable(value) from None
        h = hashlib.blake2b(digest_size=16, person=b"cachelayers-sp1")
        h.update(self._token)
        h.update(b"\x00")
        h.update(encoded)
        return text, h.digest()

    def _unkeyable(self, value: Any) -> UnkeyableArgumentError:
        if isinstance(value, dict):
            for name, item in value.items():
                try:
                    canonical_bytes(item)
                except TypeError:
                    return UnkeyableArgumentError(self.identity, name, item)
        return UnkeyableArgumentError(self.identity, "partition=", value[1] if isinstance(value, tuple) else value)

    # -- stores -------------------------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The settings in force."""
        return get_settings()

    def _embed_cache(self) -> TieredCache | None:
        if not self._cache_embeddings:
            return None
        return self._explicit_cache if self._explicit_cache is not None else default_cache()

    async def store(self) -> SemanticStore:
        """The store of the settings in force (opened, and loaded from disk or Redis, on first use).

        Raises:
            ConfigError: ``Settings.vector_index`` is invalid.
            Exception: Opening failed (the caller treats it as an index failure).
        """
        settings = get_settings()
        url = self._vector_index or settings.vector_index
        store = self._store
        if store is not None and self._store_url == url and store.usable():
            return store
        while self._opening is not None:
            await self._opening.wait()
            if self._store is not None and self._store_url == url and self._store.usable():
                return self._store
        flight = self._opening = Flight()
        try:
            if store is not None:
                old, self._store = store, None
                await old.aclose()
            clock = self._clock or time.time
            codec = Codec(secret=settings.secret, allow_pickle=settings.allow_pickle)
            new = open_store(url, namespace=f"{settings.key_prefix}{self._keys.namespace}",
                             max_entries=self.max_entries, clock=clock, stats=self.stats, log=self.log, codec=codec)
            try:
                await new.open(self.embedder_name, self._ndim)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await new.aclose()
                    except Exception as exc:  # the open failure is the one to report
                        self.log.failure(f"closing the semantic store of {self.identity}", exc)
                raise
            if new.ndim is not None and self._ndim is None:
                self._ndim = new.ndim
            self._store, self._store_url = new, url
            return new
        finally:
            self._opening = None
            flight.finish()

    # -- embeddings ---------------------------------------------------------------------------------------

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return await embed(self._embedder, texts, self._ndim)

    async def embed_text(self, text: str) -> np.ndarray:
        """The unit vector of ``text``: from the embedding cache, or from the embedder (batched).

        Raises:
            EmbeddingError: The embedder failed or returned a malformed vector.
        """
        cache = self._embed_cache()
        key = self._embed_prefix + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        if cache is not None:
            try:
                cached = await cache.get(key, MISSING)
            except Exception as exc:  # strict mode, or a bug in a tier: embedding is still possible
                self.log.failure("embedding cache", exc)
                cached = MISSING
            if (isinstance(cached, np.ndarray) and cached.dtype == np.float32 and cached.ndim == 1
                    and (self._ndim is None or cached.shape[0] == self._ndim) and np.isfinite(cached).all()):
                return cached
        try:
            vector = await self._batcher.submit(text)
        except BatchError as exc:
            cause = exc.__cause__
            if isinstance(cause, EmbeddingError):
                raise cause from None
            raise EmbeddingError(str(exc)) from exc
        vector = np.array(vector, dtype=np.float32)  # a copy: the row must not pin the whole batch
        if self._ndim is None:
            self._ndim = int(vector.shape[0])
        elif vector.shape != (self._ndim,):
            raise EmbeddingError(f"{self.embedder_name} returned a vector of dimension {vector.shape[0]}; "
                                 f"expected {self._ndim}")
        if cache is not None:
            try:
                await cache.set(key, vector)
            except Exception as exc:
                self.log.failure("embedding cache", exc)
        return vector

    # -- calls --------------------------------------------------------------------------------------------

    def _build_wrapper(self) -> Callable[..., Awaitable[T]]:
        call = self.call

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await call(args, kwargs)

        functools.update_wrapper(wrapper, self._fn)
        wrapper.cache = self  # type: ignore[attr-defined]
        wrapper.cache_info = self.cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = self.cache_clear  # type: ignore[attr-defined]
        wrapper.invalidate_all = self.cache_clear  # type: ignore[attr-defined]
        wrapper.save = self.save  # type: ignore[attr-defined]
        wrapper.aclose = self.aclose  # type: ignore[attr-defined]
        return wrapper

    def _failed(self, what: str, exc: BaseException) -> None:
        self.log.failure(what, exc)
        if get_settings().strict:
            raise exc

    async def _uncached(self, args: tuple[Any, ...], kwargs: dict[str, Any], text: str | None, partition: bytes,
                        reason: str) -> T:
        self.stats.uncached += 1
        _record(Lookup(self.identity, "uncached", None, None, text, partition.hex(), 0, reason))
        return await self._fn(*args, **kwargs)

    async def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        """Answer one call: exact, semantic, or computed and stored (see the module docstring)."""
        started = time.perf_counter()
        try:
            arguments = self._keys.arguments(args, kwargs)
        except TypeError:
            return await self._fn(*args, **kwargs)  # let the function report its own bad arguments
        try:
            text, partition = self._text_and_partition(arguments)
        except TypeError:
            raise
        except Exception as exc:  # a failing partition= or text= function must not fail the call
            self.stats.uncached += 1
            self._failed(f"partition/text functions of {self.identity}", exc)
            _record(Lookup(self.identity, "uncached", None, None, None, "", 0, f"{type(exc).__name__}: {exc}"))
            return await self._fn(*args, **kwargs)
        if not text.strip():
            return await self._uncached(args, kwargs, text, partition, "empty text")
        try:
            store = await self.store()
            await store.sync()
        except ConfigError:
            raise
        except Exception as exc:
            self.stats.index_errors += 1
            self._failed(f"semantic store of {self.identity}", exc)
            return await self._uncached(args, kwargs, text, partition, f"store failed: {exc}")
        flight_key = (partition, text)
        flight = self._inflight.get(flight_key)
        while flight is not None:
            await flight.wait()
            if flight.done and flight.error is None:
                self.stats.exact_hits += 1
                _record(Lookup(self.identity, "exact", 1.0, text, text, partition.hex()))
                return cast(T, flight.value)
            flight = self._inflight.get(flight_key)
        entry = store.find_exact(partition, text)
        if entry is not None:
            value = await self._read(store, entry)
            if value is not MISSING:
                store.touch(entry)
                self.stats.exact_hits += 1
                self.stats.cached_latency.add(time.perf_counter() - started)
                _record(Lookup(self.identity, "exact", 1.0, entry.text, text, partition.hex()))
                return cast(T, value)
        flight = self._inflight[flight_key] = Flight()
        try:
            value = await self._lookup_or_compute(store, args, kwargs, text, partition, started)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            flight.done = True
            return value
        finally:
            if self._inflight.get(flight_key) is flight:
                del self._inflight[flight_key]
            flight.finish()

    async def _read(self, store: SemanticStore, entry: _Entry) -> Any:
        try:
            value = await store.read_value(entry)
        except Exception as exc:
            self.stats.index_errors += 1
            self._failed(f"semantic store of {self.identity}", exc)
            return MISSING
        if value is MISSING:
            await self._forget(store, [entry])
        return value

    async def _forget(self, store: SemanticStore, entries: Sequence[_Entry]) -> None:
        try:
            await store.remove(entries)
        except Exception as exc:
            self.stats.index_errors += 1
            self._failed(f"semantic store of {self.identity}", exc)

    async def _lookup_or_compute(self, store: SemanticStore, args: tuple[Any, ...], kwargs: dict[str, Any],
                                 text: str, partition: bytes, started: float) -> T:
        try:
            vector = await self.embed_text(text)
        except EmbeddingError as exc:
            self.stats.embed_errors += 1
            self._failed(f"embedder {self.embedder_name}", exc)
            return await self._uncached(args, kwargs, text, partition, f"embedding failed: {exc}")
        try:
            if store.ndim is None:
                store.ndim = int(vector.shape[0])
            candidates = store.find_similar(partition, vector, self.max_candidates)
        except Exception as exc:
            self.stats.index_errors += 1
            self._failed(f"semantic index of {self.identity}", exc)
            return await self._uncached(args, kwargs, text, partition, f"index failed: {exc}")
        best = candidates[0][1] if candidates else None
        rejected = 0
        for entry, similarity in candidates:
            if similarity < self.threshold:
                break
            value = await self._read(store, entry)
            if value is MISSING:
                continue
            if self._verifier is not None and not await self._verify(text, entry, value, similarity):
                rejected += 1
                continue
            store.touch(entry)
            self.stats.semantic_hits += 1
            self.stats.cached_latency.add(time.perf_counter() - started)
            _record(Lookup(self.identity, "semantic", similarity, entry.text, text, partition.hex(), rejected))
            return cast(T, value)
        self.stats.misses += 1
        began = time.perf_counter()
        result = await self._fn(*args, **kwargs)
        self.stats.computed_latency.add(time.perf_counter() - began)
        ttl = self._ttl if self._ttl is not None else get_settings().default_ttl
        expires_at = (self._clock or time.time)() + ttl if ttl is not None else None
        try:
            await store.insert(partition, text, vector, result, expires_at)
        except (SerializationError, BackendError, OSError, RuntimeError, ValueError) as exc:
            self.stats.index_errors += 1
            self._failed(f"semantic store of {self.identity}", exc)
        _record(Lookup(self.identity, "computed", best, None, text, partition.hex(), rejected))
        return result

    async def _verify(self, text: str, entry: _Entry, value: Any, similarity: float) -> bool:
        assert self._verifier is not None
        try:
            accepted = await self._verifier(text, Candidate(entry.text, value, similarity))
        except Exception as exc:  # a broken verifier rejects: serving unverified answers is the worse failure
            self.stats.verifier_errors += 1
            self.log.failure(f"verifier of {self.identity}", exc)
            return False
        if not accepted:
            self.stats.verifier_rejections += 1
        return bool(accepted)

    # -- management ---------------------------------------------------------------------------------------

    async def cache_clear(self) -> None:
        """Remove every entry of this function (vectors and payloads, in every process when shared)."""
        store = await self.store()
        await store.clear()

    async def save(self) -> None:
        """Persist the index now (disk mode: an atomic snapshot; otherwise a no-op)."""
        if self._store is not None:
            await self._store.save()

    async def aclose(self) -> None:
        """Save and close the store (the next call opens it again)."""
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()

    def cache_info(self) -> SemanticCacheInfo:
        """Hits per level, misses, entries, evictions, errors, verifier outcomes and latencies."""
        s = self.stats
        answered = s.exact_hits + s.semantic_hits + s.misses + s.uncached
        store = self._store
        return SemanticCacheInfo(
            exact_hits=s.exact_hits, semantic_hits=s.semantic_hits, misses=s.misses, uncached=s.uncached,
            hit_rate=(s.exact_hits + s.semantic_hits) / answered if answered else 0.0,
            entries=len(store) if store is not None else 0,
            partitions=len(store.partitions) if store is not None else 0,
            evictions=s.evictions, expirations=s.expirations, embed_errors=s.embed_errors,
            index_errors=s.index_errors, verifier_rejections=s.verifier_rejections,
            verifier_errors=s.verifier_errors, unstorable=s.unstorable, compactions=s.compactions,
            cached_p50=s.cached_latency.percentile(50), computed_p50=s.computed_latency.percentile(50))

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"semantic:{self.identity}": self.cache_info()._asdict()}

    def __repr__(self) -> str:
        return f"<SemanticFunction of {self.identity}>"

