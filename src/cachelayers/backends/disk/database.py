"""The disk tier's database file: schema, connections, and (re)creating the file safely across processes.

A process notices that the file was deleted or replaced by comparing the path's ``(device, inode)`` with the
file it opened. Creating the file again is done under an exclusive ``flock`` on a lock file next to it, and the
creator first removes any ``-wal`` and ``-shm`` left by the deleted file: a fresh database that picked up the old
file's write-ahead log would read the old file's pages (SQLite reports a disk I/O error at best). Processes still
on the deleted file keep their own open handles to those files until they notice, so nothing they do touches the
new file; and SQLite does not checkpoint or delete the log on close when the file has moved.

The directory is created with mode 0700, the database and lock files with 0600 (the database file exists before
SQLite opens it, so its ``-wal`` and ``-shm`` files, which SQLite gives the database's mode, are 0600 too).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from cachelayers.errors import BackendError

__all__ = ["FILENAME", "SCHEMA_VERSION", "Pragmas", "connect", "create", "identity", "locked"]

FILENAME: Final = "cachelayers.sqlite3"
SCHEMA_VERSION: Final = 1
SIDECARS: Final = ("-wal", "-shm", "-journal")

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


class Pragmas:
    """Per-connection settings: how long to wait for another process, and how large the log may grow; and the
    page size of a database created new."""

    __slots__ = ("busy_timeout", "page_size", "wal_limit")

    def __init__(self, busy_timeout: float, wal_limit: int, page_size: int = 4096) -> None:
        self.busy_timeout = busy_timeout
        self.wal_limit = wal_limit
        self.page_size = page_size

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        # In WAL mode NORMAL never corrupts the database; a power loss may lose the last commits, which for a
        # cache is a few misses.
        db.execute("PRAGMA synchronous = NORMAL")
        # No automatic checkpoints: they cannot shrink a log that another process reads, and they hold the
        # checkpoint lock the writer's own full checkpoint needs (see `DiskBackend._checkpoint`). If the log
        # restarts on its own, it is cut back to the limit.
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute(f"PRAGMA journal_size_limit = {self.wal_limit}")


def identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path``, ``None`` when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def connect(path: Path, pragmas: Pragmas) -> sqlite3.Connection:
    """Open the existing database at ``path`` (never creating it: that is `create`'s job)."""
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=rw"
    db = sqlite3.connect(uri, uri=True, timeout=pragmas.busy_timeout, isolation_level=None,
                         check_same_thread=False)
    try:
        pragmas.apply(db)
    except BaseException:
        db.close()
        raise
    return db


def create(path: Path, pragmas: Pragmas) -> tuple[sqlite3.Connection, tuple[int, int]]:
    """Make sure a database with the schema exists at ``path``; return a connection to it and its identity.

    Raises:
        sqlite3.Error: The file is not a usable database.
        BackendError: The file has another schema version, or was deleted again at once.
    """
    ready = _open_existing(path, pragmas)
    if ready is not None:
        return ready
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(path.with_name(path.name + ".lock")):
        if not path.exists():
            for suffix in SIDECARS:  # left by a deleted file: they must not be read as this file's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path.with_name(path.name + suffix))
            with contextlib.suppress(FileExistsError):  # owner only; SQLite would make it 0644
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(path, timeout=pragmas.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            _initialize(db, pragmas)
            _check_version(db, path)
            found = identity(path)
            if found is None:  # deleted again while we created it: the next operation tries again
                raise BackendError(f"{path} was deleted while it was being created")
        except BaseException:
            db.close()
            raise
    return db, found


def _open_existing(path: Path, pragmas: Pragmas) -> tuple[sqlite3.Connection, tuple[int, int]] | None:
    """The usual case, without the lock or a write: the file exists and has its tables. ``None`` otherwise."""
    before = identity(path)
    if before is None:
        return None
    try:
        db = connect(path, pragmas)
    except sqlite3.OperationalError:  # deleted meanwhile
        return None
    try:
        if identity(path) == before and _check_version(db, path):
            return db, before
    except BaseException:
        db.close()
        raise
    db.close()
    return None


def _check_version(db: sqlite3.Connection, path: Path) -> bool:
    """Whether the schema is there (``False`` for a new file); `BackendError` if it is another version's."""
    try:
        row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise
    if row is None:
        return False
    if row[0] != SCHEMA_VERSION:
        raise BackendError(f"{path} has schema {row[0]}, this version reads {SCHEMA_VERSION}")
    return True


def _initialize(db: sqlite3.Connection, pragmas: Pragmas) -> None:
    # The page size and auto_vacuum only take effect on a new database (before the first table), which is when
    # they matter; the page size must come first.
    db.execute(f"PRAGMA page_size = {pragmas.page_size}")
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("PRAGMA journal_mode = WAL")
    pragmas.apply(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            db.execute(statement)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


if sys.platform != "win32":
    import fcntl

    @contextlib.contextmanager
    def locked(lock_path: Path) -> Iterator[None]:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
else:  # pragma: no cover - no flock on Windows, where an open database file cannot be deleted anyway

    @contextlib.contextmanager
    def locked(lock_path: Path) -> Iterator[None]:
        yield
