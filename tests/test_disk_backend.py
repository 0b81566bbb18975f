"""What only the disk tier does: URL validation, exact bounds with LRU eviction, a bounded file, work in threads."""

from __future__ import annotations

import random
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelayers import BackendError, ConfigError, Settings, StoreItem, TieredCache, multilevel_cached
from cachelayers.backends import create_backend
from cachelayers.backends.disk import ENTRY_OVERHEAD, DiskBackend
from tests.conftest import FakeClock
from tests.test_disk_deadlines import write_lock_held

pytestmark = [pytest.mark.disk, pytest.mark.anyio]


def charged(key: str, blob: bytes, tags: tuple[str, ...] = ()) -> int:
    return len(blob) + len(key.encode()) + sum(len(t.encode()) for t in tags) + ENTRY_OVERHEAD


class TestURLs:
    @pytest.mark.parametrize("url", ["disk:///var/cache/app", "disk:///tmp/x?max_bytes=10MiB&max_entries=5000",
                                     "disk://relative/dir", "disk://~/cache?busy_timeout=2s"])
    def test_good_urls(self, url: str) -> None:
        assert Settings(tiers={"disk": url}).tier_urls["disk"] == url

    @pytest.mark.parametrize(("url", "field"), [
        ("disk:///tmp/x?max_bytes=lots", "tiers['disk']?max_bytes"),
        ("disk:///tmp/x?max_bytes=0", "tiers['disk']?max_bytes"),
        ("disk:///tmp/x?max_entries=-3", "tiers['disk']?max_entries"),
        ("disk:///tmp/x?maxbytes=1", "tiers['disk']?maxbytes"),
        ("disk:///tmp/x?busy_timeout=never", "tiers['disk']?busy_timeout"),
        ("disk://", "tiers['disk']"),
    ])
    def test_bad_urls_raise_config_error_naming_the_field(self, url: str, field: str) -> None:
        with pytest.raises(ConfigError) as info:
            Settings(tiers={"disk": url})
        assert info.value.field == field


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 700), st.booleans()), min_size=1, max_size=40))
async def test_both_bounds_always_hold_and_eviction_is_lru(tmp_path: Path, writes: list[tuple[int, int, bool]]) -> None:
    """After every write the charged bytes and the entry count are within bounds, and what was evicted is
    exactly what an LRU model evicts (reads count as use)."""
    clock = FakeClock()
    max_bytes, max_entries = 3000, 8
    directory = tempfile.mkdtemp(dir=tmp_path)  # a fresh database per example
    disk = DiskBackend(f"disk://{directory}?max_bytes={max_bytes}&max_entries={max_entries}", clock=clock)
    model: OrderedDict[str, int] = OrderedDict()
    for number, size, read_first in writes:
        if read_first and model:
            oldest = next(iter(model))
            assert (await disk.get_many([oldest]))[0] is not None
            model.move_to_end(oldest)
        key, blob = f"k{number}", bytes(size)
        await disk.set_many([StoreItem(key, blob, None, ("t",))])
        model.pop(key, None)
        model[key] = charged(key, blob, ("t",))
        while sum(model.values()) > max_bytes or len(model) > max_entries:
            model.popitem(last=False)
        entries, used = await disk.usage()
        assert used <= max_bytes
        assert entries <= max_entries
        assert (entries, used) == (len(model), sum(model.values()))
        # Look without touching (a read would count as use): exactly the model's keys are stored.
        keys = await disk._call(lambda db: {row[0] for row in db.execute("SELECT key FROM entries")})
        assert keys == set(model)
    await disk.aclose()


async def test_an_entry_larger_than_the_bound_is_not_stored(tmp_path: Path) -> None:
    disk = DiskBackend(f"disk://{tmp_path}/big?max_bytes=1000")
    await disk.set_many([StoreItem("small", b"s", None), StoreItem("big", bytes(5000), None)])
    assert await disk.get_many(["small", "big"]) == [b"s", None]
    await disk.aclose()


async def test_the_file_tracks_the_bound_after_heavy_churn(tmp_path: Path) -> None:
    """Freed pages go back to the filesystem: the file does not grow with the total ever written."""
    max_bytes = 256 * 1024
    disk = DiskBackend(f"disk://{tmp_path}/churn?max_bytes={max_bytes}")
    for round_ in range(40):
        await disk.set_many([StoreItem(f"r{round_}k{i}", bytes(4000), None, (f"tag{i % 3}",)) for i in range(30)])
        if round_ % 7 == 0:
            await disk.delete_tags(["tag1"])
    _, used = await disk.usage()
    assert used <= max_bytes
    size = disk.path.stat().st_size
    assert size < 2 * max_bytes + 256 * 1024, f"a {size}-byte database for {used} bytes stored"
    wal = disk.path.with_name(disk.path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size < 2 * 1024 * 1024
    assert disk.evictions > 0
    await disk.aclose()


async def test_blocking_work_runs_in_worker_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = DiskBackend(f"disk://{tmp_path}/threads")
    threads: list[threading.Thread] = []
    original = DiskBackend._run

    def recording(self: DiskBackend, fn: object) -> object:
        threads.append(threading.current_thread())
        return original(self, fn)  # type: ignore[arg-type]

    monkeypatch.setattr(DiskBackend, "_run", recording)
    await disk.set_many([StoreItem("k", b"v", None)])
    assert await disk.get_many(["k"]) == [b"v"]
    assert threads
    assert threading.main_thread() not in threads
    await disk.aclose()


async def test_a_broken_database_file_is_a_failing_tier_not_a_failing_call(tmp_path: Path) -> None:
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "cachelayers.sqlite3").write_bytes(b"this is not a database" * 100)
    backend = create_backend(f"disk://{directory}")
    with pytest.raises(BackendError, match=r"cachelayers\.sqlite3"):
        await backend.get_many(["k"])
    cache = TieredCache(Settings(), backends={"disk": backend})

    @multilevel_cached(cache=cache)
    async def f(x: int) -> int:
        return x + 1

    assert await f(1) == 2
    assert await f(1) == 2
    stats = cache.tier_stats()["disk"]
    assert stats["errors"] >= 2
    await cache.aclose()


