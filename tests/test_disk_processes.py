"""The disk tier shared by real processes (workers: `tests.disk_worker`).

* four writer processes keep the database file plus its write-ahead log within twice ``max_bytes``;
* a process whose database file is deleted or replaced under it notices, opens the file now at the path (logging
  and counting it), and from then on it and the other processes read each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from cachelayers import StoreItem
from cachelayers.backends.disk import DiskBackend

pytestmark = [pytest.mark.disk]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def start(mode: str, **options: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.disk_worker", mode, json.dumps(options)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"worker failed (exit {process.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_worker(mode: str, **options: Any) -> dict[str, Any]:
    return result(start(mode, **options))


def file_and_log_size(path: Path) -> int:
    total = 0
    for name in (path.name, path.name + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += path.with_name(name).stat().st_size
    return total


def test_four_writer_processes_keep_the_file_and_its_log_within_twice_the_bound(tmp_path: Path) -> None:
    """Four processes, 8 tasks each, write and read as fast as they can for 8 s on one directory with
    ``max_bytes=1MiB``, each operation bounded as the engine bounds a tier call (``within``, the default 250 ms):
    the database file plus its ``-wal``, sampled every few milliseconds, never exceeds 2 MiB, the byte bound
    holds, and no operation failed or timed out. (Before, the log alone reached 15-340 MB: automatic checkpoints
    cannot shrink a log that other processes keep reading. And 3-4 % of writes timed out: SQLite's busy handler
    polls with sleeps, so a process waited seconds for the write lock while the others took turns.)"""
    directory = tmp_path / "shared"
    path = directory / "cachelayers.sqlite3"
    start_at = time.time() + 2  # time for every interpreter to start
    workers = [start("churn", dir=str(directory), max_bytes=MiB, seconds=8, seed=i, start_at=start_at, bound=0.25)
               for i in range(4)]
    peak = 0
    while any(w.poll() is None for w in workers):
        peak = max(peak, file_and_log_size(path))
        time.sleep(0.003)
    reports = [result(w) for w in workers]
    print(f"peak database + log: {peak:,} bytes; reports: {reports}")
    assert all(r["ops"] > 100 for r in reports), reports
    assert [r["failures"] for r in reports] == [0, 0, 0, 0], [r["errors"] for r in reports]
    assert max(r["used"] for r in reports) <= MiB
    assert peak <= 2 * MiB, f"database + log reached {peak:,} bytes for max_bytes={MiB:,}"


def test_a_deleted_database_file_is_created_again_and_shared_with_other_processes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The database file is deleted (``rm cachelayers.sqlite3``, its ``-wal`` and ``-shm`` left behind) while a
    process has it open. That process's next write notices, creates the file again (not reading the old log),
    logs one warning and counts one in ``reopened``; another process then reads what it wrote, and it reads what
    the other process wrote. (Before, it kept writing to the deleted file: the two never met.)"""
    directory = tmp_path / "deleted"
    disk = DiskBackend(f"disk://{directory}")
    anyio.run(disk.set_many, [StoreItem("before", b"0", None)])
    os.remove(disk.path)
    with caplog.at_level(logging.WARNING, logger="cachelayers"):
        anyio.run(disk.set_many, [StoreItem("mine", b"1", None)])
        other = run_worker("write-read", dir=str(directory), write={"theirs": "2"}, read=["mine", "before"])
        assert other["read"] == {"mine": "1", "before": None}
        assert anyio.run(disk.get_many, ["theirs", "mine", "before"]) == [b"2", b"1", None]
        anyio.run(disk.aclose)
    assert disk.reopened == 1
    assert other["reopened"] == 0
    warnings = [r for r in caplog.records if "deleted or replaced" in r.getMessage()]
    assert len(warnings) == 1


def test_a_replaced_database_file_is_noticed_and_shared_with_the_process_that_made_it(tmp_path: Path) -> None:
    """The file is deleted and, before the first process touches it again, another process creates a new one
    (a replaced file: same path, another inode). The first process's next operation notices, moves to the new
    file and counts it; then both processes see each other's entries. (Before, the first process kept its old
    file: it never saw the other's entry, nor the other its.)"""
    directory = tmp_path / "replaced"
    disk = DiskBackend(f"disk://{directory}")
    anyio.run(disk.set_many, [StoreItem("before", b"0", None)])
    os.remove(disk.path)
    first = run_worker("write-read", dir=str(directory), write={"theirs": "2"}, read=[])
    assert first["reopened"] == 0
    anyio.run(disk.set_many, [StoreItem("mine", b"1", None)])
    assert anyio.run(disk.get_many, ["theirs", "mine"]) == [b"2", b"1"]
    second = run_worker("write-read", dir=str(directory), write={}, read=["theirs", "mine"])
    assert second["read"] == {"theirs": "2", "mine": "1"}
    anyio.run(disk.aclose)
    assert disk.reopened == 1


def test_a_file_deleted_under_a_reader_is_noticed_by_its_reads_too(tmp_path: Path) -> None:
    """A process that only reads notices the deletion too: its read opens the new file (empty: a miss, not the
    deleted file's entry) and counts one reopening; a later write from another process is visible to it."""
    directory = tmp_path / "reader"
    disk = DiskBackend(f"disk://{directory}")
    anyio.run(disk.set_many, [StoreItem("old", b"0", None)])
    os.remove(disk.path)
    assert anyio.run(disk.get_many, ["old"]) == [None]
    assert disk.reopened == 1
    run_worker("write-read", dir=str(directory), write={"theirs": "2"}, read=[])
    assert anyio.run(disk.get_many, ["theirs"]) == [b"2"]
    anyio.run(disk.aclose)
    assert disk.reopened == 1
