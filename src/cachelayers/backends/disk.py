"""The disk tier: one SQLite database in WAL mode, shared safely by every process that opens the directory.

Why SQLite and not diskcache (or one file per key): the tier needs several tags per entry, an exact byte
bound that holds after every write, LRU eviction and absolute expiry, all consistent across processes. In
SQLite each of these is one transaction: an entry, its tags, the running byte and entry counts (kept by
triggers) and the evictions it causes commit together or not at all, so a crash or a concurrent process
never sees a half-written entry or a wrong total. WAL lets readers proceed while one process writes;
``busy_timeout`` makes writers queue instead of failing. diskcache keeps one tag per entry, counts its size
limit loosely (culling a few entries per write) and pickles by default; ``sqlite3`` ships with Python.

Blocking calls run in worker threads (`anyio.to_thread.run_sync`), so the tier works under asyncio and trio.
The database lives in ``<path>/cachelayers.sqlite3``; use a local filesystem (SQLite's locking is not
reliable on network filesystems).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

import anyio.to_thread

from cachelayers.backends.base import Backend, BackendURL, ClearPrefixSupport, Clock, StoreItem
from cachelayers.durations import parse_duration, parse_size
from cachelayers.errors import BackendError, ConfigError

__all__ = ["DiskBackend"]

T = TypeVar("T")

DEFAULT_MAX_BYTES: Final = 1024**3
DEFAULT_MAX_ENTRIES: Final = 1_000_000
DEFAULT_BUSY_TIMEOUT: Final = 10.0
FILENAME: Final = "cachelayers.sqlite3"
SCHEMA_VERSION: Final = 1
ENTRY_OVERHEAD: Final = 64  # bytes charged per entry beyond key, tags and envelope: row and index bookkeeping
_CHUNK: Final = 500  # keys per statement, well below SQLite's limit on bound parameters
_PREFIX_END: Final = "\U0010ffff"

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    f"INSERT OR IGNORE INTO meta VALUES ('schema', {SCHEMA_VERSION}), ('bytes', 0), ('entries', 0), ('tick', 0)",
    """CREATE TABLE IF NOT EXISTS entries (
        key TEXT PRIMARY KEY,
        blob BLOB NOT NULL,
        expires_at REAL,
        size INTEGER NOT NULL,
        used INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entries_used ON entries (used)",
    "CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tag, key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS tags_key ON tags (key)",
    # The running totals live in `meta` and are kept by triggers, so they commit with the rows they count.
    """CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
        UPDATE meta SET value = value + NEW.size WHERE name = 'bytes';
        UPDATE meta SET value = value + 1 WHERE name = 'entries';
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_update AFTER UPDATE OF size ON entries BEGIN
        UPDATE meta SET value = value - OLD.size + NEW.size WHERE name = 'bytes';
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
        UPDATE meta SET value = value - OLD.size WHERE name = 'bytes';
        UPDATE meta SET value = value - 1 WHERE name = 'entries';
        DELETE FROM tags WHERE key = OLD.key;
    END""",
)


def _directory(url: BackendURL) -> str:
    parts = urllib.parse.urlsplit(url.url)
    return urllib.parse.unquote(parts.netloc + parts.path)


