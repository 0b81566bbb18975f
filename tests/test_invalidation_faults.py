"""Invalidations are never silently lost (issue 11), tried across processes on a real Redis.

Each fault test runs two worker processes (`tests.inval_worker`) that cache one value in memory + Redis, changes
the value's source of truth, breaks the way to Redis while the first process invalidates the value's tag, and
repairs it. The invalidating call must succeed or raise `InvalidationError`, and once things are back neither
process, nor a third one started afterwards, may serve the old value:

* Redis hung (SIGSTOP) during the invalidation;
* Redis killed (SIGKILL) with an append-only file fsynced on every write, and restarted;
* the first process cut off by a proxy that resets its connections.

Then, in one process: a signed entry saved before an invalidation and written back afterwards (old bytes
replayed with ``SET``) is a miss; and a property: over any interleaving of writes, invalidations and replays
by two engines, no read returns a value that an invalidation it has heard of came after.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelayers import InvalidationError, MemoryBackend, Settings, TieredCache
from tests.conftest import FakeClock
from tests.redis_server import RedisServer, redis_available
from tests.reset_proxy import ResettingProxy
from tests.test_bad_input import FailingBackend
from tests.tier_factories import eventually

pytestmark = [pytest.mark.redis, pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]

ROOT = Path(__file__).resolve().parent.parent
SETTLE_SECONDS = 30.0  # the longest wait for the processes to be back in step (reconnect and replay back-offs)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Proc:
    """One ``python -m tests.inval_worker`` process, driven by JSON lines."""

    def __init__(self, redis_url: str, source: Path) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close(), with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.inval_worker", json.dumps({"redis": redis_url, "source": str(source)})],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next()["event"] == "ready"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def _next(self, timeout: float = 60) -> dict[str, Any]:
        try:
            return json.loads(self._lines.get(timeout=timeout))  # type: ignore[no-any-return]
        except queue.Empty:
            self._stderr.seek(0)
            raise AssertionError(f"worker did not answer (exit {self.process.poll()}):\n"
                                 f"{self._stderr.read().decode(errors='replace')}") from None

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._next()

    def read(self, n: int = 1) -> list[str]:
        values: list[str] = self.ask(op="read", n=n)["values"]
        return values

    def close(self) -> None:
        if self._stderr.closed:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own with an append-only file fsynced on every write."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    yield server
    server.close()


def _settle(procs: list[Proc]) -> None:
    """Wait until no process has an invalidation left to replay, every one is subscribed again and all have
    heard the last invalidation any of them knows of (the code before issue 11 reports no queue nor stamps)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        states = [p.ask(op="status") for p in procs]
        landed = max(s["landed"] for s in states)
        if all(s["queued"] == 0 and s["subscribed"] and s["stamp"] >= landed for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the processes did not settle: {states}")
        time.sleep(0.05)


def _invalidate_through_a_fault(server: RedisServer, url_a: str, tmp_path: Path, procs: list[Proc],
                                break_: Callable[[], object], repair: Callable[[], object]) -> None:
    source = tmp_path / "source"
    source.write_text("old")
    a, b = Proc(url_a, source), Proc(server.url, source)
    procs += [a, b]
    assert a.read() == ["old"]
    assert b.read() == ["old"]  # from Redis, now in both memory tiers
    source.write_text("new")
    break_()
    try:
        answer = a.ask(op="invalidate")
    finally:
        repair()
    print("invalidation answered:", answer)
    assert answer == {"ok": True} or answer.get("error") == "InvalidationError", answer
    _settle([a, b])
    c = Proc(server.url, source)
    procs.append(c)
    assert a.read(10) == ["new"] * 10, f"the invalidating process serves the old value (it got {answer})"
    assert b.read(10) == ["new"] * 10, f"the other process serves the old value (the invalidation got {answer})"
    assert c.read(10) == ["new"] * 10, f"a new process serves the old value (the invalidation got {answer})"


def test_an_invalidation_while_redis_hangs_is_not_lost(own_redis: RedisServer, tmp_path: Path,
                                                       procs: list[Proc]) -> None:
    _invalidate_through_a_fault(own_redis, own_redis.url, tmp_path, procs, own_redis.pause, own_redis.resume)


def test_an_invalidation_while_redis_is_down_is_not_lost_after_it_restarts_from_its_aof(
        aof_redis: RedisServer, tmp_path: Path, procs: list[Proc]) -> None:
    _invalidate_through_a_fault(aof_redis, aof_redis.url, tmp_path, procs, aof_redis.kill, aof_redis.start)


def test_an_invalidation_from_a_process_cut_off_by_resets_is_not_lost(own_redis: RedisServer, tmp_path: Path,
                                                                     procs: list[Proc]) -> None:
    proxy = ResettingProxy(own_redis.port)
    try:
        _invalidate_through_a_fault(own_redis, proxy.url, tmp_path, procs, proxy.cut, proxy.restore)
    finally:
        for proc in procs:  # before the proxy, or it may close with connections half accepted
            proc.close()
        proxy.close()


# -- in one process: replayed entries ---------------------------------------------------------------------------


def _signed(redis_url: str) -> Settings:
    return Settings(tiers={"memory": "memory://", "redis": redis_url}, secret="s" * 32, default_ttl="10m")


@pytest.mark.anyio
async def test_a_signed_entry_written_back_after_an_invalidation_is_a_miss(redis_url: str) -> None:
    cache = TieredCache(_signed(redis_url))
    client = redis.Redis.from_url(redis_url)
    await cache.set("k", "old", tags=["t"])
    key = cache.storage_key("k")
    saved = client.get(key)
    assert saved is not None
    await cache.invalidate_tags("t")
    client.set(key, saved)  # the old bytes, validly signed for this key, written back
    assert await cache.get("k", "miss") == "miss"
    fresh = TieredCache(_signed(redis_url))  # as a process started afterwards
    assert await fresh.get("k", "miss") == "miss"
    await cache.set("k", "new", tags=["t"])
    assert await fresh.get("k") == "new"  # entries written after the invalidation are served
    client.close()
    await cache.aclose()
    await fresh.aclose()


@pytest.mark.anyio
async def test_an_invalidation_that_cannot_land_raises_and_is_replayed(own_redis: RedisServer) -> None:
    settings_ = Settings(tiers={"memory": "memory://", "redis": own_redis.url}, breaker_cooldown="50ms")
    cache = TieredCache(settings_)
    await cache.set("k", "old", tags=["t"])
    own_redis.kill()
    with pytest.raises(InvalidationError) as caught:
        await cache.invalidate_tags("t")
    assert caught.value.kind == "tags"
    assert caught.value.items == ("t",)
    assert caught.value.tiers == ("redis",)
    own_redis.start()  # without an append-only file: empty, and the replay lands in it
    await eventually(lambda: not cache.invalidations.queued, SETTLE_SECONDS, 0.02)
    assert await cache.get("k", "miss") == "miss"
    await cache.aclose()


# -- a property: interleavings of writes, invalidations and replays ---------------------------------------------

KEYS = ["a", "b", "c"]
TAGS_OF = {"a": ["t1"], "b": ["t2"], "c": ["t1", "t2"]}
steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 1), st.sampled_from(KEYS)),
        st.tuples(st.just("invalidate"), st.integers(0, 1), st.sampled_from(["t1", "t2"])),
        st.tuples(st.just("replay"), st.integers(0, 1), st.sampled_from(KEYS)),
        st.tuples(st.just("read"), st.integers(0, 1), st.sampled_from(KEYS)),
    ),
    min_size=1, max_size=14,
)


