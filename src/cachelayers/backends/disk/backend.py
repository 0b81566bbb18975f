"""`DiskBackend`: the storage contract on one SQLite file, through a writer lane and a reader lane."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import anyio.to_thread

from cachelayers.backends.base import Backend, BackendURL, ClearPrefixSupport, Clock, StoreItem
from cachelayers.backends.disk import database
from cachelayers.backends.disk.lanes import PATIENCE, Job, Lane, submit_and_wait
from cachelayers.durations import parse_duration, parse_size
from cachelayers.errors import BackendError, ConfigError

__all__ = ["DEFAULT_BUSY_TIMEOUT", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "ENTRY_OVERHEAD", "DiskBackend"]

T = TypeVar("T")

logger = logging.getLogger("cachelayers")

DEFAULT_MAX_BYTES: Final = 1024**3
DEFAULT_MAX_ENTRIES: Final = 1_000_000
DEFAULT_BUSY_TIMEOUT: Final = 10.0
ENTRY_OVERHEAD: Final = 64  # bytes charged per entry beyond key, tags and envelope: row and index bookkeeping
MAX_BATCH_JOBS: Final = 4096  # jobs per transaction (writes) or per snapshot (reads)
SMALL_PAGES_UP_TO: Final = 64 * 1024**2  # a new database for a bound up to this gets 1 KiB pages
WAL_LIMIT_MAX: Final = 4 * 1024 * 1024  # bytes of write-ahead log at most between two full checkpoints
CHECKPOINT_WAIT: Final = 0.5  # seconds a forced checkpoint waits for other processes' readers and writers
CHECKPOINT_RETRY: Final = (1.0, 32.0)  # seconds before a checkpoint that readers kept from finishing is tried again
_CHUNK: Final = 500  # keys per statement, well below SQLite's limit on bound parameters (999 before 3.32)
_ROWS: Final = 150  # rows per multi-row INSERT (5 parameters each)
_PREFIX_END: Final = "\U0010ffff"


def _directory(url: BackendURL) -> str:
    parts = urllib.parse.urlsplit(url.url)
    return urllib.parse.unquote(parts.netloc + parts.path)


def _charged(item: StoreItem) -> int:
    return len(item.blob) + len(item.key.encode()) + sum(len(t.encode()) for t in item.tags) + ENTRY_OVERHEAD


def _marks(count: int) -> str:
    return ",".join("?" * count)


class _Lookup:
    """A ``get_many`` for the reader lane, looked up together with the others queued next to it."""

    __slots__ = ("expired", "keys", "now")

    def __init__(self, keys: Sequence[str], now: float) -> None:
        self.keys = keys
        self.now = now
        self.expired: list[str] = []


class _Store:
    """A ``set_many`` for the writer lane, with each entry's charged size, written together with its neighbours."""

    __slots__ = ("now", "rows")

    def __init__(self, rows: list[tuple[StoreItem, int]], now: float) -> None:
        self.rows = rows
        self.now = now


class _WriteBatch:
    """What the jobs of one write transaction share: the LRU tick of the running job, the clock for eviction."""

    __slots__ = ("evicted", "now", "tick")

    def __init__(self, tick: int) -> None:
        self.tick = tick
        self.now: float | None = None
        self.evicted = 0


class _Patience:
    """`DiskBackend.within`: the tier timeout its waits count progress against (see `lanes.wait_for`)."""

    __slots__ = ("seconds", "token")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        self.token = PATIENCE.set(self.seconds)

    def __exit__(self, *exc: object) -> None:
        PATIENCE.reset(self.token)


