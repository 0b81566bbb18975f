"""One usearch HNSW index of unit vectors under integer keys, used safely (see `VectorIndex`)."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from cachelayers.errors import ConfigError, MissingDependencyError

__all__ = ["DTYPES", "Compaction", "Neighbours", "VectorIndex", "atomic_write", "require_usearch"]

DTYPES: Final = ("f64", "f32", "f16", "bf16", "i8")
"""Scalar types a `VectorIndex` can store. ``f32`` keeps similarities exact to ~1e-7."""

_KEY: Final = np.uint64


def _usearch() -> Any:
    try:
        from usearch import index as usearch_index
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("vector_index", "usearch", "usearch", "semantic") from None
    return usearch_index


def require_usearch() -> None:
    """Import usearch now.

    Raises:
        MissingDependencyError: It is not installed (the message names the ``semantic`` extra).
    """
    _usearch()


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old content or the new, never a mix.

    The data goes to a temporary file in the same directory, is flushed to disk, and is renamed over
    ``path``; the directory entry is flushed too, so the rename itself survives a power cut.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Neighbours(NamedTuple):
    """Result of a search: keys, nearest first, and their cosine similarities (1 = same direction)."""

    keys: list[int]
    similarities: list[float]


class Compaction:
    """A rebuild of a `VectorIndex`'s graph from a snapshot of its live vectors.

    Made by `VectorIndex.begin_compaction`. `build` touches only the snapshot and the new graph, so it may
    run in a worker thread while the index keeps serving; writes made meanwhile are journaled by the index
    and replayed by `VectorIndex.commit_compaction`.
    """

    __slots__ = ("_keys", "_options", "_vectors", "error", "graph")

    def __init__(self, keys: np.ndarray, vectors: np.ndarray, options: dict[str, Any]) -> None:
        self._keys = keys
        self._vectors = vectors
        self._options = options
        self.graph: Any = None
        self.error: BaseException | None = None

    def build(self) -> None:
        """Build the new graph (blocking; safe in a worker thread). Errors are kept in ``error``."""
        try:
            graph = _usearch().Index(**self._options)
            if len(self._keys):
                graph.add(self._keys, self._vectors, threads=1)
            self.graph = graph
        except Exception as exc:
            self.error = exc

    @property
    def size(self) -> int:
        """Number of vectors in the snapshot."""
        return len(self._keys)


class VectorIndex:
    """A usearch index of unit vectors under ``uint64`` keys, with cosine similarity.

    It knows nothing of payloads, partitions or expiry (the semantic engine does). What it takes care of:

    * **an explicit scalar type** (``f32`` by default): usearch picks ``bf16`` on some CPUs when none is
      given, which moves similarities by up to ~0.01 — enough to flip answers at a threshold;
    * **one writer at a time**: concurrent ``add`` calls can leave a node stored but unreachable by search
      (usearch issue #735). Every operation takes one lock, and batch adds run with ``threads=1``;
    * **incremental inserts and removals**: usearch reuses a removed node's slot, so keys can be reused and
      memory does not grow with churn;
    * **compaction**: reused slots slowly degrade the graph; `begin_compaction` snapshots the live vectors,
      `Compaction.build` makes a fresh graph (in a worker thread), `commit_compaction` replays the writes
      made meanwhile and swaps it in;
    * **atomic persistence**: `save` writes a temporary file, flushes it and renames it over the old one.

    Args:
        ndim: Dimension of the vectors.
        dtype: Scalar type stored: ``"f32"`` (default), ``"f64"``, ``"f16"``, ``"bf16"`` or ``"i8"``. Types
            below ``f32`` save memory and move similarities slightly; calibrate the threshold with the same
            type you serve with.
        connectivity: HNSW edges per node (usearch's default when omitted).
        expansion_add: Candidate list size while inserting (usearch's default when omitted).
        expansion_search: Candidate list size while searching (usearch's default when omitted).

    Raises:
        ConfigError: ``ndim`` is not positive, or ``dtype`` or a graph parameter is invalid.
    """

    def __init__(self, ndim: int, *, dtype: str = "f32", connectivity: int | None = None,
                 expansion_add: int | None = None, expansion_search: int | None = None) -> None:
        if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim <= 0:
            raise ConfigError("ndim", ndim, "expected a positive integer")
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, f"expected one of {', '.join(DTYPES)}")
        for name, value in (("connectivity", connectivity), ("expansion_add", expansion_add),
                            ("expansion_search", expansion_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(name, value, "expected a positive integer")
        self.ndim = ndim
        self.dtype = dtype
        self._options: dict[str, Any] = {"ndim": ndim, "metric": "cos", "dtype": dtype}
        for name, value in (("connectivity", connectivity), ("expansion_add", expansion_add),
                            ("expansion_search", expansion_search)):
            if value is not None:
                self._options[name] = value
        self._index = _usearch().Index(**self._options)
        self._lock = threading.RLock()
        self._journal: list[tuple[int, np.ndarray | None]] | None = None
        self.removed_since_build = 0
        """Removals since the graph was built: slots usearch will reuse, each a small loss of graph quality."""

    # -- queries ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.size)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, bool) or not isinstance(key, int | np.integer) or key < 0:
            return False
        with self._lock:
            return bool(self._index.contains(int(key)))

    def search(self, vector: np.ndarray, count: int = 1) -> Neighbours:
        """Return up to ``count`` nearest keys to ``vector`` with their cosine similarities, best first."""
        query = self._check(vector)
        with self._lock:
            if not self._index.size:
                return Neighbours([], [])
            matches = self._index.search(query, count, threads=1)
            keys = matches.keys.tolist()
            distances = matches.distances.tolist()
        return Neighbours(keys, [1.0 - d for d in distances])

    def get(self, keys: Sequence[int]) -> np.ndarray:
        """Return the stored vectors of ``keys`` as a ``(len(keys), ndim)`` float32 array.

        Raises:
            KeyError: A key is not in the index.
        """
        with self._lock:
            out = np.empty((len(keys), self.ndim), dtype=np.float32)
            for i, key in enumerate(keys):
                vector = self._index.get(int(key))
                if vector is None:
                    raise KeyError(key)
                out[i] = vector
        return out

    def keys(self) -> np.ndarray:
        """All keys in the index, as ``uint64``."""
        with self._lock:
            return np.asarray(self._index.keys[:], dtype=_KEY)

    # -- writes -------------------------------------------------------------------------------------------

    def add(self, key: int, vector: np.ndarray) -> None:
        """Store ``vector`` under ``key``, replacing what the key held."""
        vec = self._check(vector)
        with self._lock:
            if self._index.contains(key):
                self._index.remove(key)
                self.removed_since_build += 1
            self._index.add(key, vec, threads=1)
            if self._journal is not None:
                self._journal.append((key, vec))

    def add_many(self, keys: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Store many vectors; equivalent to `add` for each pair, in one call."""
        key_array = np.asarray(keys, dtype=_KEY)
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape != (len(key_array), self.ndim):
            raise ValueError(f"expected a ({len(key_array)}, {self.ndim}) array, got shape {matrix.shape}")
        if len(np.unique(key_array)) != len(key_array):
            raise ValueError("keys must be unique within one add_many call")
        if not len(key_array):
            return
        with self._lock:
            present = [int(k) for k in key_array if self._index.contains(int(k))]
            if present:
                self._index.remove(np.array(present, dtype=_KEY))
                self.removed_since_build += len(present)
            self._index.add(key_array, matrix, threads=1)
            if self._journal is not None:
                self._journal.extend((int(k), matrix[i].copy()) for i, k in enumerate(key_array))

    def remove(self, key: int) -> bool:
        """Remove ``key``; return whether it was there."""
        with self._lock:
            if not self._index.contains(key):
                return False
            self._index.remove(key)
            self.removed_since_build += 1
            if self._journal is not None:
                self._journal.append((key, None))
            return True

    def remove_many(self, keys: Iterable[int]) -> int:
        """Remove every key present; return how many were."""
        removed = 0
        for key in keys:
            removed += self.remove(int(key))
        return removed

    def clear(self) -> None:
        """Remove every vector and start a fresh graph."""
        with self._lock:
            self._index = _usearch().Index(**self._options)
            self.removed_since_build = 0
            if self._journal is not None:
                self._journal = None  # a pending compaction would resurrect cleared vectors: abandon it

    # -- compaction ---------------------------------------------------------------------------------------

    def needs_compaction(self, ratio: float = 0.25, minimum: int = 64) -> bool:
        """Whether enough removals piled up (``ratio`` of the live size, at least ``minimum``) to rebuild."""
        return self._journal is None and self.removed_since_build >= max(minimum, ratio * len(self))

    @property
    def compacting(self) -> bool:
        """Whether a compaction has begun and not been committed or abandoned."""
        return self._journal is not None

    def begin_compaction(self) -> Compaction:
        """Snapshot the live vectors for a rebuild and start journaling writes (see `Compaction`).

        Raises:
            RuntimeError: A compaction is already in progress.
        """
        with self._lock:
            if self._journal is not None:
                raise RuntimeError("a compaction is already in progress")
            keys = np.asarray(self._index.keys[:], dtype=_KEY)
            vectors = self._index.get(keys) if len(keys) else np.empty((0, self.ndim), dtype=np.float32)
            self._journal = []
            return Compaction(keys, np.ascontiguousarray(vectors, dtype=np.float32), dict(self._options))

    def commit_compaction(self, job: Compaction) -> bool:
        """Swap in the graph ``job`` built, after replaying the writes made since it began.

        Returns ``False`` (and keeps the current graph) when the build failed or the compaction was
        abandoned by `clear`.
        """
        with self._lock:
            journal = self._journal
            if journal is None or job.graph is None:
                self._journal = None
                return False
            graph = job.graph
            for key, vector in journal:
                if graph.contains(key):
                    graph.remove(key)
                if vector is not None:
                    graph.add(key, vector, threads=1)
            self._index = graph
            self._journal = None
            self.removed_since_build = sum(1 for _, vector in journal if vector is None)
            return True

    def compact(self) -> None:
        """Rebuild the graph now, blocking (for tests, tools and small indexes)."""
        job = self.begin_compaction()
        job.build()
        if not self.commit_compaction(job):
            raise RuntimeError("compaction failed") from job.error

    # -- persistence --------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise the index (vectors and graph) to bytes."""
        with self._lock:
            return bytes(self._index.save())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, dtype: str | None = None,
                   **options: int | None) -> VectorIndex:
        """Load an index serialised by `to_bytes`.

        Raises:
            ValueError: The data is not a usearch index, or its scalar type differs from ``dtype``.
        """
        restored = _usearch().Index.restore(bytes(data), view=False)
        if restored is None:
            raise ValueError("data is not a usearch index")
        stored_dtype = str(restored.dtype).rsplit(".", 1)[-1].lower()
        if dtype is not None and stored_dtype != dtype:
            raise ValueError(f"index stores {stored_dtype}, expected {dtype}")
        index = cls(int(restored.ndim), dtype=stored_dtype, **options)
        index._index = restored
        return index

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (temporary file, flush, rename)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, dtype: str | None = None) -> VectorIndex:
        """Read an index written by `save`.

        Raises:
            OSError: The file cannot be read.
            ValueError: It is not a usearch index, or holds another scalar type than ``dtype``.
        """
        return cls.from_bytes(Path(path).read_bytes(), dtype=dtype)

    # -- helpers ------------------------------------------------------------------------------------------

    def _check(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.ndim,):
            raise ValueError(f"expected a vector of dimension {self.ndim}, got shape {vec.shape}")
        return vec

    @property
    def memory_usage(self) -> int:
        """Bytes used by the usearch index."""
        return int(self._index.memory_usage)

    def __repr__(self) -> str:
        return f"VectorIndex(ndim={self.ndim}, dtype={self.dtype!r}, size={len(self)})"

