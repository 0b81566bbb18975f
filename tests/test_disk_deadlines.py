"""The disk tier's deadline counts progress, not the clock: a burst on a loaded process is not a failure, a lane
stuck on another process's lock is, and a job kept waiting behind others for too long is skipped, counted."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from cachelayers import Settings, StoreItem, TieredCache, multilevel_cached
from cachelayers.backends.base import BackendBusyError
from cachelayers.backends.disk import DiskBackend
from cachelayers.backends.disk.lanes import BUSY_ROUNDS, PATIENCE, Job, Lane, submit_and_wait
from tests.bursts import burst
from tests.conftest import FakeClock

pytestmark = [pytest.mark.disk, pytest.mark.anyio]


def lane_running(run_batch: object) -> Lane:
    return Lane("test", run_batch, max_jobs=10, max_size=1 << 30)  # type: ignore[arg-type]


async def wait_on(run_batch: object, seconds: float, work: object = "job",
                  release: threading.Event | None = None) -> tuple[object, float]:
    """Submit ``work`` to a lane running ``run_batch``, waiting within ``seconds`` (`PATIENCE`); return its result
    or the exception raised, and the seconds waited. ``release`` is set afterwards (it ends a blocked batch)."""
    lane = lane_running(run_batch)
    token = PATIENCE.set(seconds)
    started = time.monotonic()
    try:
        outcome: object = await submit_and_wait(lane, work)
    except Exception as exc:
        outcome = exc
    finally:
        PATIENCE.reset(token)
        if release is not None:
            release.set()
    return outcome, time.monotonic() - started


class TestWaitFor:
    async def test_a_lane_locked_out_times_out_after_the_timeout(self) -> None:
        """A batch waiting for another connection's lock (SQLite's busy handler sleeps) has failed: the waiter
        gets TimeoutError after about one timeout, not after the batch's 10 s."""
        release = threading.Event()

        def locked_out(lane: Lane, jobs: list[Job]) -> None:
            with lane.locked_out():
                release.wait(10)

        outcome, waited = await wait_on(locked_out, 0.1, release=release)
        assert isinstance(outcome, TimeoutError)
        assert "for a lock another connection holds" in str(outcome)
        assert 0.1 <= waited < 2  # one timeout and the loop's lateness, far from 10 s

    async def test_a_batch_sleeping_without_a_lock_wait_is_answered_past_the_timeout(self) -> None:
        """A batch that sleeps for three timeouts without CPU and without waiting for a lock (a checkpoint
        waiting for readers to leave the log, a slow fsync) and then answers: the waiter gets its result.
        (Before, it timed out after one timeout: 27 writes of a 1,000-caller burst failed that way.)"""
        def checkpointing(lane: Lane, jobs: list[Job]) -> None:
            time.sleep(0.3)
            for job in jobs:
                job.result = job.work * 2

        assert (await wait_on(checkpointing, 0.1, 21))[0] == 42

    async def test_a_stalled_lane_times_out_after_the_busy_rounds(self) -> None:
        """A batch that neither finishes nor uses CPU nor waits for a lock (a disk that does not answer):
        TimeoutError after ``BUSY_ROUNDS`` timeouts, counted as a failure, not as congestion."""
        release = threading.Event()

        def stalled(lane: Lane, jobs: list[Job]) -> None:
            release.wait(10)

        outcome, waited = await wait_on(stalled, 0.05, release=release)
        assert isinstance(outcome, TimeoutError)
        assert "made no progress" in str(outcome)
        assert BUSY_ROUNDS * 0.05 <= waited < 5

    async def test_a_lane_working_for_others_is_waited_for_then_skipped_as_busy(self) -> None:
        """A lane that keeps using CPU (a long batch for other callers) is not stuck: the waiter waits
        ``BUSY_ROUNDS`` timeouts, then gives up with BackendBusyError (congestion, not a failure)."""
        release = threading.Event()

        def spinning(lane: Lane, jobs: list[Job]) -> None:
            while not release.is_set():
                sum(range(1000))

        outcome, waited = await wait_on(spinning, 0.05, release=release)
        assert isinstance(outcome, BackendBusyError)
        assert "busy with other callers" in str(outcome)
        assert waited >= BUSY_ROUNDS * 0.05

    async def test_a_slow_batch_that_finishes_is_answered_past_the_timeout(self) -> None:
        """A batch that works (CPU) for three timeouts and then answers: the waiter gets its result."""
        def slow(lane: Lane, jobs: list[Job]) -> None:
            until = time.monotonic() + 0.3
            while time.monotonic() < until:
                sum(range(1000))
            for job in jobs:
                job.result = job.work * 2

        assert (await wait_on(slow, 0.1, 21))[0] == 42

    async def test_without_a_bound_the_wait_is_unbounded(self) -> None:
        def slow(lane: Lane, jobs: list[Job]) -> None:
            time.sleep(0.2)
            for job in jobs:
                job.result = "done"

        assert await submit_and_wait(lane_running(slow), None) == "done"


