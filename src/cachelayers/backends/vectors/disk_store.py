"""The ``usearch:///dir`` scheme: entries in a SQLite file, the graphs in atomic snapshots beside it.

The file of rows is the truth; the snapshot only saves rebuilding the graphs on start, and is reconciled
with the rows when loaded (see `cachelayers.backends.vectors.disk_files`). Every row is sealed with its
partition, text, vector and expiry, bound to the store (its namespace, embedder and the file's random id), its
key and its sequence number — never reused in one file, not even after a clear — and checked before it is
findable (see `cachelayers.backends.vectors.sealing`). Its payload is bound to the same and to its partition
and text, so that no payload passes for another entry's, of this file or another; the snapshot is sealed too.

A directory serves one process (`cachelayers.backends.vectors.disk_files.hold_directory`): a store that finds
it held by another process does not open. A file SQLite reports as damaged is moved aside and the store
goes on empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import numpy as np

from cachelayers.backends.base import BackendURL
from cachelayers.backends.vectors.base import GONE, Appended, EntryRef, Loaded, Replica, StoredRow
from cachelayers.backends.vectors.disk_files import (
    EntryRow,
    PartitionSnapshot,
    PayloadFile,
    hold_directory,
    is_corrupt,
    move_aside,
    private_directory,
    read_snapshot,
    release_directory,
    write_snapshot,
)
from cachelayers.backends.vectors.index import VectorIndex
from cachelayers.backends.vectors.options import IndexOptions, int_option
from cachelayers.backends.vectors.sealing import open_row, seal_row
from cachelayers.codec import Codec
from cachelayers.errors import IntegrityError, SerializationError
from cachelayers.metrics import StateLog
from cachelayers.workers import start_worker

__all__ = ["DiskStore"]

# 3: rows and payloads bound to the store and the file's id, payloads to their partition and text too, and the
# highest sequence number kept across clears; files of an older format are emptied
_ROW_FORMAT = "3"
_SAME_VECTOR: Final = 0.999  # cosine above which a snapshot's quantized vector is the row's (f32: equal)
_INHERITED: list[PayloadFile] = []  # files a forked child got from its parent: never used nor closed there

T = TypeVar("T")


class DiskStore:
    """A `VectorPersistence` in a directory: ``<name>.sqlite`` (the rows) and ``<name>.usearch`` (snapshots).

    The directory belongs to one process while a store is open in it (see the module docstring).

    Args:
        url: The ``usearch:///dir`` URL; its option ``save_every`` (writes between snapshots, 1000).
        namespace: The function's namespace (names the files; every sealed part is bound to it).
        codec: Seals the values.
        log: Failure log.
        clock: Wall-clock time source for expiry.
    """

    shared = False

    def __init__(self, url: BackendURL, namespace: str, *, codec: Codec, log: StateLog,
                 clock: Callable[[], float]) -> None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", namespace)[-80:]
        digest = hashlib.blake2b(namespace.encode(), digest_size=6).hexdigest()
        self.namespace = namespace
        self.directory = Path(url.path)
        self.base = self.directory / f"{slug}-{digest}"
        self.save_every = int_option(url, "save_every") or 1000
        self.codec = codec
        self.log = log
        self.clock = clock
        self.embedder = ""
        self.options = IndexOptions()
        self._replica: Replica | None = None
        self._writes = 0
        self._file: Any = None
        self._held = False
        self._pid: int | None = None  # the process that opened the files
        self._stored_ndim: int | None = None  # the dimension the file's metadata names
        self._saving: threading.Thread | None = None
        self._save_lock = threading.Lock()

    def _path(self, suffix: str) -> Path:
        return self.base.parent / (self.base.name + suffix)

    def _binding(self, kind: str, *parts: object) -> str:
        """What a sealed part of kind ``kind`` is bound to: this store — its namespace, the open file's random
        id, the embedder — and ``parts`` (JSON, so that no two lists of parts give one binding)."""
        return f"sem{kind}:" + json.dumps([self.namespace, self._file.file_id, self.embedder, *parts])

    def _payload_binding(self, entry: EntryRef) -> str:
        """A payload is bound to its entry's key and sequence number (never reused in one file), partition and
        text: a payload moved to another row, another file or a file of another function fails its check."""
        digest = hashlib.blake2b(entry.text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return self._binding("val", entry.key, entry.seq, entry.partition.hex(), digest)

    def _row_binding(self, key: int, seq: int) -> str:
        return self._binding("row", key, seq)

    def _snapshot_binding(self) -> str:
        return self._binding("snap", self.base.name)

    def usable(self) -> bool:
        """Unless this process is a fork of the one that opened the files: they are the parent's."""
        return self._pid is None or self._pid == os.getpid()

    def _forked(self) -> bool:
        return self._pid is not None and self._pid != os.getpid()

    async def sync(self) -> None:
        """Nothing to do: one process writes the directory."""

    async def open(self, replica: Replica, embedder: str, ndim: int | None, options: IndexOptions) -> Loaded:
        """Take the directory (`hold_directory`) and load the entries and graphs saved for this function into
        ``replica``.

        Raises:
            BackendError: Another process holds the directory, or this process has these files open already.
        """
        self._replica = replica
        self.embedder = embedder
        self.options = options
        hold_directory(self.directory, self.base.name)  # never waits: a held directory fails at once
        self._held = True
        self._pid = os.getpid()
        return await anyio.to_thread.run_sync(self._load, replica, ndim)

    def _open_file(self, replica: Replica) -> dict[str, str]:
        private_directory(self.directory)
        for stale in self.directory.glob(f".{self.base.name}.usearch.*.tmp"):
            stale.unlink(missing_ok=True)  # a snapshot whose writer died before the rename
        try:
            self._file = PayloadFile(self._path(".sqlite"))
            self._file.check()
            meta: dict[str, str] = self._file.meta()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            self._set_aside(replica, exc)
            meta = {}
        if meta and meta.get("rows") != _ROW_FORMAT:
            self.log.failure(f"semantic store {self.base.name}", "stored entries have an older format: dropping them")
            self._file.clear()
            meta = {}
        if meta and (meta.get("embedder") != self.embedder or meta.get("dtype") != self.options.dtype):
            # Vectors of another embedder live in another space: never compare with them.
            self.log.failure(f"semantic store {self.base.name}",
                             f"stored entries were made by {meta.get('embedder')!r}/{meta.get('dtype')}; "
                             f"now {self.embedder!r}/{self.options.dtype}: dropping them")
            self._file.clear()
            meta = {}
        return meta

    def _set_aside(self, replica: Replica, exc: sqlite3.DatabaseError) -> None:
        """Move the damaged SQLite file aside (`move_aside`) and go on with an empty one; count and log it."""
        if self._file is not None:
            with contextlib.suppress(sqlite3.Error):
                self._file.close()
            self._file = None
        moved = move_aside(self._path(".sqlite"))
        self._file = PayloadFile(self._path(".sqlite"))
        self._stored_ndim = None
        replica.forget_all()
        replica.corrupt(1, f"semantic store file {self.base.name}",
                        IntegrityError(f"{exc}: moved to {moved.name}, the store starts empty"))

    def _on_file(self, op: Callable[[PayloadFile], T]) -> T:
        """``op(file)``; when SQLite reports the file damaged, it is set aside and ``op`` runs on an empty one."""
        try:
            return op(self._file)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc) or self._replica is None:
                raise
            self._set_aside(self._replica, exc)
        self._save_meta(self._replica.ndim)
        return op(self._file)

    def _save_meta(self, ndim: int | None) -> None:
        self._file.set_meta(self._meta(ndim))
        self._stored_ndim = ndim

    def _load(self, replica: Replica, ndim: int | None) -> Loaded:
        meta = self._open_file(replica)
        stored_ndim = int(meta["ndim"]) if meta.get("ndim") else None
        if ndim is None:
            ndim = stored_ndim
        elif stored_ndim is not None and stored_ndim != ndim:
            self.log.failure(f"semantic store {self.base.name}",
                             f"stored entries have dimension {stored_ndim}, the embedder's is {ndim}: dropping them")
            self._file.clear()
        snapshot = read_snapshot(self._path(".usearch"), self.codec, self._snapshot_binding())
        # New entries number after every one the snapshot names, even if its rows are gone: a snapshot never
        # vouches for a (key, seq) that was handed out again.
        last_seq = max(self._file.max_seq(), max((int(item.seqs.max()) for item in snapshot[1] if len(item.seqs)),
                                                 default=0) if snapshot is not None else 0)
        rows = self._live_rows(replica)
        if rows and ndim is None:
            ndim = len(rows[0].vector) // 4
        if ndim is not None:
            other = [r.key for r in rows if len(r.vector) != 4 * ndim]
            if other:  # written with another dimension (the metadata was lost): never compared
                self._file.delete(other)
                rows = [r for r in rows if len(r.vector) == 4 * ndim]
        graphs = self._graphs(rows, ndim, snapshot) if ndim is not None else {}
        replica.adopt([StoredRow(r.key, r.seq, r.partition, r.text, r.expires_at,
                                 np.frombuffer(r.vector, dtype=np.float32)) for r in rows], graphs)
        self._save_meta(ndim)
        return Loaded(ndim, last_seq)

    def _checked_rows(self, replica: Replica) -> list[EntryRow]:
        """Every row that passes its check, opened (``vector`` holds the float32 bytes); the others are deleted
        and counted (`Replica.corrupt`)."""
        out: list[EntryRow] = []
        bad: list[int] = []
        error: IntegrityError | None = None
        encrypted = self.codec.encrypted
        for row in self._file.rows():
            try:
                opened = open_row(self.codec, self._row_binding(row.key, row.seq), row.vector,
                                  partition=None if encrypted else row.partition,
                                  text=None if encrypted else row.text, expires_at=row.expires_at,
                                  check_expiry=True)
            except IntegrityError as exc:
                bad.append(row.key)
                error = exc
                continue
            out.append(EntryRow(row.key, row.seq, opened.partition, opened.text, opened.expires_at,
                                opened.vector.tobytes()))
        if bad:
            self._file.delete(bad)
            assert error is not None
            replica.corrupt(len(bad), f"semantic store {self.base.name}", error)
        return out

    def _live_rows(self, replica: Replica) -> list[EntryRow]:
        """The rows that pass their check and are not expired, one per partition and text (the newest: rows come
        in seq order)."""
        now = self.clock()
        rows = self._checked_rows(replica)
        expired = [r.key for r in rows if r.expires_at is not None and r.expires_at <= now]
        if expired:
            self._file.delete(expired)
        newest: dict[tuple[bytes, str], EntryRow] = {}
        stale: list[int] = []
        for row in rows:
            if row.expires_at is not None and row.expires_at <= now:
                continue
            previous = newest.get((row.partition, row.text))
            if previous is not None:  # two rows, same text: keep the newer
                stale.append(previous.key)
            newest[row.partition, row.text] = row
        if stale:
            self._file.delete(stale)
        return sorted(newest.values(), key=lambda r: r.seq)

    def _snapshot_graphs(self, rows: Sequence[EntryRow], ndim: int,
                         snapshot: tuple[dict[str, str], list[PartitionSnapshot]] | None) -> dict[bytes, VectorIndex]:
        graphs: dict[bytes, VectorIndex] = {}
        if snapshot is None or snapshot[0].get("embedder") != self.embedder:
            return graphs
        wanted = {(r.key, r.seq): r for r in rows}
        for item in snapshot[1]:
            try:
                index = VectorIndex.from_bytes(item.graph, dtype=self.options.dtype)
            except ValueError:
                continue
            if index.ndim != ndim:
                continue
            # A vector answers for the row with its key only if the row is the one it was saved for.
            outdated = [int(k) for k, s in zip(item.keys.tolist(), item.seqs.tolist(), strict=True)
                        if (int(k), int(s)) not in wanted]
            index.remove_many(outdated)
            present = set(index.keys().tolist())
            listed = {int(k): int(s) for k, s in zip(item.keys.tolist(), item.seqs.tolist(), strict=True)}
            index.remove_many(present - set(listed))  # a vector the snapshot does not vouch for
            index.remove_many(self._other_vectors(index, [wanted[k, listed[k]] for k in present & set(listed)
                                                          if (k, listed[k]) in wanted]))
            graphs[item.partition] = index
        return graphs

    def _other_vectors(self, index: VectorIndex, rows: Sequence[EntryRow]) -> list[int]:
        """The keys of ``rows`` whose vector in ``index`` is not the row's (the row is the truth)."""
        if not rows:
            return []
        held = index.get([r.key for r in rows])
        truth = np.stack([np.frombuffer(r.vector, dtype=np.float32) for r in rows])
        if index.dtype == "f32":
            same = np.all(held == truth, axis=1)
        else:
            held64, truth64 = held.astype(np.float64), truth.astype(np.float64)
            norms = np.linalg.norm(held64, axis=1) * np.linalg.norm(truth64, axis=1)
            same = np.einsum("ij,ij->i", held64, truth64) >= _SAME_VECTOR * np.where(norms > 0, norms, np.inf)
        return [r.key for r, ok in zip(rows, same.tolist(), strict=True) if not ok]

    def _graphs(self, rows: Sequence[EntryRow], ndim: int,
                snapshot: tuple[dict[str, str], list[PartitionSnapshot]] | None) -> dict[bytes, VectorIndex]:
        """Every partition's graph: the snapshot's, reconciled with the rows, else built from them."""
        graphs = self._snapshot_graphs(rows, ndim, snapshot)
        by_partition: dict[bytes, list[EntryRow]] = {}
        for row in rows:
            by_partition.setdefault(row.partition, []).append(row)
        out: dict[bytes, VectorIndex] = {}
        for partition, part_rows in by_partition.items():
            index = graphs.get(partition)
            if index is None:
                o = self.options
                index = VectorIndex(ndim, dtype=o.dtype, connectivity=o.connectivity,
                                    expansion_add=o.expansion_add, expansion_search=o.expansion_search)
            present = set(index.keys().tolist())
            missing = [r for r in part_rows if r.key not in present]
            if missing:
                index.add_many([r.key for r in missing],
                               np.stack([np.frombuffer(r.vector, dtype=np.float32) for r in missing]))
            out[partition] = index
        for partition in set(graphs) - set(by_partition):
            graphs[partition].clear()
        return out

    def _meta(self, ndim: int | None) -> dict[str, str]:
        return {"embedder": self.embedder, "dtype": self.options.dtype, "ndim": str(ndim or ""), "rows": _ROW_FORMAT}

    async def read(self, entry: EntryRef) -> Any:
        """Read and check the payload of ``entry`` from the SQLite file; `GONE` when it is not there."""
        blob = self._on_file(lambda file: file.value(entry.key, entry.seq))
        if blob is None:
            return GONE
        try:
            return self.codec.open(self._payload_binding(entry), blob).value
        except IntegrityError as exc:
            self._on_file(lambda file: file.delete([entry.key]))
            if self._replica is not None:
                self._replica.forget(entry.key)
                self._replica.corrupt(1, f"semantic store {self.base.name}", exc)
            return GONE
        except SerializationError as exc:
            self.log.failure(f"semantic store {self.base.name}", exc)
            return GONE

    async def append(self, entry: EntryRef, value: Any, vector: np.ndarray, evict: Sequence[EntryRef],
                     capacity: int) -> Appended:
        """Write the row of ``entry`` and delete the rows of ``evict``, in one transaction."""
        body = self.codec.pack_body(value)  # raises SerializationError before anything is written
        ndim = self._replica.ndim if self._replica is not None else None
        if ndim is not None and ndim != self._stored_ndim:
            self._on_file(lambda file: self._save_meta(ndim))
        removed = [e.key for e in evict]
        # Sealed for the file written: a damaged one set aside by `_on_file` is followed by one of another id.
        self._on_file(lambda file: file.write(self._sealed(entry, body, vector), removed))
        self._wrote(1 + len(evict))
        return Appended(entry.key, removed)

    def _sealed(self, entry: EntryRef, body: bytes, vector: np.ndarray) -> EntryRow:
        """The row of ``entry`` to write, sealed (``body`` from `Codec.pack_body`)."""
        blob = self.codec.seal_body(self._payload_binding(entry), body, entry.expires_at)
        sealed = seal_row(self.codec, self._row_binding(entry.key, entry.seq), entry.partition, entry.text, vector,
                          entry.expires_at)
        # With encryption the plain columns say nothing: the sealed row is the only place of partition and text.
        encrypted = self.codec.encrypted
        return EntryRow(entry.key, entry.seq, b"" if encrypted else entry.partition, "" if encrypted else entry.text,
                        entry.expires_at, sealed, blob)

    async def remove(self, entries: Sequence[EntryRef]) -> None:
        """Delete the rows of ``entries``."""
        self._on_file(lambda file: file.delete([e.key for e in entries]))
        self._wrote(len(entries))

    def _wrote(self, count: int) -> None:
        self._writes += count
        if self._writes >= self.save_every and (self._saving is None or not self._saving.is_alive()):
            self._writes = 0
            payload = self._snapshot()  # its binding too: taken here, where the file is not closed meanwhile
            # A worker the interpreter waits for at exit rather than killing usearch mid-write (None once exiting:
            # the snapshot is skipped, the rows are on disk and the graph is rebuilt from them on load).
            self._saving = start_worker(self._write_snapshot, *payload, name="cachelayers-snapshot")

    def _snapshot(self) -> tuple[list[PartitionSnapshot], dict[str, str], str]:
        assert self._replica is not None
        items = [PartitionSnapshot(g.partition, g.keys, g.seqs, g.graph.to_bytes()) for g in self._replica.graphs()]
        return items, self._meta(self._replica.ndim), self._snapshot_binding()

    def _write_snapshot(self, items: list[PartitionSnapshot], meta: dict[str, str], binding: str) -> None:
        with self._save_lock:
            try:
                write_snapshot(self._path(".usearch"), items, meta, self.codec, binding)
            except OSError as exc:
                self.log.failure(f"semantic snapshot {self.base.name}", exc)

    async def save(self) -> None:
        """Write a snapshot of every graph now (atomically) and wait for it."""
        if self._file is None or self._forked():
            return
        if self._saving is not None:
            await anyio.to_thread.run_sync(self._saving.join)
        items, meta, binding = self._snapshot()
        await anyio.to_thread.run_sync(self._write_snapshot, items, meta, binding)
        self._writes = 0

    async def clear(self) -> None:
        """Delete every row and write an empty snapshot."""
        if self._file is not None and not self._forked():
            self._on_file(lambda file: file.clear())
            self._save_meta(None)  # the next entry's dimension is the one to keep
            await self.save()

    async def aclose(self) -> None:
        """Close the file (the store saved a snapshot first) and let go of the directory."""
        if self._forked():  # the parent's connection and lock: closing them here could touch its files
            if self._file is not None:
                _INHERITED.append(self._file)
            self._file = None
            self._held = False
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._held:
            self._held = False
            release_directory(self.directory, self.base.name)