# -- many concurrent callers: one writer, batched transactions, reads beside writes ---------------------------

CALLERS = 1000


@pytest.mark.parametrize("with_memory", [True, False], ids=["memory+disk", "disk"])
async def test_a_thousand_concurrent_callers_through_the_decorator_time_out_on_nothing(
        tmp_path: Path, with_memory: bool) -> None:
    """1,000 callers at once, all missing, through ``@multilevel_cached`` (memory + disk, and disk alone), then
    1,000 at once from a new engine on the same directory (nothing in memory): no disk call times out, fails or is
    skipped, every result lands on disk and the second round is served from it. The tier timeout is 1 s rather
    than the default 250 ms only to leave room for a loaded test machine. (Before, each call took the tier's one
    lock in a worker thread: 240-1,000 of the 1,000 calls of a round timed out, even at 1 s.)"""
    tiers = {"memory": "memory://"} if with_memory else {}
    tiers["disk"] = f"disk://{tmp_path}/burst"
    computed = 0
    for round_ in ("miss", "hit"):
        cache = TieredCache(Settings(tiers=tiers, tier_timeout="1s"))

        @multilevel_cached(cache=cache, name="burst", ttl=3600)
        async def f(x: int) -> dict[str, object]:
            nonlocal computed
            computed += 1
            return {"x": x, "pad": "v" * 1000}

        results: dict[int, object] = {}

        async def call(x: int, f: Any = f, results: dict[int, object] = results) -> None:
            results[x] = await f(x)

        async with anyio.create_task_group() as tg:
            for x in range(CALLERS):
                tg.start_soon(call, x)
        stats = cache.tier_stats()["disk"]
        await cache.aclose()
        assert results == {x: {"x": x, "pad": "v" * 1000} for x in range(CALLERS)}
        assert (stats["timeouts"], stats["errors"], stats["skipped"]) == (0, 0, 0), (round_, stats)
        if round_ == "miss":
            assert stats["writes"] == CALLERS
        else:
            assert stats["hits"] == CALLERS
    assert computed == CALLERS  # the second round computed nothing
    disk = DiskBackend(f"disk://{tmp_path}/burst")
    assert (await disk.usage())[0] == CALLERS
    await disk.aclose()


async def test_a_thousand_concurrent_backend_callers_time_out_on_nothing(tmp_path: Path) -> None:
    """1,000 callers at once on the backend, each doing 5 operations (70 % ``get_many``, 30 % ``set_many``, of
    1-3 keys), each bounded as the engine bounds a tier call (``within``, at the default 250 ms): none times out
    or fails, and every entry whose ``set_many`` returned is stored. (Before, most of the 5,000 operations timed
    out; with a wall-clock bound of 1 s, a loaded machine still timed out a dozen.)"""
    disk = DiskBackend(f"disk://{tmp_path}/mix")
    rng = random.Random(11)
    failures: list[BaseException] = []
    written: dict[str, bytes] = {}

    async def caller(i: int) -> None:
        for _ in range(5):
            keys = [f"k{rng.randrange(3 * CALLERS)}" for _ in range(rng.randint(1, 3))]
            try:
                with disk.within(0.25):
                    if rng.random() < 0.7:
                        await disk.get_many(keys)
                    else:
                        blob = f"{i}".encode() * 100
                        await disk.set_many([StoreItem(k, blob, None, (f"t{i % 7}",)) for k in keys])
                        written.update(dict.fromkeys(keys, blob))
            except Exception as exc:
                failures.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(CALLERS):
            tg.start_soon(caller, i)
    assert failures == []
    stored = await disk.get_many(list(written))
    assert all(blob is not None for blob in stored)
    await disk.aclose()


async def test_concurrent_writes_share_transactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 concurrent ``set_many`` calls commit in far fewer transactions than calls: the writer thread takes
    every write queued while it was busy into its next transaction. (Before: one transaction per call.)"""
    disk = DiskBackend(f"disk://{tmp_path}/tx")
    transactions = 0
    original = DiskBackend._transaction

    def counting(self: DiskBackend, jobs: list[Any], db: sqlite3.Connection) -> int:
        nonlocal transactions
        transactions += 1
        return original(self, jobs, db)

    monkeypatch.setattr(DiskBackend, "_transaction", counting)
    async with anyio.create_task_group() as tg:
        for i in range(CALLERS):
            tg.start_soon(disk.set_many, [StoreItem(f"k{i}", b"v" * 100, None, ("t",))])
    assert (await disk.usage())[0] == CALLERS
    assert transactions <= CALLERS // 10, f"{transactions} transactions for {CALLERS} writes"
    await disk.aclose()


async def test_reads_are_answered_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    """While another connection (another process, say) holds the database's write lock for seconds, reads
    answer at once — hits included: marking them used is queued for the writer, which waits for the lock on
    its own. (Before, a hit took the write lock itself to mark the entry used, and waited ``busy_timeout``.)"""
    url = f"disk://{tmp_path}/held?busy_timeout=5s"
    disk = DiskBackend(url)
    await disk.set_many([StoreItem("k", b"v", None)])
    with write_lock_held(url), anyio.fail_after(1):
        assert await disk.get_many(["k", "missing"]) == [b"v", None]
        assert await disk.get_many(["k"]) == [b"v"]
    await disk.aclose()