@pytest.mark.anyio
@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
async def test_no_interleaving_serves_a_value_an_invalidation_came_after(redis_url: str,
                                                                         steps: list[tuple[str, int, str]]) -> None:
    """Two engines share one Redis; each write stores a new version; a replay writes back the bytes of an older
    version of the key. Once both engines heard an invalidation, no read returns a version written before it
    that carries its tag."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    engines = [TieredCache(Settings(tiers={"memory": "memory://", "redis": redis_url})) for _ in range(2)]
    version = 0
    written: dict[int, tuple[str, float]] = {}  # version -> (key, when its write began, on the model's clock)
    invalidated: dict[str, float] = {}  # tag -> the model's clock at its last invalidation
    blobs: dict[str, list[bytes]] = {k: [] for k in KEYS}
    clock = 0.0
    try:
        for engine in engines:
            await engine.follow_invalidations()
        for op, who, arg in steps:
            engine = engines[who]
            clock += 1
            if op == "write":
                version += 1
                written[version] = (arg, clock)
                await engine.set(arg, version, tags=TAGS_OF[arg])
                blob = client.get(engine.storage_key(arg))
                if isinstance(blob, bytes):
                    blobs[arg].append(blob)
            elif op == "invalidate":
                await engine.invalidate_tags(arg)
                invalidated[arg] = clock
                await _heard_by_all(engines)
            elif op == "replay" and blobs[arg]:
                client.set(engines[0].storage_key(arg), blobs[arg][0])  # the oldest bytes of the key
            elif op == "read":
                value = await engine.get(arg)
                if value is not None:
                    key, began = written[value]
                    assert key == arg
                    covering = [t for t in TAGS_OF[key] if invalidated.get(t, -1.0) > began]
                    assert not covering, f"version {value} of {key!r} served after invalidating {covering}"
    finally:
        client.close()
        for engine in engines:
            await engine.aclose()


async def _heard_by_all(engines: list[TieredCache]) -> None:
    """Wait until every engine heard the same last invalidation (the channel delivers within milliseconds)."""
    epochs = [getattr(e, "epochs", None) for e in engines]  # the code before issue 11 had none

    def heard() -> bool:
        known = [x for x in epochs if x is not None]
        top = max((max(x.last.values(), default=0) for x in known), default=0)
        return all(x.stamp >= top for x in known)

    await eventually(heard, 10)


# -- without epochs (no Redis tier): the outbox holds the tier back -----------------------------------------------


@pytest.mark.anyio
async def test_without_epochs_a_tier_that_missed_an_invalidation_is_not_read_before_the_replay(
        clock: FakeClock) -> None:
    lower = FailingBackend()
    lower.failing = False
    cache = TieredCache(Settings(), backends={"memory": MemoryBackend(clock=clock), "lower": lower}, clock=clock)
    other = TieredCache(Settings(), backends={"memory": MemoryBackend(clock=clock), "lower": lower}, clock=clock)
    await cache.set("k", "old", tags=["t"])
    lower.failing = True
    with pytest.raises(InvalidationError) as caught:
        await cache.invalidate_tags("t")
    assert caught.value.tiers == ("lower",)
    assert cache.invalidations.queued == 1
    assert await cache.get("k", "miss") == "miss"  # the tier is held back: not read, though it answers no more
    lower.failing = False
    assert await cache.get("k", "miss") == "miss"  # replayed first, then read
    assert cache.invalidations.queued == 0
    assert await lower.store.get_many([cache.storage_key("k")]) == [None]
    assert await other.get("k", "miss") == "miss"