def locked_since(lane: Lane) -> float | None:
    return lane.locked_out_since


async def test_a_forked_child_does_not_inherit_its_parents_lock_wait() -> None:
    """At a fork the parent's writer may be waiting for another process's lock; the child has no such thread,
    so its lane must not look locked out (every write of the child would time out at once)."""
    def answer(lane: Lane, jobs: list[Job]) -> None:
        for job in jobs:
            job.result = "done"

    lane = lane_running(answer)
    lane.locked_out_since = time.monotonic() - 10  # as the parent's thread left it
    lane.forget()  # what `os.register_at_fork(after_in_child=...)` runs
    assert locked_since(lane) is None
    token = PATIENCE.set(0.05)
    try:
        assert await submit_and_wait(lane, "job") == "done"
    finally:
        PATIENCE.reset(token)


@contextlib.contextmanager
def write_lock_held(url: str) -> Iterator[None]:
    """Another connection (another process, say) holds the disk tier's write lock inside."""
    holder = sqlite3.connect(DiskBackend(url).path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def plus_one(cache: TieredCache, name: str) -> tuple[Callable[[int], Awaitable[int]], list[int]]:
    """``x + 1`` under ``@multilevel_cached`` on ``cache``, and the list of the arguments it computed."""
    computed: list[int] = []

    @multilevel_cached(cache=cache, name=name)
    async def f(x: int) -> int:
        computed.append(x)
        return x + 1

    return f, computed


def gil_hogs(count: int) -> tuple[list[threading.Thread], threading.Event]:
    stop = threading.Event()

    def hog() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    threads = [threading.Thread(target=hog, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, stop


async def test_a_burst_on_a_loaded_process_lands_every_write(tmp_path: Path) -> None:
    """1,000 concurrent misses on memory + disk at the default 250 ms tier timeout while two other threads of
    the process compete for the interpreter lock (as leftover threads do on a loaded server): every write lands,
    nothing times out. (With a wall-clock bound, all 1,000 reads timed out and every write was skipped.)"""
    threads, stop = gil_hogs(2)
    try:
        cache = TieredCache(Settings(tiers={"memory": "memory://", "disk": f"disk://{tmp_path}/loaded"}))
        results, _ = await burst(cache, 1_000, [], name="loaded-burst")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    stats = cache.tier_stats()["disk"]
    assert results == [2 * x for x in range(1_000)]
    assert (stats["writes"], stats["skipped"], stats["errors"], stats["timeouts"]) == (1_000, 0, 0, 0), stats
    await cache.aclose()
    disk = DiskBackend(f"disk://{tmp_path}/loaded")
    assert (await disk.usage())[0] == 1_000
    await disk.aclose()


async def test_a_write_behind_another_process_lock_times_out_after_the_tier_timeout(tmp_path: Path) -> None:
    """Another connection (another process, say) holds the write lock for longer than the tier timeout: the
    write times out after about the tier timeout, not after the 10 s ``busy_timeout``; the call returns its
    value, the timeout is counted, and once the lock is released the next write lands."""
    url = f"disk://{tmp_path}/held"
    cache = TieredCache(Settings(tiers={"memory": "memory://", "disk": url}, tier_timeout="200ms"))
    f, _ = plus_one(cache, "held")
    assert await f(0) == 1  # creates the file
    with write_lock_held(url):
        started = time.monotonic()
        assert await f(1) == 2
        elapsed = time.monotonic() - started
    stats = cache.tier_stats()["disk"]
    assert (stats["timeouts"], stats["writes"]) == (1, 1), stats
    assert elapsed < 5, elapsed  # the tier timeout plus a loaded machine's slack, well under busy_timeout
    assert await f(2) == 3
    assert cache.tier_stats()["disk"]["writes"] == 2
    await cache.aclose()


async def test_a_reader_holding_its_snapshot_neither_fails_writes_nor_makes_each_wait(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch
                                                                                    ) -> None:
    """Another connection keeps a read snapshot open while the log passes its limit, so no checkpoint can
    truncate it (each waits half a second for the reader): 200 writes under the default 250 ms bound all land,
    none times out, and the checkpoint is tried a few times, not twice per write. (Before, 186 of 200 writes
    timed out and each paid up to a second of checkpoint waits: 93 s for 200 writes.)"""
    disk = DiskBackend(f"disk://{tmp_path}/reader?max_bytes=1MiB")
    blob = b"x" * 2000
    for i in range(200):
        await disk.set_many([StoreItem(f"k{i}", blob, None)])
    attempts = 0
    truncate = disk._truncate_wal

    def counted(db: sqlite3.Connection) -> bool:
        nonlocal attempts
        attempts += 1
        return truncate(db)

    monkeypatch.setattr(disk, "_truncate_wal", counted)
    reader = sqlite3.connect(disk.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM entries").fetchone()
    failures: list[BaseException] = []
    try:
        for i in range(200, 400):
            try:
                with disk.within(0.25):
                    await disk.set_many([StoreItem(f"k{i}", blob, None)])
            except Exception as exc:
                failures.append(exc)
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert failures == []
    assert 1 <= attempts <= 12, attempts
    assert await disk.get_many(["k399"]) == [blob]
    await disk.aclose()


async def test_writes_behind_a_hung_lock_holder_open_the_write_breaker_while_reads_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process hangs holding the disk tier's write lock while reads still work: after
    ``breaker_threshold`` write timeouts the write breaker opens, and later misses skip the write instead of
    paying a timeout each, while reads still go to the disk (a hit included). Once the holder is gone and the
    cool-down has passed (a fake clock), a probe write lands and closes the breaker. (Before, reads and writes
    shared one breaker: each successful read closed it again, so every miss paid a write timeout for as long
    as the holder hung: 40 timeouts in 40 calls, and the log said "failing" and "recovered" by turns.) The
    outage is logged once when it starts and once when it ends."""
    clock = FakeClock()
    url = f"disk://{tmp_path}/hung"
    cache = TieredCache(Settings(tiers={"disk": url}, tier_timeout="100ms", breaker_threshold=3,
                                 breaker_cooldown="2s"), monotonic=clock)
    f, computed = plus_one(cache, "hung")
    assert await f(0) == 1  # stored on disk before the holder takes the lock
    with write_lock_held(url):
        caplog.set_level(logging.WARNING, logger="cachelayers")
        for x in range(1, 9):
            assert await f(x) == x + 1
        assert await f(0) == 1  # a read hit from the disk all the same
        stats = cache.tier_stats()["disk"]
        assert (stats["timeouts"], stats["skipped"]) == (3, 5), stats
        assert (stats["breaker"], stats["write_breaker"]) == ("closed", "open"), stats
        assert stats["hits"] == 1, stats
    assert len(computed) == 9
    clock.advance(2.5)
    assert await f(100) == 101  # the probe write lands
    stats = cache.tier_stats()["disk"]
    assert (stats["writes"], stats["write_breaker"]) == (2, "closed"), stats
    assert await f(100) == 101
    assert len(computed) == 10
    messages = [r.getMessage() for r in caplog.records if "tier 'disk'" in r.getMessage()]
    assert [m.split(": ")[1].split()[-1] for m in messages] == ["failing", "recovered"], messages
    await cache.aclose()


async def test_a_read_skipped_as_busy_is_a_miss_not_a_failure(tmp_path: Path) -> None:
    """A read that gives up with BackendBusyError is counted ``skipped``; the breaker and the engine's failure
    count do not move, and the call computes its value."""
    cache = TieredCache(Settings(tiers={"memory": "memory://", "disk": f"disk://{tmp_path}/busy"}))
    disk_tier = cache.tiers[-1]

    async def busy(keys: object) -> list[bytes | None]:
        raise BackendBusyError("busy")

    disk_tier.backend.get_many = busy  # type: ignore[method-assign]

    @multilevel_cached(cache=cache, name="busy")
    async def f(x: int) -> int:
        return x * 3

    assert await f(4) == 12
    stats = cache.tier_stats()["disk"]
    assert stats["skipped"] >= 1, stats
    assert (stats["timeouts"], stats["errors"]) == (0, 0), stats
    assert cache.failures == 0
    await cache.aclose()


async def test_a_stored_item_round_trips_within_the_bound(tmp_path: Path) -> None:
    disk = DiskBackend(f"disk://{tmp_path}/plain")
    with disk.within(0.25):
        await disk.set_many([StoreItem("k", b"v", None)])
        assert await disk.get_many(["k"]) == [b"v"]
    await disk.aclose()