class DiskBackend(Backend, ClearPrefixSupport):
    """Persistent tier in a local directory, bounded in bytes and entries, LRU, shared by processes.

    URL: ``disk:///absolute/path?max_bytes=1GiB&max_entries=1000000`` (``disk://relative/path`` and
    ``disk://~/path`` work too). ``busy_timeout`` (default 10s) is how long a write waits for another
    process's write. Both bounds hold after every write: it evicts expired entries first, then the least
    recently used. An entry larger than ``max_bytes`` is not stored. The charged size of an entry is its
    envelope, key and tags plus a fixed overhead; the database file adds SQLite's own pages on top, and its
    write-ahead log is kept to a quarter of ``max_bytes`` (at least 256 KiB, at most 4 MiB) between checkpoints.

    Attributes:
        evictions: Entries this process evicted to keep the bounds.
        reopened: Times this process found its database file deleted or replaced and opened it again (each is
            logged once, as a warning on the ``cachelayers`` logger).
        checkpoints: Full checkpoints this process forced because the log passed its limit.
    """

    schemes = ("disk",)
    options = frozenset({"max_bytes", "max_entries", "busy_timeout"})

    def __init__(self, url: BackendURL | str, *, clock: Clock = time.time) -> None:
        parsed = BackendURL.parse(url) if isinstance(url, str) else url
        super().__init__(parsed, clock=clock)
        self.validate_url(parsed)
        opts = parsed.options
        self.directory = Path(os.path.expanduser(_directory(parsed)))
        self.max_bytes = parse_size(opts.get("max_bytes", DEFAULT_MAX_BYTES), parsed.option_field("max_bytes"))
        self.max_entries = int(opts.get("max_entries", DEFAULT_MAX_ENTRIES))
        self.busy_timeout = (parse_duration(opts["busy_timeout"], parsed.option_field("busy_timeout"))
                             if "busy_timeout" in opts else DEFAULT_BUSY_TIMEOUT)
        self.evictions = 0
        self.reopened = 0
        self.checkpoints = 0
        self._checkpoint_retry = (0.0, 0, 0.0)  # after busy checkpoints: (time, log size) to wait for, the backoff
        # The log is truncated by a full checkpoint in the writer's thread, which holds up the writes queued
        # behind it: a 64 MiB checkpoint took 0.36 s, longer than a tier's timeout, so the limit stays a few MiB.
        wal_limit = min(max(self.max_bytes // 4, 256 * 1024), WAL_LIMIT_MAX)
        # Small bounds get small pages: SQLite's slack per page (and per page a write touches) then stays small
        # next to the bound, so the file and its log fit in twice the bound.
        page_size = 1024 if self.max_bytes <= SMALL_PAGES_UP_TO else 4096
        self._pragmas = database.Pragmas(self.busy_timeout, wal_limit, page_size)
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._open_lock = threading.Lock()
        self._file_id: tuple[int, int] | None = None
        self._generation = 0
        self._local = threading.local()
        self._reader = Lane("reader", self._read_batch, max_jobs=MAX_BATCH_JOBS, max_size=1 << 62)
        # A transaction's payload is kept well under the log's limit, so one batch cannot blow it.
        self._writer = Lane("writer", self._write_batch, max_jobs=MAX_BATCH_JOBS,
                            max_size=max(64 * 1024, wal_limit // 2))
        _LIVE.add(self)

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Check the path and the bounds."""
        super().validate_url(url)
        if not _directory(url).strip("/"):
            raise ConfigError(url.field, url.url, "needs a directory, e.g. disk:///var/cache/myapp?max_bytes=1GiB")
        if "max_bytes" in url.options and parse_size(url.options["max_bytes"], url.option_field("max_bytes")) <= 0:
            raise ConfigError(url.option_field("max_bytes"), url.options["max_bytes"], "must be positive")
        raw = url.options.get("max_entries")
        if raw is not None and (not raw.isdecimal() or int(raw) <= 0):
            raise ConfigError(url.option_field("max_entries"), raw, "must be a positive integer")
        if "busy_timeout" in url.options:
            parse_duration(url.options["busy_timeout"], url.option_field("busy_timeout"))

    # -- the database file --------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self.directory / database.FILENAME

    def _connection(self, lane: Lane) -> sqlite3.Connection:
        """``lane``'s connection to the file the path names now (opened again if the file was replaced)."""
        if self._file_id is None or database.identity(self.path) != self._file_id:
            self._open_file(lane)
        if lane.db is None or lane.generation != self._generation:
            generation = self._generation
            lane.close_db()
            lane.db = database.connect(self.path, self._pragmas)
            lane.generation = generation
        self._local.db = lane.db
        return lane.db

    def _open_file(self, lane: Lane) -> None:
        """Open (creating if need be) the file at the path, for ``lane`` now and the other lane next time."""
        with self._open_lock:
            if self._file_id is not None and database.identity(self.path) == self._file_id:
                return  # the other lane just did it
            db, found = database.create(self.path, self._pragmas)
            had, self._file_id = self._file_id, found
            self._generation += 1
            lane.close_db()
            lane.db, lane.generation = db, self._generation
            if had is not None:
                self.reopened += 1
                logger.warning("disk tier %s: the database file was deleted or replaced while open; opened the "
                               "file now at that path (reopened %d times)", self.path, self.reopened)

    def _forget_after_fork(self) -> None:
        self._open_lock = threading.Lock()
        self._local = threading.local()
        self._file_id = None
        self._reader.forget()
        self._writer.forget()

    # -- the lanes ----------------------------------------------------------------------------------------

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the current lane's connection; SQLite errors become `BackendError` naming the file."""
        try:
            return fn(self._local.db)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        return BackendError(f"{self.path}: {type(exc).__name__}: {exc}")

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read ``fn(connection)`` in the reader lane."""
        result: T = await submit_and_wait(self._reader, fn)
        return result

    def _read_batch(self, lane: Lane, jobs: list[Job]) -> None:
        """Answer every queued read from one snapshot, then queue the LRU marks of what was found.

        The lookups of all queued ``get_many`` calls are merged into one ``SELECT`` per 500 keys: in this
        thread every statement gives up the GIL, and getting it back from a busy event loop is what costs.
        """
        lookups = [job for job in jobs if isinstance(job.work, _Lookup)]
        try:
            db = self._connection(lane)
            db.execute("BEGIN")
            try:
                if lookups:
                    self._run(partial(self._look_up, lookups))
                for job in jobs:
                    if not isinstance(job.work, _Lookup):
                        try:
                            job.result = self._run(job.work)
                        except Exception as exc:
                            job.error = exc
            finally:
                db.execute("COMMIT")
        except Exception as exc:
            error = self._error(exc)
            for job in jobs:
                job.error = job.error or error
            lane.close_db()
            return
        hits = [key for job in lookups for key in job.result]
        expired = [(key, job.work.now) for job in lookups for key in job.work.expired]
        if hits or expired:  # queued before the readers wake, so their next write sees these marks
            self._writer.submit(Job(partial(self._mark_used, hits, expired)))

    def _look_up(self, jobs: list[Job], db: sqlite3.Connection) -> None:
        rows: dict[str, tuple[bytes, float | None]] = {}
        keys = list(dict.fromkeys(key for job in jobs for key in job.work.keys))
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            for key, blob, expires_at in db.execute(
                    f"SELECT key, blob, expires_at FROM entries WHERE key IN ({_marks(len(chunk))})", chunk):
                rows[key] = (blob, expires_at)
        for job in jobs:
            lookup: _Lookup = job.work
            found: dict[str, bytes] = {}
            for key in lookup.keys:
                row = rows.get(key)
                if row is None:
                    continue
                if row[1] is not None and row[1] <= lookup.now:
                    lookup.expired.append(key)
                else:
                    found[key] = row[0]
            job.result = found

    def _write_batch(self, lane: Lane, jobs: list[Job]) -> None:
        """Run every queued write in one transaction, evict once, commit, then tidy the file.

        If a job fails on its own (anything but an SQLite error, which every job would share), the others must
        not pay for it: the batch is rolled back and each job runs again in its own transaction.
        """
        try:
            db = self._connection(lane)
            with contextlib.suppress(sqlite3.Error):  # busy: the transaction goes first, the next batch tries again
                self._checkpoint(db)
            evicted = self._run(partial(self._transaction, jobs))
        except sqlite3.Error as exc:
            self._fail(lane, jobs, exc)
            return
        except BackendError as exc:
            self._fail(lane, jobs, exc)
            return
        except Exception:
            evicted = 0
            for job in jobs:
                try:
                    evicted += self._run(partial(self._transaction, [job]))
                except Exception as exc:
                    job.error = self._error(exc) if isinstance(exc, sqlite3.Error) else exc
        self.evictions += evicted
        try:
            self._vacuum(db)
            self._checkpoint(db)
        except sqlite3.Error:  # busy: the next batch tries again
            pass

    def _fail(self, lane: Lane, jobs: list[Job], exc: Exception) -> None:
        error = self._error(exc)
        for job in jobs:  # nothing was committed
            job.error = error
        lane.close_db()

    def _transaction(self, jobs: list[Job], db: sqlite3.Connection) -> int:
        """One transaction for the writes of ``jobs``; return evictions.

        Writers of every process queue on the lock file before they take SQLite's write lock: the kernel hands
        the file to the next waiter when it is released, where SQLite's busy handler polls with sleeps of up to
        100 ms, and a process could wait seconds while the others took turns (four processes writing flat out:
        3-4 % of writes waited past a 250 ms tier timeout). That wait is marked `Lane.locked_out`: it is the one
        a tier timeout ends.
        """
        with self._write_turn():
            with self._writer.locked_out():  # another program's connection may hold SQLite's lock all the same
                db.execute("BEGIN IMMEDIATE")
            evicted = self._write_jobs(jobs, db)
        return evicted

    @contextlib.contextmanager
    def _write_turn(self) -> Iterator[None]:
        """Hold the lock file: this process's turn to write or checkpoint. Waiting for it is `Lane.locked_out`."""
        with contextlib.ExitStack() as held:
            with self._writer.locked_out():
                held.enter_context(database.locked(self._lock_path))
            yield

    def _write_jobs(self, jobs: list[Job], db: sqlite3.Connection) -> int:
        """The writes of ``jobs`` in order, one LRU tick each, consecutive stores merged; commit; return evictions."""
        try:
            db.execute("UPDATE meta SET value = value + ? WHERE name = 'tick'", (len(jobs),))
            (tick,) = db.execute("SELECT value FROM meta WHERE name = 'tick'").fetchone()
            batch = _WriteBatch(int(tick) - len(jobs))
            stores: list[tuple[_Store, int]] = []
            for job in jobs:
                batch.tick += 1
                if isinstance(job.work, _Store):
                    stores.append((job.work, batch.tick))
                    continue
                self._store(db, stores, batch)
                stores = []
                job.work(db, batch)
            self._store(db, stores, batch)
            if batch.now is not None:
                self._evict(db, batch)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return batch.evicted

    async def _write(self, work: Callable[[sqlite3.Connection, _WriteBatch], None] | _Store, size: int = 0) -> None:
        """Queue ``work`` for the writer lane and wait until its transaction committed."""
        await submit_and_wait(self._writer, work, size)

    # -- the storage contract -----------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the live entries under ``keys`` and mark them used; expired ones are deleted."""
        if not keys:
            return []
        found: dict[str, bytes] = await submit_and_wait(self._reader, _Lookup(keys, self.clock()))
        return [found.get(key) for key in keys]

    def _mark_used(self, hits: list[str], expired: list[tuple[str, float]], db: sqlite3.Connection,
                   batch: _WriteBatch) -> None:
        unique = list(dict.fromkeys(hits))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start:start + _CHUNK]
            db.execute(f"UPDATE entries SET used = ? WHERE key IN ({_marks(len(chunk))})", [batch.tick, *chunk])
        if expired:  # unless written again since: expired at the earliest of the reads
            keys = list(dict.fromkeys(key for key, _ in expired))
            now = min(now for _, now in expired)
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                db.execute(f"DELETE FROM entries WHERE key IN ({_marks(len(chunk))}) AND expires_at <= ?",
                           [*chunk, now])

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store the entries with their tags; once the transaction's writes are in, evict until both bounds hold."""
        if not items:
            return
        store = _Store([(item, _charged(item)) for item in items], self.clock())
        await self._write(store, sum(len(item.blob) for item in items))

    def _store(self, db: sqlite3.Connection, stores: list[tuple[_Store, int]], batch: _WriteBatch) -> None:
        """Write consecutive ``set_many`` calls together: a few multi-row statements instead of a few per entry.

        Per key the last write wins (as if they ran one by one): an expired entry or one larger than the bound
        deletes the key.
        """
        if not stores:
            return
        last: dict[str, tuple[StoreItem, int, int] | None] = {}
        for store, tick in stores:
            for item, size in store.rows:
                expired = item.expires_at is not None and item.expires_at <= store.now
                last.pop(item.key, None)  # keep the order of the last writes
                last[item.key] = None if expired or size > self.max_bytes else (item, size, tick)
            batch.now = store.now
        dropped = [key for key, row in last.items() if row is None]
        rows = [row for row in last.values() if row is not None]
        for start in range(0, len(dropped), _CHUNK):
            chunk = dropped[start:start + _CHUNK]
            db.execute(f"DELETE FROM entries WHERE key IN ({_marks(len(chunk))})", chunk)
        for start in range(0, len(rows), _ROWS):
            chunk_rows = rows[start:start + _ROWS]
            db.execute("INSERT INTO entries (key, blob, expires_at, size, used) VALUES "
                       + ",".join(["(?, ?, ?, ?, ?)"] * len(chunk_rows))
                       + " ON CONFLICT (key) DO UPDATE SET blob = excluded.blob, expires_at = excluded.expires_at, "
                       "size = excluded.size, used = excluded.used",
                       [value for item, size, tick in chunk_rows
                        for value in (item.key, item.blob, item.expires_at, size, tick)])
        keys = [item.key for item, _, _ in rows]
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            db.execute(f"DELETE FROM tags WHERE key IN ({_marks(len(chunk))})", chunk)
        tags = [(tag, item.key) for item, _, _ in rows for tag in dict.fromkeys(item.tags)]
        for start in range(0, len(tags), _ROWS):
            chunk_tags = tags[start:start + _ROWS]
            db.execute("INSERT OR IGNORE INTO tags (tag, key) VALUES " + ",".join(["(?, ?)"] * len(chunk_tags)),
                       [value for pair in chunk_tags for value in pair])

    def _evict(self, db: sqlite3.Connection, batch: _WriteBatch) -> None:
        # Expired entries go first (a few on every write, so they never pile up), then least recently used.
        db.execute("DELETE FROM entries WHERE key IN "
                   "(SELECT key FROM entries WHERE expires_at <= ? ORDER BY expires_at LIMIT 64)", (batch.now,))
        while True:
            size, count = (row[0] for row in db.execute(
                "SELECT value FROM meta WHERE name IN ('bytes', 'entries') ORDER BY name"))
            if size <= self.max_bytes and count <= self.max_entries:
                return
            excess = max(1, count - self.max_entries, min(256, count // 64))
            cursor = db.execute("DELETE FROM entries WHERE key IN "
                                "(SELECT key FROM entries ORDER BY used, rowid LIMIT ?)", (excess,))
            batch.evicted += cursor.rowcount
            if cursor.rowcount <= 0:
                return

    def _vacuum(self, db: sqlite3.Connection) -> None:
        # Give freed pages back to the filesystem once they add up to a quarter of the bound, so the file tracks
        # the byte bound rather than the most it ever held.
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (page,) = db.execute("PRAGMA page_size").fetchone()
        if free * page > max(self.max_bytes // 4, 64 * page):
            db.execute("PRAGMA incremental_vacuum")

    def _wal_size(self) -> int:
        try:
            return os.stat(self._wal_path).st_size
        except FileNotFoundError:
            return 0

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """Past its limit, copy the whole log into the database and truncate it: one process at a time.

        Automatic checkpoints never shrink the log while another process reads from it, so with several busy
        processes it grew without bound (hundreds of MB for a 1 MiB bound). A ``TRUNCATE`` checkpoint blocks
        writers and waits (up to `CHECKPOINT_WAIT`) for readers to leave the log. It takes the lock file, as every
        transaction does: one writer checkpoints, the others wait for it and then find the log short, instead of
        growing it while the checkpoint waits for the write lock. If readers stay longer, the checkpoint is tried
        again once the log has doubled or after a backoff (`CHECKPOINT_RETRY`: one second, doubling to 32), not
        on every write: a reader that kept its snapshot open cost each write half a second.
        """
        size, limit = self._wal_size(), self._pragmas.wal_limit
        if size <= limit:
            return
        retry_at, retry_size, backoff = self._checkpoint_retry
        if time.monotonic() < retry_at and size < retry_size:
            return
        with self._write_turn():
            size = self._wal_size()
            if size <= limit:  # another process just did it
                return
            if self._truncate_wal(db):
                backoff = min(max(CHECKPOINT_RETRY[0], 2 * backoff), CHECKPOINT_RETRY[1])
                self._checkpoint_retry = (time.monotonic() + backoff, 2 * size, backoff)
            else:
                self._checkpoint_retry = (0.0, 0, 0.0)

    def _truncate_wal(self, db: sqlite3.Connection) -> bool:
        """Copy the log into the database and truncate it; return whether readers kept it from finishing."""
        db.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT * 1000)}")
        try:
            (busy, _, _) = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if not busy:
            self.checkpoints += 1
        return bool(busy)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the keys."""
        if not keys:
            return

        def op(db: sqlite3.Connection, batch: _WriteBatch) -> None:
            for start in range(0, len(keys), _CHUNK):
                chunk = list(keys[start:start + _CHUNK])
                db.execute(f"DELETE FROM entries WHERE key IN ({_marks(len(chunk))})", chunk)

        await self._write(op)

    async def delete_tags(self, tags: Sequence[str]) -> None:
        """Remove every entry recorded under any of the tags."""
        if not tags:
            return
        unique = list(dict.fromkeys(tags))

        def op(db: sqlite3.Connection, batch: _WriteBatch) -> None:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start:start + _CHUNK]
                db.execute("DELETE FROM entries WHERE key IN "
                           f"(SELECT key FROM tags WHERE tag IN ({_marks(len(chunk))}))", chunk)

        await self._write(op)

    async def clear_prefix(self, prefix: str) -> None:
        """Remove every entry whose key starts with ``prefix``."""

        def op(db: sqlite3.Connection, batch: _WriteBatch) -> None:
            db.execute("DELETE FROM entries WHERE key >= ? AND key < ?", (prefix, prefix + _PREFIX_END))

        await self._write(op)

    async def clear(self) -> None:
        """Remove every entry."""

        def op(db: sqlite3.Connection, batch: _WriteBatch) -> None:
            db.execute("DELETE FROM tags")
            db.execute("DELETE FROM entries")

        await self._write(op)

    def within(self, seconds: float) -> _Patience:
        """Bound the operations run inside: `TimeoutError` once a write has waited ``seconds`` for another
        process's write lock, or a lane went eight times ``seconds`` without finishing a batch or using CPU (a
        stalled disk); `BackendBusyError` (skipped, not a failure) once an operation waited eight times
        ``seconds`` behind other callers."""
        return _Patience(seconds)

    # -- introspection ------------------------------------------------------------------------------------

    async def usage(self) -> tuple[int, int]:
        """Return ``(entries, charged bytes)`` as every process sees them."""

        def op(db: sqlite3.Connection) -> tuple[int, int]:
            rows = dict(db.execute("SELECT name, value FROM meta WHERE name IN ('bytes', 'entries')").fetchall())
            return int(rows["entries"]), int(rows["bytes"])

        return await self._call(op)

    async def aclose(self) -> None:
        """Finish the queued work, end the lanes' threads and close their connections."""

        def stop() -> None:
            for lane in (self._reader, self._writer):  # the reader first: its last batch may queue LRU marks
                thread = lane.stop()
                if thread is not None:
                    thread.join()
                lane.stopped()

        await anyio.to_thread.run_sync(stop)


_LIVE: Final[weakref.WeakSet[DiskBackend]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_LIVE):
        backend._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
