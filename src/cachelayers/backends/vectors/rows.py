"""The exact float32 vectors an ``f32`` `VectorIndex` keeps beside its compact graph, one row per key."""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = ["KEY", "ExactRows"]

KEY: Final = np.uint64
"""The key type of vector indexes."""


class ExactRows:
    """The exact float32 vectors of an ``f32`` index, one row per key; a removal moves the last row into its hole."""

    __slots__ = ("inverse", "keys", "matrix", "row_of", "size")

    def __init__(self, ndim: int) -> None:
        self.matrix = np.empty((0, ndim), dtype=np.float32)
        self.inverse = np.empty(0, dtype=np.float64)  # 1 / norm of each row (0 for a zero vector)
        self.keys = np.empty(0, dtype=KEY)
        self.row_of: dict[int, int] = {}
        self.size = 0

    def reserve(self, count: int) -> None:
        """Make room for ``count`` rows (at least doubling, so appends stay amortised O(1))."""
        if count <= len(self.matrix):
            return
        capacity = max(count, 2 * len(self.matrix), 16)
        for name in ("matrix", "inverse", "keys"):
            old = getattr(self, name)
            new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
            new[:self.size] = old[:self.size]
            setattr(self, name, new)

    def put_many(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors`` (float32 rows) under ``keys`` (unique), replacing what a key held."""
        rows = np.empty(len(keys), dtype=np.int64)
        self.reserve(self.size + len(keys))
        for i, key in enumerate(keys.tolist()):
            row = self.row_of.get(key)
            if row is None:
                row = self.row_of[key] = self.size
                self.keys[row] = key
                self.size += 1
            rows[i] = row
        self.matrix[rows] = vectors
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        self.inverse[rows] = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)

    def drop(self, key: int) -> None:
        """Forget ``key``'s row, if any."""
        row = self.row_of.pop(key, None)
        if row is None:
            return
        last = self.size - 1
        if row != last:
            moved = int(self.keys[last])
            self.matrix[row] = self.matrix[last]
            self.inverse[row] = self.inverse[last]
            self.keys[row] = moved
            self.row_of[moved] = row
        self.size = last

    def similarities(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Exact similarities (float64) of ``rows`` to ``query`` (float64), divided by the rows' norms."""
        out: np.ndarray = (self.matrix.take(rows, axis=0).astype(np.float64) @ query) * self.inverse.take(rows)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the key-to-row dict not counted)."""
        return int(self.matrix.nbytes + self.inverse.nbytes + self.keys.nbytes)
