"""The files of the disk store: a SQLite file of entries (the truth) and atomic snapshots of the graphs.

``<name>.sqlite`` holds one row per entry (partition, text, sealed row, sealed payload, expiry and a sequence
number never reused; see `cachelayers.backends.vectors.sealing`); ``<name>.usearch`` a sealed snapshot of
every partition's graph with the ``(key, seq)`` of each vector. On load
`cachelayers.backends.vectors.disk_store.DiskStore` trusts the rows that pass their check: a vector whose
``(key, seq)`` has no such row is dropped, a row missing from the snapshot is added from its sealed vector, and
a snapshot that fails its check is not used at all (the graphs are built from the rows).

Files are created readable by their owner only (0600; SQLite gives its ``-wal`` and ``-shm`` files the mode
of the database), directories 0700.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np

from cachelayers.backends.vectors.index import atomic_write
from cachelayers.codec import Codec
from cachelayers.errors import SerializationError

__all__ = ["EntryRow", "PartitionSnapshot", "PayloadFile", "private_directory", "private_file", "read_snapshot",
           "write_snapshot"]

_MAGIC: Final = b"CLSEMIX1"
_LENGTH: Final = struct.Struct("<Q")


def private_directory(path: Path) -> None:
    """Create ``path`` and its missing parents, the ones created with mode 0700 (an existing one is left)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (before SQLite opens it: SQLite would make it
    0644, and its ``-wal`` and ``-shm`` files take the database file's mode)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class EntryRow(NamedTuple):
    """One stored entry (``vector`` is the sealed row; ``value`` the sealed payload, ``None`` when not read)."""

    key: int
    seq: int
    partition: bytes
    text: str
    expires_at: float | None
    vector: bytes
    value: bytes | None = None


class PayloadFile:
    """The SQLite file of entries. Thread-safe; every method is one transaction.

    Args:
        path: The ``.sqlite`` file; created with its directory when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        private_directory(self.path.parent)
        private_file(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # WAL with synchronous=NORMAL: a commit survives a killed process (the WAL is in the OS's hands);
        # only a power cut can lose the last commits, and then rows and snapshot are reconciled on load.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key INTEGER PRIMARY KEY, seq INTEGER NOT NULL, "
            "partition BLOB NOT NULL, text TEXT NOT NULL, expires_at REAL, vector BLOB NOT NULL, "
            "value BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def meta(self) -> dict[str, str]:
        """The metadata stored with the entries (embedder, dimension, ...)."""
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        """Replace the metadata."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM meta")
                self._db.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", sorted(values.items()))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def write(self, row: EntryRow | None, delete: Sequence[int] = ()) -> None:
        """Store ``row`` (replacing its key) and delete the keys in ``delete``, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if delete:
                    self._db.executemany("DELETE FROM entries WHERE key = ?", [(int(k),) for k in delete])
                if row is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO entries (key, seq, partition, text, expires_at, vector, value) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (row.key, row.seq, row.partition, row.text, row.expires_at, row.vector, row.value))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def delete(self, keys: Sequence[int]) -> None:
        """Delete entries by key."""
        if keys:
            self.write(None, keys)

    def value(self, key: int, seq: int) -> bytes | None:
        """The sealed payload of entry ``key`` if it still has sequence number ``seq``."""
        with self._lock:
            found = self._db.execute("SELECT value FROM entries WHERE key = ? AND seq = ?", (key, seq)).fetchone()
        return None if found is None else bytes(found[0])

    def rows(self) -> Iterator[EntryRow]:
        """Every entry, without payloads."""
        with self._lock:
            fetched = self._db.execute(
                "SELECT key, seq, partition, text, expires_at, vector FROM entries ORDER BY seq").fetchall()
        for key, seq, partition, text, expires_at, vector in fetched:
            yield EntryRow(int(key), int(seq), bytes(partition), str(text), expires_at, bytes(vector))

    def max_seq(self) -> int:
        """The highest sequence number stored (0 when empty)."""
        with self._lock:
            found = self._db.execute("SELECT MAX(seq) FROM entries").fetchone()
        return int(found[0] or 0)

    def clear(self) -> None:
        """Delete every entry."""
        with self._lock:
            self._db.execute("DELETE FROM entries")

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


class PartitionSnapshot(NamedTuple):
    """One partition's graph in a snapshot: its vectors' keys and sequence numbers, and usearch's bytes."""

    partition: bytes
    keys: np.ndarray  # uint64
    seqs: np.ndarray  # uint64
    graph: bytes


def write_snapshot(path: str | Path, partitions: Sequence[PartitionSnapshot], meta: dict[str, str],
                   codec: Codec | None = None, binding: str = "") -> None:
    """Write every partition's graph to ``path`` atomically, sealed by ``codec`` (bound to ``binding``) if given."""
    header = {
        "meta": meta,
        "partitions": [{"partition": p.partition.hex(), "count": len(p.keys), "graph": len(p.graph)}
                       for p in partitions],
    }
    head = json.dumps(header, sort_keys=True).encode()
    chunks = [_MAGIC, _LENGTH.pack(len(head)), head]
    for p in partitions:
        chunks.append(np.ascontiguousarray(p.keys, dtype="<u8").tobytes())
        chunks.append(np.ascontiguousarray(p.seqs, dtype="<u8").tobytes())
        chunks.append(p.graph)
    data = b"".join(chunks)
    atomic_write(path, data if codec is None else codec.seal(binding, data, None))


def read_snapshot(path: str | Path, codec: Codec | None = None,
                  binding: str = "") -> tuple[dict[str, str], list[PartitionSnapshot]] | None:
    """Read a snapshot written by `write_snapshot` (with the same codec and binding); ``None`` when there is
    none, or it is unreadable or fails its check."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if codec is not None:
        try:
            data = codec.open(binding, data).value
        except SerializationError:
            return None
        if not isinstance(data, bytes):
            return None
    try:
        if not data.startswith(_MAGIC):
            return None
        offset = len(_MAGIC)
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        header = json.loads(data[offset:offset + size])
        offset += size
        partitions = []
        for item in header["partitions"]:
            count, graph_size = int(item["count"]), int(item["graph"])
            keys = np.frombuffer(data, dtype="<u8", count=count, offset=offset).astype(np.uint64)
            offset += 8 * count
            seqs = np.frombuffer(data, dtype="<u8", count=count, offset=offset).astype(np.uint64)
            offset += 8 * count
            graph = data[offset:offset + graph_size]
            if len(graph) != graph_size:
                return None
            offset += graph_size
            partitions.append(PartitionSnapshot(bytes.fromhex(item["partition"]), keys, seqs, graph))
        return {str(k): str(v) for k, v in header["meta"].items()}, partitions
    except (ValueError, KeyError, TypeError, struct.error):
        return None
