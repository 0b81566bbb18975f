"""One usearch HNSW index of unit vectors under integer keys, used safely (see `VectorIndex`)."""

from __future__ import annotations

import math
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from cachelayers.backends.vectors.rows import KEY, ExactRows
from cachelayers.errors import ConfigError, MissingDependencyError

__all__ = ["DEFAULT_SEARCH_DTYPE", "DTYPES", "GRAPH_FROM", "RESCORE", "SEARCH_DTYPES", "Compaction", "Neighbours",
           "VectorIndex", "atomic_write", "require_usearch"]

DTYPES: Final = ("f64", "f32", "f16", "bf16", "i8")
"""Scalar types a `VectorIndex` can store. ``f32`` keeps similarities exact to ~1e-7."""

SEARCH_DTYPES: Final = ("f32", "f16", "bf16", "i8")
"""Scalar types the graph of an ``f32`` index can search in before the exact rescoring."""

DEFAULT_SEARCH_DTYPE: Final = "i8"
"""The graph of an ``f32`` index: i8 searched faster than bf16 (and both faster than f32) on the AVX2 machine
of the benchmarks, where usearch has no native bf16 kernel; the rescoring makes the type invisible in the
similarities. ``search_dtype="bf16"`` may win on CPUs with AVX-512 BF16."""

RESCORE: Final = 16
"""Candidates the compact graph proposes per search, rescored with exact ``f32`` similarity."""

DIRECT_RESCORE: Final = 64
"""Up to this many candidates, a search scores every one exactly (float64) and sorts once; beyond (an index
scanned without a graph), a float32 product ranks them first and only the best are scored exactly."""

GRAPH_FROM: Final = 256
"""An ``f32`` index puts its vectors in the graph once it holds more than this many; below, a search scans the
exact vectors (exact, fast at this size, and a small partition costs no graph nodes: ~45 KiB less each)."""

_KEY: Final = KEY
_MAGIC: Final = b"CLVI\x01"
_HEADER: Final = struct.Struct("<5sIQ8s")  # magic, ndim, count, graph dtype


def _usearch() -> Any:
    try:
        from usearch import index as usearch_index
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("vector_index", "usearch", "usearch", "semantic") from None
    return usearch_index


