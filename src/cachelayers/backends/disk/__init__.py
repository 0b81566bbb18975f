"""The disk tier: one SQLite database in WAL mode, shared safely by every process that opens the directory.

Why SQLite and not diskcache (or one file per key): the tier needs several tags per entry, an exact byte
bound that holds after every write, LRU eviction and absolute expiry, all consistent across processes. In
SQLite each of these is one transaction: an entry, its tags, the running byte and entry counts (kept by
triggers) and the evictions it causes commit together or not at all, so a crash or a concurrent process
never sees a half-written entry or a wrong total. WAL lets readers proceed while one process writes;
``busy_timeout`` makes writers queue instead of failing. diskcache keeps one tag per entry, counts its size
limit loosely (culling a few entries per write) and pickles by default; ``sqlite3`` ships with Python.

Inside a process, one writer thread owns the write connection and commits whatever writes are queued as one
transaction, and one reader thread answers queued reads from one snapshot (`_lanes`): a thousand concurrent
callers cost a few transactions, not a thousand fights over one lock, and reads never wait for writes. The
tier works under asyncio and trio. The writer keeps the write-ahead log small (a full checkpoint whenever it
passes its limit), and both threads notice when the file was deleted or replaced and open it again (`_file`).

The database lives in ``<path>/cachelayers.sqlite3``; use a local filesystem (SQLite's locking is not
reliable on network filesystems).
"""

from __future__ import annotations

from cachelayers.backends.disk.backend import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    ENTRY_OVERHEAD,
    DiskBackend,
)
from cachelayers.backends.disk.database import FILENAME, SCHEMA_VERSION

__all__ = ["DEFAULT_BUSY_TIMEOUT", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "ENTRY_OVERHEAD", "FILENAME",
           "SCHEMA_VERSION", "DiskBackend"]
