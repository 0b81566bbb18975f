"""The persistence protocol of the semantic cache: what a store of entries and the storage behind it say.

The semantic engine keeps every partition's index, exact texts, LRU order and expiry in memory (its store
policy); a `VectorPersistence` keeps the entries somewhere else — a SQLite file, or Redis shared by
processes — and sees the in-memory store only through the small `Replica` protocol. ``memory://`` has no
persistence at all: values stay in the entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, Protocol

import numpy as np

from cachelayers.backends.base import BackendURL
from cachelayers.backends.vectors.index import VectorIndex
from cachelayers.backends.vectors.options import IndexOptions
from cachelayers.codec import Codec
from cachelayers.metrics import StateLog

__all__ = ["GONE", "Appended", "EntryRef", "Loaded", "PartitionGraph", "Replica", "StoredRow", "VectorPersistence",
           "VectorStorage", "in_memory"]


class _Gone:
    __slots__ = ()

    def __repr__(self) -> str:
        return "GONE"


GONE: Final[Any] = _Gone()
"""The value of an entry whose payload is not in memory, or was removed or expired elsewhere."""


class EntryRef(Protocol):
    """An entry as a persistence sees it: where it lives and what it said, not its value."""

    @property
    def key(self) -> int:
        """Key of its vector in the partition's index."""
        ...

    @property
    def seq(self) -> int:
        """Sequence number, never reused: ``(key, seq)`` names one entry forever."""
        ...

    @property
    def partition(self) -> bytes:
        """Digest of its partition."""
        ...

    @property
    def text(self) -> str:
        """Its semantic text."""
        ...

    @property
    def expires_at(self) -> float | None:
        """Wall-clock expiry, or ``None`` for never."""
        ...

    @property
    def stamp(self) -> object:
        """What the storage told of its clears when the computation the entry holds began (its ``clears``; a
        shared storage drops an entry whose computation began before a clear, rather than keep what the clear
        meant to remove), or ``None`` for no check."""
        ...


class StoredRow(NamedTuple):
    """An entry read back from storage, with its vector and without its value."""

    key: int
    seq: int
    partition: bytes
    text: str
    expires_at: float | None
    vector: np.ndarray


class PartitionGraph(NamedTuple):
    """One partition of a replica, for a snapshot: its keys (LRU order), their sequence numbers, its index."""

    partition: bytes
    keys: np.ndarray  # uint64
    seqs: np.ndarray  # uint64
    graph: VectorIndex


class Loaded(NamedTuple):
    """What `VectorPersistence.open` found."""

    ndim: int | None
    """Dimension of the stored vectors (``None``: unknown)."""
    last_seq: int
    """Highest sequence number ever stored (0 when none): new entries must number after it."""


class Appended(NamedTuple):
    """What `VectorPersistence.append` stored."""

    key: int
    """Key of the new entry (a shared storage hands it out)."""
    removed: list[int]
    """Keys removed with the write (replaced and evicted entries)."""
    dropped: bool = False
    """The entry was not kept: the storage was cleared after the computation it holds began (see `EntryRef.stamp`)."""


class Replica(Protocol):
    """What a persistence sees of the in-memory store it serves."""

    @property
    def ndim(self) -> int | None:
        """Dimension of the vectors (``None`` until known)."""
        ...

    def graphs(self) -> list[PartitionGraph]:
        """Every partition's keys, sequence numbers and index, for a snapshot."""
        ...

    def adopt(self, rows: Sequence[StoredRow], graphs: Mapping[bytes, VectorIndex] | None = None) -> None:
        """Make stored entries findable; ``graphs`` are indexes already holding their partitions' vectors."""
        ...

    def forget(self, key: int) -> None:
        """Forget the entry of ``key`` locally (it was removed elsewhere)."""
        ...

    def forget_all(self) -> None:
        """Forget every entry locally (storage was cleared, or is reloaded)."""
        ...

    def corrupt(self, count: int, what: str, exc: BaseException) -> None:
        """Count ``count`` stored entries that failed their integrity check (already dropped), and log once."""
        ...


class VectorPersistence(Protocol):
    """Where the entries of a semantic store are kept, beyond the process's memory.

    The store calls it from one event loop. Reads and writes never decide anything: which entry to evict,
    replace or expire is the store's policy — except in ``shared`` storage, which hands out keys, applies the
    capacity and expires entries itself (every process's replica follows it).
    """

    shared: bool
    """Whether the storage is shared by processes (see the class docstring)."""

    async def open(self, replica: Replica, embedder: str, ndim: int | None, options: IndexOptions) -> Loaded:
        """Connect or open files and hand the stored entries to ``replica`` (`Replica.adopt`)."""
        ...

    def usable(self) -> bool:
        """Whether it can serve on the running event loop (a client may be bound to one)."""
        ...

    async def sync(self) -> None:
        """Apply to the replica what other processes changed (a no-op unless shared)."""
        ...

    async def read(self, entry: EntryRef) -> Any:
        """The value of ``entry``, or `GONE` when it was removed, expired or cannot be opened."""
        ...

    async def append(self, entry: EntryRef, value: Any, vector: np.ndarray, evict: Sequence[EntryRef],
                     capacity: int) -> Appended:
        """Store ``entry`` with ``value`` and remove ``evict`` in one write.

        A shared storage ignores ``entry.key`` and applies ``capacity`` itself; ``evict`` then holds at
        most the entry of the same text, which the new one replaces.

        Raises:
            SerializationError: ``value`` cannot be encoded (nothing was written).
        """
        ...

    async def remove(self, entries: Sequence[EntryRef]) -> None:
        """Remove entries."""
        ...

    async def clear(self) -> None:
        """Remove every entry (after the replica forgot them)."""
        ...

    async def save(self) -> None:
        """Persist what is not persisted yet (e.g. a snapshot of the graphs)."""
        ...

    async def aclose(self) -> None:
        """Release files or connections."""
        ...


VectorStorage = Callable[..., VectorPersistence | None]
"""What a ``vector_index`` scheme registers: ``(url, namespace, *, codec, log, clock)`` -> persistence."""


def in_memory(url: BackendURL, namespace: str, *, codec: Codec, log: StateLog,
              clock: Callable[[], float]) -> VectorPersistence | None:
    """The ``memory://`` scheme: no persistence; entries live in the process only.

    Returns:
        ``None``.
    """
    return None
