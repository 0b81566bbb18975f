"""The files of the disk store: a SQLite file of entries (the truth) and atomic snapshots of the graphs.

``<name>.sqlite`` holds one row per entry (partition, text, sealed row, sealed payload, expiry and a sequence
number never reused; see `cachelayers.backends.vectors.sealing`) and the file's identity: a random id made with
the file and the highest sequence number it ever stored, which a clear keeps (`PayloadFile.file_id`,
`PayloadFile.max_seq`); ``<name>.usearch`` a sealed snapshot of every partition's graph with the ``(key, seq)``
of each vector. On load `cachelayers.backends.vectors.disk_store.DiskStore` trusts the rows that pass their
check: a vector whose ``(key, seq)`` has no such row is dropped, a row missing from the snapshot is added from
its sealed vector, and a snapshot that fails its check is not used at all (the graphs are built from the rows).

A directory serves one process: `hold_directory` takes an exclusive ``flock`` on ``cachelayers-semantic.lock``
in it for as long as a store of the process has files there, and refuses when another process holds it. A
SQLite file that SQLite reports as corrupt is moved aside (`move_aside`) rather than failing every call.

Files are created readable by their owner only (0600; SQLite gives its ``-wal`` and ``-shm`` files the mode
of the database), directories 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np

from cachelayers.backends.vectors.index import atomic_write
from cachelayers.codec import Codec
from cachelayers.errors import BackendError, SerializationError

__all__ = ["LOCK_NAME", "EntryRow", "PartitionSnapshot", "PayloadFile", "hold_directory", "is_corrupt", "move_aside",
           "private_directory", "private_file", "read_snapshot", "release_directory", "write_snapshot"]

_MAGIC: Final = b"CLSEMIX1"
_LENGTH: Final = struct.Struct("<Q")
LOCK_NAME: Final = "cachelayers-semantic.lock"
_CORRUPT: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


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


class _Hold:
    """This process's lock on one directory: the open lock file and the stores (file names) using it."""

    __slots__ = ("fd", "names")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.names: set[str] = set()


_holds: dict[str, _Hold] = {}
_holds_lock = threading.Lock()


def hold_directory(directory: Path, name: str) -> None:
    """Take this process's exclusive lock on ``directory`` for the store whose files are named ``name``.

    The lock is a ``flock`` on `LOCK_NAME`, taken without waiting and held until the last store of the process
    in the directory calls `release_directory` (or the process ends).

    Raises:
        BackendError: Another process holds the directory, or a store of this process has the files ``name``
            open already.
        OSError: The directory or the lock file cannot be created.
    """
    private_directory(directory)
    where = os.path.realpath(directory)
    with _holds_lock:
        held = _holds.get(where)
        if held is None:
            held = _holds[where] = _Hold(_lock(directory / LOCK_NAME))
        elif name in held.names:
            raise BackendError(f"the semantic store {name} in {directory} is open already in this process (two "
                               "functions with one name?): close the other one first (await fn.aclose())")
        held.names.add(name)


def release_directory(directory: Path, name: str) -> None:
    """Undo `hold_directory` (nothing if not held); the lock goes with the process's last store there."""
    where = os.path.realpath(directory)
    with _holds_lock:
        held = _holds.get(where)
        if held is None or name not in held.names:
            return
        held.names.discard(name)
        if not held.names:
            del _holds[where]
            os.close(held.fd)  # releases the lock


if sys.platform != "win32":
    import fcntl

    def _lock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise BackendError(
                f"the semantic store directory {path.parent} is in use by another process (pid {holder}): a "
                "usearch:// directory serves one process; give each process its own directory, or share the "
                "entries between processes with redis://") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of the process refused
        return fd

    def _forget_inherited_holds() -> None:
        """After a fork: the parent's locks are not the child's. Closing the inherited descriptors keeps the
        parent's lock (it holds its own) and lets the child lock the directory once the parent lets go."""
        for held in _holds.values():
            os.close(held.fd)
        _holds.clear()

    os.register_at_fork(after_in_child=_forget_inherited_holds)
else:  # pragma: no cover - no flock on Windows, where an open database file cannot be opened twice anyway

    def _lock(path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file is damaged or is not a database (not busy, full or unreadable)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT


def move_aside(path: Path) -> Path:
    """Rename the SQLite file ``path`` and its ``-wal`` and ``-shm`` files to ``<path>.corrupt-<time>`` (the
    log and index follow, so the copy opens as it was); return the new path of the file."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}.{time.time_ns() // 1000 % 10**6:06d}"
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path.with_name(path.name + suffix), target.with_name(target.name + suffix))
    return target


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

    Its ``identity`` table holds `file_id`, random and made with the file (an existing file without one gets
    one), and the highest sequence number ever written to it: the store binds every sealed part to the id, so
    that nothing of another file (one deleted since, under the same name) passes a check in this one, and
    numbers entries after `max_seq`, which `clear` does not lower.

    Args:
        path: The ``.sqlite`` file; created with its directory when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        private_directory(self.path.parent)
        private_file(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            # WAL with synchronous=NORMAL: a commit survives a killed process (the WAL is in the OS's hands);
            # only a power cut can lose the last commits, and then rows and snapshot are reconciled on load.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS entries (key INTEGER PRIMARY KEY, seq INTEGER NOT NULL, "
                "partition BLOB NOT NULL, text TEXT NOT NULL, expires_at REAL, vector BLOB NOT NULL, "
                "value BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS identity (id INTEGER PRIMARY KEY CHECK (id = 1), "
                             "file TEXT NOT NULL, last_seq INTEGER NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO identity (id, file, last_seq) "
                             "SELECT 1, ?, COALESCE(MAX(seq), 0) FROM entries", (secrets.token_hex(16),))
            found = self._db.execute("SELECT file FROM identity WHERE id = 1").fetchone()
            self.file_id: str = str(found[0])  # see the class docstring
        except BaseException:
            self._db.close()
            raise

    def check(self) -> None:
        """Check every page of the file (SQLite's ``quick_check``).

        Raises:
            sqlite3.DatabaseError: The file is damaged (`is_corrupt` holds for it).
        """
        with self._lock:
            found = [str(r[0]) for r in self._db.execute("PRAGMA quick_check").fetchall()]
        if found != ["ok"]:
            exc = sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(found)[:200]}")
            exc.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            raise exc

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
                    self._db.execute("UPDATE identity SET last_seq = MAX(CAST(last_seq AS INTEGER), ?) WHERE id = 1",
                                     (row.seq,))
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
        """The highest sequence number ever stored in the file, also of entries deleted or cleared since (0 for
        none)."""
        with self._lock:
            found = self._db.execute(
                "SELECT MAX(COALESCE((SELECT MAX(seq) FROM entries), 0), "
                "COALESCE((SELECT CAST(last_seq AS INTEGER) FROM identity WHERE id = 1), 0))").fetchone()
        return int(found[0] or 0)

    def clear(self) -> None:
        """Delete every entry (the file's identity and highest sequence number stay)."""
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