def _restore(data: bytes) -> Any:
    """usearch's index in ``data`` (``None`` when it is not one).

    Raises:
        ValueError: usearch failed to read it (it raises `RuntimeError` on damaged data).
    """
    try:
        return _usearch().Index.restore(data, view=False)
    except RuntimeError as exc:
        raise ValueError(f"damaged usearch index: {exc}") from None


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
    * **fast search, exact similarities** (``f32``): the graph stores the vectors in a compact type
      (``search_dtype``, ``i8`` by default: faster to search than ``f32``), and the exact ``f32``
      vectors are kept beside it in a numpy matrix; a search takes the graph's best `RESCORE` candidates (or
      ``count`` if more) and rescores them exactly, so every similarity it reports is the exact cosine (to
      ~1e-7) and the order is exact among the candidates. The matrix costs ``4 * ndim`` bytes per vector on
      top of the graph;
    * **one writer at a time**: concurrent ``add`` calls can leave a node stored but unreachable by search
      (usearch issue #735). Every operation takes one lock, and batch adds run with ``threads=1`` unless
      asked otherwise;
    * **incremental inserts and removals**: usearch reuses a removed node's slot, so keys can be reused and
      memory does not grow with churn;
    * **compaction**: reused slots slowly degrade the graph; `begin_compaction` snapshots the live vectors,
      `Compaction.build` makes a fresh graph (in a worker thread), `commit_compaction` replays the writes
      made meanwhile and swaps it in;
    * **atomic persistence**: `save` writes a temporary file, flushes it and renames it over the old one.

    Args:
        ndim: Dimension of the vectors.
        dtype: Scalar type of the similarities: ``"f32"`` (default: exact, see above), ``"f64"``, ``"f16"``,
            ``"bf16"`` or ``"i8"``. Types other than ``f32`` are stored in the graph as they are, with no
            rescoring: below ``f32`` they save memory and move similarities slightly; calibrate the threshold
            with the same type you serve with.
        connectivity: HNSW edges per node (usearch's default when omitted).
        expansion_add: Candidate list size while inserting (usearch's default when omitted).
        expansion_search: Candidate list size while searching (usearch's default when omitted).
        search_dtype: Scalar type of the graph of an ``f32`` index (`DEFAULT_SEARCH_DTYPE` by default;
            ``"bf16"``, ``"f32"``, ``"f16"`` or ``"i8"``). Only the speed and the candidates change, never the
            similarities reported.
        rescore: Candidates rescored exactly per search of an ``f32`` index (`RESCORE` by default).

    Raises:
        ConfigError: ``ndim`` is not positive, or ``dtype``, ``search_dtype``, ``rescore`` or a graph parameter
            is invalid.
    """

    def __init__(self, ndim: int, *, dtype: str = "f32", connectivity: int | None = None,
                 expansion_add: int | None = None, expansion_search: int | None = None,
                 search_dtype: str | None = None, rescore: int = RESCORE) -> None:
        if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim <= 0:
            raise ConfigError("ndim", ndim, "expected a positive integer")
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, f"expected one of {', '.join(DTYPES)}")
        if search_dtype is not None and dtype != "f32":
            raise ConfigError("search_dtype", search_dtype, "only an f32 index searches in another type")
        if search_dtype is not None and search_dtype not in SEARCH_DTYPES:
            raise ConfigError("search_dtype", search_dtype, f"expected one of {', '.join(SEARCH_DTYPES)}")
        for name, value in (("connectivity", connectivity), ("expansion_add", expansion_add),
                            ("expansion_search", expansion_search), ("rescore", rescore)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(name, value, "expected a positive integer")
        self.ndim = ndim
        self.dtype = dtype
        self.search_dtype = (search_dtype or DEFAULT_SEARCH_DTYPE) if dtype == "f32" else dtype
        """Scalar type of the graph searched (the candidates of an ``f32`` index are then rescored)."""
        self.rescore = rescore
        self._options: dict[str, Any] = {"ndim": ndim, "metric": "cos", "dtype": self.search_dtype}
        for name, value in (("connectivity", connectivity), ("expansion_add", expansion_add),
                            ("expansion_search", expansion_search)):
            if value is not None:
                self._options[name] = value
        self._index = _usearch().Index(**self._options)
        self._rows = ExactRows(ndim) if dtype == "f32" else None
        self._graphed = self._rows is None  # whether the graph holds the vectors (see `GRAPH_FROM`)
        self._lock = threading.RLock()
        self._journal: list[tuple[int, np.ndarray | None]] | None = None
        self.removed_since_build = 0
        """Removals since the graph was built: slots usearch will reuse, each a small loss of graph quality."""

    # -- queries ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._rows.size if self._rows is not None else int(self._index.size)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, bool) or not isinstance(key, int | np.integer) or key < 0:
            return False
        with self._lock:
            if self._rows is not None:
                return int(key) in self._rows.row_of
            return bool(self._index.contains(int(key)))

    def search(self, vector: np.ndarray, count: int = 1) -> Neighbours:
        """Return up to ``count`` nearest keys to ``vector`` with their cosine similarities, best first.

        For an ``f32`` index the similarities are exact (see the class notes).
        """
        query = self._check(vector)
        with self._lock:
            if not len(self):
                return Neighbours([], [])
            if self._rows is not None:
                return self._rescored(query, count)
            matches = self._index.search(query, count, threads=1)
            keys = matches.keys.tolist()
            distances = matches.distances.tolist()
        return Neighbours(keys, [1.0 - d for d in distances])

    def _rescored(self, query: np.ndarray, count: int) -> Neighbours:
        """The graph's best candidates, rescored with the exact vectors (caller holds the lock).

        What is reported is numpy's cosine, computed in float64. With few candidates (the graph's best, or a
        small index) every one is scored that way and sorted once; with many (an index scanned without a
        graph), they are ranked by a float32 product with the stored rows (a few 1e-8 from exact) and only
        the ``count`` best are scored in float64.
        """
        rows = self._rows
        assert rows is not None
        wanted = max(count, self.rescore)
        if rows.size <= wanted or not self._graphed:
            picked: Any = np.arange(rows.size)  # every vector is a candidate: exact, no graph needed
        else:
            row_of = rows.row_of
            picked = np.fromiter((row_of[k] for k in self._index.search(query, wanted, threads=1).keys.tolist()),
                                 dtype=np.intp)
        exact = query.astype(np.float64)
        norm = math.sqrt(float(exact @ exact))
        scale = 1.0 / norm if norm else 0.0
        if len(picked) <= DIRECT_RESCORE:
            sims = rows.similarities(picked, exact) * scale
            if count == 1:
                best = int(np.argmax(sims))  # the first of equal maxima, as the stable sort below
                return Neighbours([int(rows.keys[picked[best]])], [float(sims[best])])
            order = np.argsort(-sims, kind="stable")[:count]
            return Neighbours(rows.keys.take(picked.take(order)).tolist(), sims.take(order).tolist())
        ranking = (rows.matrix.take(picked, axis=0) @ query) * rows.inverse.take(picked)
        if count == 1:
            row = picked[int(np.argmax(ranking))]
            similarity = float(rows.matrix[row].astype(np.float64) @ exact) * float(rows.inverse[row]) * scale
            return Neighbours([int(rows.keys[row])], [similarity])
        best_rows = picked.take(np.argsort(-ranking, kind="stable")[:count])
        similarities = rows.similarities(best_rows, exact) * scale
        order = np.argsort(-similarities, kind="stable")  # float32 ranked them; the exact values decide ties
        return Neighbours(rows.keys.take(best_rows).take(order).tolist(), similarities.take(order).tolist())

    def get(self, keys: Sequence[int]) -> np.ndarray:
        """Return the stored vectors of ``keys`` as a ``(len(keys), ndim)`` float32 array.

        Raises:
            KeyError: A key is not in the index.
        """
        with self._lock:
            out = np.empty((len(keys), self.ndim), dtype=np.float32)
            for i, key in enumerate(keys):
                if self._rows is not None:
                    row = self._rows.row_of.get(int(key))
                    if row is None:
                        raise KeyError(key)
                    out[i] = self._rows.matrix[row]
                    continue
                vector = self._index.get(int(key))
                if vector is None:
                    raise KeyError(key)
                out[i] = vector
        return out

    def keys(self) -> np.ndarray:
        """All keys in the index, as ``uint64``."""
        with self._lock:
            if self._rows is not None:
                return self._rows.keys[:self._rows.size].copy()
            return np.asarray(self._index.keys[:], dtype=_KEY)

    # -- writes -------------------------------------------------------------------------------------------

    def add(self, key: int, vector: np.ndarray) -> None:
        """Store ``vector`` under ``key``, replacing what the key held."""
        vec = self._check(vector)
        with self._lock:
            if self._graphed:
                if self._index.contains(key):
                    self._index.remove(key)
                    self.removed_since_build += 1
                self._index.add(key, vec, threads=1)
            if self._rows is not None:
                self._rows.put_many(np.array([key], dtype=_KEY), vec[None, :])
                self._graph_up()
            if self._journal is not None:
                self._journal.append((key, vec))

    def add_many(self, keys: Sequence[int] | np.ndarray, vectors: np.ndarray, *, threads: int = 1) -> None:
        """Store many vectors; equivalent to `add` for each pair, in one call.

        Args:
            keys: Unique keys.
            vectors: One row per key.
            threads: Threads of usearch's parallel insert (1 by default, see the class notes; the benchmarks
                build large graphs with more and check their recall).

        Raises:
            ValueError: The shapes disagree or a key repeats.
        """
        key_array = np.asarray(keys, dtype=_KEY)
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape != (len(key_array), self.ndim):
            raise ValueError(f"expected a ({len(key_array)}, {self.ndim}) array, got shape {matrix.shape}")
        if len(np.unique(key_array)) != len(key_array):
            raise ValueError("keys must be unique within one add_many call")
        if not len(key_array):
            return
        with self._lock:
            if self._graphed:
                present = [int(k) for k in key_array if self._index.contains(int(k))]
                if present:
                    self._index.remove(np.array(present, dtype=_KEY))
                    self.removed_since_build += len(present)
                self._index.add(key_array, matrix, threads=threads)
            if self._rows is not None:
                self._rows.put_many(key_array, matrix)
                self._graph_up(threads)
            if self._journal is not None:
                self._journal.extend((int(k), matrix[i].copy()) for i, k in enumerate(key_array))

    def remove(self, key: int) -> bool:
        """Remove ``key``; return whether it was there."""
        with self._lock:
            if key not in self:
                return False
            if self._graphed:
                self._index.remove(key)
                self.removed_since_build += 1
            if self._rows is not None:
                self._rows.drop(int(key))
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
            if self._rows is not None:
                self._rows = ExactRows(self.ndim)
            self._graphed = self._rows is None
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
            if self._rows is not None:  # the exact vectors: a compact graph's are rounded
                keys = self._rows.keys[:self._rows.size].copy()
                vectors = self._rows.matrix[:self._rows.size].copy()
            else:
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
            self._graphed = True  # built from every vector of the snapshot, and the journal replayed
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
        """Serialise the index (vectors and graph) to bytes.

        An ``f32`` index writes a header, its keys and exact vectors, then usearch's bytes of the graph; other
        types write usearch's bytes alone.
        """
        with self._lock:
            graph = bytes(self._index.save())
            rows = self._rows
            if rows is None:
                return graph
            head = _HEADER.pack(_MAGIC, self.ndim, rows.size, self.search_dtype.encode())
            return b"".join((head, rows.keys[:rows.size].astype("<u8").tobytes(),
                             rows.matrix[:rows.size].astype("<f4").tobytes(), graph))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, dtype: str | None = None,
                   **options: int | None) -> VectorIndex:
        """Load an index serialised by `to_bytes` (or a bare usearch index, as written before rescoring).

        Raises:
            ValueError: The data is not an index, is inconsistent, or its scalar type differs from ``dtype``.
        """
        raw = bytes(data)
        if raw[:len(_MAGIC)] != _MAGIC:
            return cls._from_usearch(raw, dtype, options)
        if dtype is not None and dtype != "f32":
            raise ValueError(f"index stores f32, expected {dtype}")
        if len(raw) < _HEADER.size:
            raise ValueError("truncated index")
        _, ndim, count, graph_dtype = _HEADER.unpack_from(raw)
        offset = _HEADER.size + count * (8 + 4 * ndim)
        if ndim <= 0 or len(raw) < offset:
            raise ValueError("truncated index")
        keys = np.frombuffer(raw, dtype="<u8", count=count, offset=_HEADER.size).astype(_KEY)
        vectors = np.frombuffer(raw, dtype="<f4", count=count * ndim, offset=_HEADER.size + 8 * count)
        graph = _restore(raw[offset:])
        graphed = count > 0 and graph is not None and int(graph.size) > 0  # else vectors only (see GRAPH_FROM)
        if graph is None or int(graph.ndim) != ndim or (graphed and int(graph.size) != count):
            raise ValueError("the graph does not match the vectors of the index")
        if graphed and not np.array_equal(np.sort(np.asarray(graph.keys[:], dtype=_KEY)), np.sort(keys)):
            raise ValueError("the graph does not hold the keys of the index")
        try:
            index = cls(ndim, dtype="f32", search_dtype=graph_dtype.rstrip(b"\0").decode(), **options)  # type: ignore[arg-type]
        except (ConfigError, UnicodeDecodeError) as exc:
            raise ValueError(f"unknown graph type in index: {exc}") from None
        index._index = graph
        index._graphed = graphed
        assert index._rows is not None
        index._rows.put_many(keys, vectors.reshape(count, ndim).astype(np.float32))
        index._graph_up()
        return index

    @classmethod
    def _from_usearch(cls, raw: bytes, dtype: str | None, options: dict[str, int | None]) -> VectorIndex:
        """A bare usearch index; an ``f32`` one keeps its graph until the next compaction makes a compact one."""
        restored = _restore(raw)
        if restored is None:
            raise ValueError("data is not a usearch index")
        stored_dtype = str(restored.dtype).rsplit(".", 1)[-1].lower()
        if dtype is not None and stored_dtype != dtype:
            raise ValueError(f"index stores {stored_dtype}, expected {dtype}")
        index = cls(int(restored.ndim), dtype=stored_dtype, **options)  # type: ignore[arg-type]
        index._index = restored
        index._graphed = True
        if index._rows is not None:
            keys = np.asarray(restored.keys[:], dtype=_KEY)
            vectors = restored.get(keys) if len(keys) else np.empty((0, index.ndim), dtype=np.float32)
            index._rows.put_many(keys, np.ascontiguousarray(vectors, dtype=np.float32))
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

    def _graph_up(self, threads: int = 1) -> None:
        """Put the exact vectors in the graph once there are more than `GRAPH_FROM` (caller holds the lock)."""
        rows = self._rows
        if self._graphed or rows is None or rows.size <= GRAPH_FROM:
            return
        self._index.add(rows.keys[:rows.size], rows.matrix[:rows.size], threads=threads)
        self._graphed = True

    def _check(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.ndim,):
            raise ValueError(f"expected a vector of dimension {self.ndim}, got shape {vec.shape}")
        return vec

    @property
    def memory_usage(self) -> int:
        """Bytes used by the usearch graph and, for an ``f32`` index, the exact vectors beside it."""
        return int(self._index.memory_usage) + (self._rows.nbytes if self._rows is not None else 0)

    def __repr__(self) -> str:
        return (f"VectorIndex(ndim={self.ndim}, dtype={self.dtype!r}, search_dtype={self.search_dtype!r}, "
                f"size={len(self)})")