class DiskBackend(Backend, ClearPrefixSupport):
    """Persistent tier in a local directory, bounded in bytes and entries, LRU, shared by processes.

    URL: ``disk:///absolute/path?max_bytes=1GiB&max_entries=1000000`` (``disk://relative/path`` and
    ``disk://~/path`` work too). ``busy_timeout`` (default 10s) is how long a write waits for another
    process's write. Both bounds hold after every write: it evicts expired entries first, then the least
    recently used. An entry larger than ``max_bytes`` is not stored. The charged size of an entry is its
    envelope, key and tags plus a fixed overhead; the database file adds SQLite's own pages on top.
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
        self._wal_limit = min(max(self.max_bytes // 4, 256 * 1024), 64 * 1024 * 1024)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Check the path and the bounds."""
        super().validate_url(url)
        if not _directory(url).strip("/"):
            raise ConfigError(url.field, url.url, "needs a directory, e.g. disk:///var/cache/myapp?max_bytes=1GiB")
        if "max_bytes" in url.options and parse_size(url.options["max_bytes"], url.option_field("max_bytes")) <= 0:
            raise ConfigError(url.option_field("max_bytes"), url.options["max_bytes"], "must be positive")
        raw = url.options.get("max_entries")
        if raw is not None and (not raw.isdigit() or int(raw) <= 0):
            raise ConfigError(url.option_field("max_entries"), raw, "must be a positive integer")
        if "busy_timeout" in url.options:
            parse_duration(url.options["busy_timeout"], url.option_field("busy_timeout"))

    # -- the database -------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self.directory / FILENAME

    def _connect(self) -> sqlite3.Connection:
        db = self._db
        if db is not None:
            return db
        self.directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Only takes effect on a new database (before the first table), which is when it matters.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL never corrupts the database; a power loss may lose the last commits, which for
            # a cache is a few misses.
            db.execute("PRAGMA synchronous = NORMAL")
            # Checkpoint the WAL often enough that it stays small next to the bound, and cut the file back after
            # a checkpoint instead of leaving it at its peak.
            (page,) = db.execute("PRAGMA page_size").fetchone()
            db.execute(f"PRAGMA wal_autocheckpoint = {max(100, min(1000, self._wal_limit // page))}")
            db.execute(f"PRAGMA journal_size_limit = {self._wal_limit}")

            def create() -> int:
                for statement in _SCHEMA:
                    db.execute(statement)
                return int(db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0])

            version = self._write(db, create)
            if version != SCHEMA_VERSION:
                raise BackendError(f"{self.path} has schema {version}, this version reads {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._connect())
            except sqlite3.Error as exc:
                raise BackendError(f"{self.path}: {type(exc).__name__}: {exc}") from exc

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # abandon_on_cancel: a tier timeout returns to the caller at once; the statement finishes in its thread.
        return await anyio.to_thread.run_sync(self._run, fn, abandon_on_cancel=True)

    @staticmethod
    def _write(db: sqlite3.Connection, body: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    @staticmethod
    def _tick(db: sqlite3.Connection) -> int:
        """A counter shared by every process, for LRU order that survives restarts and ignores clock skew."""
        db.execute("UPDATE meta SET value = value + 1 WHERE name = 'tick'")
        return int(db.execute("SELECT value FROM meta WHERE name = 'tick'").fetchone()[0])

    # -- the storage contract -----------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the live entries under ``keys`` and mark them used; expired ones are deleted."""
        if not keys:
            return []
        now = self.clock()

        def op(db: sqlite3.Connection) -> list[bytes | None]:
            found: dict[str, bytes] = {}
            expired: list[str] = []
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, blob, expires_at in db.execute(
                        f"SELECT key, blob, expires_at FROM entries WHERE key IN ({marks})", chunk):
                    if expires_at is not None and expires_at <= now:
                        expired.append(key)
                    else:
                        found[key] = bytes(blob)
            if found or expired:
                def touch() -> None:
                    tick = self._tick(db)
                    hits = list(found)
                    for start in range(0, len(hits), _CHUNK):
                        chunk = hits[start:start + _CHUNK]
                        db.execute(f"UPDATE entries SET used = ? WHERE key IN ({','.join('?' * len(chunk))})",
                                   [tick, *chunk])
                    for key in expired:
                        db.execute("DELETE FROM entries WHERE key = ? AND expires_at <= ?", (key, now))

                self._write(db, touch)
            return [found.get(key) for key in keys]

        return await self._call(op)

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store the entries with their tags, then evict until both bounds hold; one transaction."""
        if not items:
            return
        now = self.clock()

        def op(db: sqlite3.Connection) -> None:
            def body() -> None:
                tick = self._tick(db)
                for item in items:
                    size = (len(item.blob) + len(item.key.encode()) + sum(len(t.encode()) for t in item.tags)
                            + ENTRY_OVERHEAD)
                    if (item.expires_at is not None and item.expires_at <= now) or size > self.max_bytes:
                        db.execute("DELETE FROM entries WHERE key = ?", (item.key,))
                        continue
                    db.execute(
                        "INSERT INTO entries (key, blob, expires_at, size, used) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET blob = excluded.blob, expires_at = excluded.expires_at, "
                        "size = excluded.size, used = excluded.used",
                        (item.key, item.blob, item.expires_at, size, tick))
                    db.execute("DELETE FROM tags WHERE key = ?", (item.key,))
                    if item.tags:
                        db.executemany("INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)",
                                       [(tag, item.key) for tag in item.tags])
                self._evict(db, now)

            self._write(db, body)
            self._vacuum(db)

        await self._call(op)

    def _evict(self, db: sqlite3.Connection, now: float) -> None:
        # Expired entries go first (a few on every write, so they never pile up), then least recently used.
        db.execute("DELETE FROM entries WHERE key IN "
                   "(SELECT key FROM entries WHERE expires_at <= ? ORDER BY expires_at LIMIT 64)", (now,))
        while True:
            size, count = (row[0] for row in db.execute(
                "SELECT value FROM meta WHERE name IN ('bytes', 'entries') ORDER BY name"))
            if size <= self.max_bytes and count <= self.max_entries:
                return
            excess = max(1, count - self.max_entries, min(256, count // 64))
            cursor = db.execute("DELETE FROM entries WHERE key IN "
                                "(SELECT key FROM entries ORDER BY used, rowid LIMIT ?)", (excess,))
            self.evictions += cursor.rowcount
            if cursor.rowcount <= 0:
                return

    def _vacuum(self, db: sqlite3.Connection) -> None:
        # Give freed pages back to the filesystem once they add up to a quarter of the bound, so the file tracks
        # the byte bound rather than the most it ever held.
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (page,) = db.execute("PRAGMA page_size").fetchone()
        if free * page > max(self.max_bytes // 4, 64 * page):
            db.execute("PRAGMA incremental_vacuum")

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the keys."""
        if not keys:
            return

        def op(db: sqlite3.Connection) -> None:
            def body() -> None:
                for start in range(0, len(keys), _CHUNK):
                    chunk = list(keys[start:start + _CHUNK])
                    db.execute(f"DELETE FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk)

            self._write(db, body)

        await self._call(op)

    async def delete_tags(self, tags: Sequence[str]) -> None:
        """Remove every entry recorded under any of the tags."""
        if not tags:
            return

        def op(db: sqlite3.Connection) -> None:
            def body() -> None:
                unique = list(dict.fromkeys(tags))
                for start in range(0, len(unique), _CHUNK):
                    chunk = unique[start:start + _CHUNK]
                    db.execute("DELETE FROM entries WHERE key IN "
                               f"(SELECT key FROM tags WHERE tag IN ({','.join('?' * len(chunk))}))", chunk)

            self._write(db, body)
            self._vacuum(db)

        await self._call(op)

    async def clear_prefix(self, prefix: str) -> None:
        """Remove every entry whose key starts with ``prefix``."""

        def op(db: sqlite3.Connection) -> None:
            self._write(db, lambda: db.execute("DELETE FROM entries WHERE key >= ? AND key < ?",
                                               (prefix, prefix + _PREFIX_END)))
            self._vacuum(db)

        await self._call(op)

    async def clear(self) -> None:
        """Remove every entry."""

        def op(db: sqlite3.Connection) -> None:
            def body() -> None:
                db.execute("DELETE FROM tags")
                db.execute("DELETE FROM entries")

            self._write(db, body)
            self._vacuum(db)

        await self._call(op)

    # -- introspection ------------------------------------------------------------------------------------

    async def usage(self) -> tuple[int, int]:
        """Return ``(entries, charged bytes)`` as every process sees them."""

        def op(db: sqlite3.Connection) -> tuple[int, int]:
            rows = dict(db.execute("SELECT name, value FROM meta WHERE name IN ('bytes', 'entries')").fetchall())
            return int(rows["entries"]), int(rows["bytes"])

        return await self._call(op)

    async def aclose(self) -> None:
        """Close the database."""

        def close() -> None:
            with self._lock:
                db, self._db = self._db, None
                if db is not None:
                    db.close()

        await anyio.to_thread.run_sync(close)
