"""Sync functions: the four decorators on plain ``def`` functions, called from many threads.

The engines run on the library's background loop (`cachelayers.engines.sync`); these tests check what a user
of a sync function relies on: single flight across threads, the same keys and entries as the async form on
every tier (a sync and an async service share a Redis), the function run in the calling thread, exceptions
propagated, batches shared by threads, limits that block, and a clean exit.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from cachelayers import (
    RateLimiter,
    RateLimitExceeded,
    Settings,
    SyncBatchedFunction,
    SyncCachedFunction,
    SyncRateLimitedFunction,
    SyncSemanticCachedFunction,
    TieredCache,
    batched,
    explain,
    last_lookup,
    multilevel_cached,
    rate_limited,
    semantic_cached,
)
from cachelayers.engines.sync import library_loop, run
from tests.semantic_helpers import AngleEmbedder

THREADS = 32
ROOT = Path(__file__).resolve().parent.parent


def tier_urls(kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Memory alone, or memory over a Redis or disk tier."""
    if kind == "memory":
        return {"memory": "memory://"}
    if kind == "redis":
        return {"memory": "memory://", "redis": str(request.getfixturevalue("redis_url"))}
    return {"memory": "memory://", "disk": f"disk://{request.getfixturevalue('tmp_path') / 'disk'}"}


@pytest.fixture
def make_cache() -> Iterator[Callable[[dict[str, str]], TieredCache]]:
    """Caches made by the test, closed on the library's loop afterwards."""
    made: list[TieredCache] = []

    def make(tiers: dict[str, str]) -> TieredCache:
        cache = TieredCache(Settings(tiers=tiers, tier_timeout="5s"))
        made.append(cache)
        return cache

    yield make
    for cache in made:
        run(cache.aclose)


def in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` for i in range(n), each in its own thread, all released at once; results in order."""
    barrier = threading.Barrier(n)

    def go(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


# -- the wrappers ------------------------------------------------------------------------------------------------


def test_every_decorator_accepts_a_def_and_keeps_its_signature() -> None:
    """Each decorator gives its sync wrapper class for a ``def``: not a coroutine function, same signature,
    name and docstring, and it binds as a method."""

    def answer(question: str, top_k: int = 3) -> str:
        """Doc."""
        return question * top_k

    def embed(texts: list[str], model: str = "m") -> list[int]:
        return [len(t) for t in texts]

    wrapped = [
        (multilevel_cached(answer), SyncCachedFunction),
        (multilevel_cached(ttl=60)(answer), SyncCachedFunction),
        (semantic_cached(threshold=0.9)(answer), SyncSemanticCachedFunction),
        (rate_limited("100/second")(answer), SyncRateLimitedFunction),
    ]
    for fn, kind in wrapped:
        assert isinstance(fn, kind)
        assert not inspect.iscoroutinefunction(fn)
        assert inspect.signature(fn) == inspect.signature(answer)
        assert fn.__name__ == "answer"
        assert fn.__doc__ == "Doc."
        assert fn("ab", top_k=2) == "abab"
    batch = batched(embed)
    assert isinstance(batch, SyncBatchedFunction)
    assert not inspect.iscoroutinefunction(batch)
    assert batch("abc") == 3

    class Service:
        def __init__(self) -> None:
            self.calls = 0

        @multilevel_cached(ignore=("self",))
        def lookup(self, x: int) -> int:
            self.calls += 1
            return x + 1

    service = Service()
    assert [service.lookup(1), service.lookup(1), service.lookup(x=1)] == [2, 2, 2]
    assert service.calls == 1


def test_a_def_returning_an_awaitable_is_a_type_error_naming_it() -> None:
    """A ``def`` that returns a coroutine is not silently cached as a coroutine object."""

    async def inner() -> int:
        return 1

    @multilevel_cached
    def wrong(x: int) -> Any:
        return inner()

    with pytest.raises(TypeError, match="returned an awaitable"):
        wrong(1)


# -- threads, single flight, tiers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [pytest.param("memory", marks=pytest.mark.memory),
                                  pytest.param("redis", marks=pytest.mark.redis),
                                  pytest.param("disk", marks=pytest.mark.disk)])
def test_threads_run_the_function_once_per_key_on_every_tier(
        kind: str, request: pytest.FixtureRequest, make_cache: Callable[[dict[str, str]], TieredCache]) -> None:
    """32 threads x 40 calls over 8 keys: the function runs once per key, in the thread that asked, and every
    caller gets its key's value."""
    calls: Counter[int] = Counter()
    lock = threading.Lock()
    computing_threads: set[int] = set()
    caller_threads: set[int] = set()

    @multilevel_cached(cache=make_cache(tier_urls(kind, request)), ttl="1h")
    def square(x: int) -> dict[str, int]:
        with lock:
            calls[x] += 1
            computing_threads.add(threading.get_ident())
        time.sleep(0.01)  # hold the flight open while the other threads arrive
        return {"x": x, "square": x * x}

    def worker(i: int) -> list[dict[str, int]]:
        with lock:
            caller_threads.add(threading.get_ident())
        return [square((i + j) % 8) for j in range(40)]

    results = in_threads(THREADS, worker)
    assert calls == Counter(dict.fromkeys(range(8), 1))
    assert computing_threads <= caller_threads
    for i, values in enumerate(results):
        assert values == [{"x": (i + j) % 8, "square": ((i + j) % 8) ** 2} for j in range(40)]
    info = square.cache_info()
    assert info.misses == 8
    assert info.hits == THREADS * 40 - 8


@pytest.mark.parametrize("kind", [pytest.param("redis", marks=pytest.mark.redis),
                                  pytest.param("disk", marks=pytest.mark.disk)])
def test_a_second_process_like_engine_finds_the_entries_in_the_lower_tier(
        kind: str, request: pytest.FixtureRequest, make_cache: Callable[[dict[str, str]], TieredCache]) -> None:
    """Two sync functions of the same identity on two engines (two memories) over one lower tier: what one
    computed, the other reads from that tier."""
    tiers = tier_urls(kind, request)
    calls: list[str] = []

    def make(who: str) -> SyncCachedFunction[[int], int]:
        def f(x: int) -> int:
            calls.append(who)
            return x * 3

        return multilevel_cached(name="sync.shared", cache=make_cache(tiers))(f)

    first, second = make("first"), make("second")
    assert first(5) == 15
    assert second(5) == 15
    assert calls == ["first"]
    assert second.cache_info().hits_by_tier == {kind: 1}


@pytest.mark.redis
def test_sync_and_async_forms_share_entries_through_redis(
        redis_url: str, make_cache: Callable[[dict[str, str]], TieredCache]) -> None:
    """A value cached by the async form is a hit for the sync form of the same identity, and vice versa; they
    write the same Redis keys (one per argument, not one per form)."""
    tiers = {"memory": "memory://", "redis": redis_url}
    calls: list[str] = []

    def compute(x: int) -> str:
        return f"value-{x}"

    async def async_form(x: int) -> str:
        calls.append("async")
        return compute(x)

    def sync_form(x: int) -> str:
        calls.append("sync")
        return compute(x)

    sync_fn = multilevel_cached(name="service.answer", ttl="1h", cache=make_cache(tiers))(sync_form)

    async def main() -> None:
        async_cache = TieredCache(Settings(tiers=tiers, tier_timeout="5s"))
        async_fn = multilevel_cached(name="service.answer", ttl="1h", cache=async_cache)(async_form)
        try:
            assert await async_fn(1) == "value-1"  # async computes ...
            assert await asyncio.to_thread(sync_fn, 1) == "value-1"  # ... sync reads it from Redis
            assert await asyncio.to_thread(sync_fn, 2) == "value-2"  # sync computes ...
            assert await async_fn(2) == "value-2"  # ... async reads it from Redis
            assert async_fn.cache_info().hits_by_tier == {"redis": 1}
        finally:
            await async_cache.aclose()

    asyncio.run(main())
    assert calls == ["async", "sync"]
    assert sync_fn.cache_info().hits_by_tier == {"redis": 1}
    entries = redis.Redis.from_url(redis_url).keys("cl:service.answer:*")
    assert len(entries) == 2


def test_exceptions_propagate_to_every_waiting_thread_and_are_not_cached() -> None:
    """The function's exception reaches the caller (and the threads that joined its flight); the next call
    computes again."""
    attempts = 0
    lock = threading.Lock()
    release = threading.Event()

    @multilevel_cached
    def flaky(x: int) -> int:
        nonlocal attempts
        with lock:
            attempts += 1
            first = attempts == 1
        if first:
            release.wait(5)
            raise ValueError("boom")
        return x

    def call(i: int) -> str | int:
        if i == 0:
            threading.Timer(0.05, release.set).start()
        try:
            return flaky(7)
        except ValueError as exc:
            return str(exc)

    outcomes = in_threads(8, call)
    assert "boom" in outcomes
    assert set(outcomes) <= {"boom", 7}
    assert flaky(7) == 7
    assert flaky(7) == 7
    assert attempts == 2


def test_invalidate_and_management_methods_block_and_work() -> None:
    """``invalidate``, ``invalidate_all`` and ``cache_clear`` of a sync function are sync too."""
    calls = 0

    @multilevel_cached
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    f(1), f(2)
    f.invalidate(1)
    f(1), f(2)
    assert calls == 3
    f.invalidate_all()
    f(1), f(2)
    assert calls == 5
    f.cache_clear()
    f(2)
    assert calls == 6


def test_a_memory_hit_is_answered_without_the_library_loop() -> None:
    """The memory tier is read in the calling thread: with the loop stopped, a hit does not start it again."""

    @multilevel_cached
    def f(x: int) -> int:
        return x + 1

    assert f(1) == 2
    library_loop.stop()
    assert library_loop.thread_id is None
    assert in_threads(4, lambda i: f(1)) == [2, 2, 2, 2]
    assert library_loop.thread_id is None
    assert f(2) == 3  # a miss starts it again
    assert library_loop.thread_id is not None


def test_called_inside_a_running_event_loop_it_answers_without_deadlock() -> None:
    """A sync cached function called from async code blocks that loop for the call, but completes: its
    engine runs on the library's own loop."""

    @multilevel_cached
    def f(x: int) -> int:
        return x * 2

    async def main() -> list[int]:
        return [f(1), f(1), f(2)]

    assert asyncio.run(main()) == [2, 2, 4]


def test_called_on_the_library_loop_thread_it_raises_instead_of_waiting_for_itself() -> None:
    """A sync call made by a callback running on the library's loop is a RuntimeError, not a hang."""

    @multilevel_cached
    def f(x: int) -> int:
        return x

    async def callback() -> int:
        return f(1)

    with pytest.raises(RuntimeError, match="own loop thread"):
        run(callback)


def test_a_sync_cached_function_calling_another_from_many_threads() -> None:
    """Nested sync calls (the outer function's body calls another cached function) hand each function back to
    the calling thread in turn; each runs once per key."""
    inner_calls: Counter[int] = Counter()
    outer_calls: Counter[int] = Counter()
    lock = threading.Lock()

    @multilevel_cached
    def inner(x: int) -> int:
        with lock:
            inner_calls[x] += 1
        return x * 10

    @multilevel_cached
    def outer(x: int) -> int:
        with lock:
            outer_calls[x] += 1
        return inner(x) + inner(x + 1)

    results = in_threads(16, lambda i: [outer(i % 4) for _ in range(10)])
    assert results == [[(i % 4) * 20 + 10] * 10 for i in range(16)]
    assert outer_calls == Counter(dict.fromkeys(range(4), 1))
    assert inner_calls == Counter(dict.fromkeys(range(5), 1))


def test_stacked_sync_decorators() -> None:
    """An exact cache over a rate limit over a ``def``: the limit is paid on misses only."""
    calls = 0

    @multilevel_cached
    @rate_limited("3/minute", timeout=0, limiter=RateLimiter(storage="memory://"))
    def ask(q: str) -> str:
        nonlocal calls
        calls += 1
        return q.upper()

    assert [ask("a"), ask("a"), ask("b"), ask("b"), ask("c")] == ["A", "A", "B", "B", "C"]
    assert calls == 3
    with pytest.raises(RateLimitExceeded):
        ask("d")


# -- batched and rate_limited --------------------------------------------------------------------------------


def test_batched_gathers_callers_from_many_threads_into_one_batch() -> None:
    """16 threads submit one item each: they share one batch (max_size=16), run in a worker thread, and each
    gets its own result."""
    batches: list[list[str]] = []
    batch_threads: set[int] = set()

    @batched(max_size=16, max_wait="30s")
    def embed(texts: list[str]) -> list[int]:
        batches.append(list(texts))
        batch_threads.add(threading.get_ident())
        return [len(t) for t in texts]

    callers: set[int] = set()

    def call(i: int) -> int:
        callers.add(threading.get_ident())
        return embed("x" * i)

    assert in_threads(16, call) == list(range(16))
    assert len(batches) == 1
    assert sorted(batches[0], key=len) == ["x" * i for i in range(16)]
    assert not batch_threads & callers
    info = embed.batch_info()
    assert info.batches == 1
    assert info.items == 16


def test_batched_many_flush_and_close() -> None:
    """``many`` submits several items; ``flush`` sends a partial batch; after ``close`` calls raise."""
    sizes: list[int] = []

    @batched(max_size=100, max_wait="30s")
    def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [2 * i for i in items]

    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(double(21)))
    thread.start()
    while double.batch_info().items < 1 and not sizes:
        double.flush()
        time.sleep(0.01)
    thread.join(10)
    assert results == [42]
    double.close()
    with pytest.raises(Exception, match="closed"):
        double(1)


def test_rate_limited_admits_exactly_the_limit_across_threads_without_waiting() -> None:
    """With ``timeout=0``, of 12 threads calling at once under 5/minute, exactly 5 run, 7 are refused."""
    ran: list[int] = []

    @rate_limited("5/minute", timeout=0, limiter=RateLimiter(storage="memory://"))
    def call(i: int) -> int:
        ran.append(i)
        return i

    def attempt(i: int) -> str:
        try:
            call(i)
        except RateLimitExceeded:
            return "refused"
        return "ran"

    outcomes = Counter(in_threads(12, attempt))
    assert outcomes == Counter(ran=5, refused=7)
    assert len(ran) == 5


def test_rate_limited_blocks_the_calling_threads_until_admitted() -> None:
    """Under 2 per second with room to wait, 5 threads calling at once all run (the later ones waited)."""
    ran: list[int] = []

    @rate_limited("2/second", timeout=10, limiter=RateLimiter(storage="memory://"))
    def call(i: int) -> int:
        ran.append(i)
        return i

    assert in_threads(5, call) == [0, 1, 2, 3, 4]
    assert sorted(ran) == [0, 1, 2, 3, 4]


# -- semantic ------------------------------------------------------------------------------------------------


def test_semantic_sync_single_flight_and_explain_in_the_calling_thread() -> None:
    """A sync semantic function: threads asking the same question compute once; ``explain`` and
    ``last_lookup`` in a thread see that thread's calls."""
    calls: list[str] = []
    lock = threading.Lock()

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9)
    def ask(question: str) -> str:
        with lock:
            calls.append(question)
        time.sleep(0.01)
        return f"answer to {question}"

    assert in_threads(8, lambda i: ask("c@0")) == ["answer to c@0"] * 8
    assert calls == ["c@0"]
    with explain() as info:
        assert ask("c@5") == "answer to c@0"
    assert [lookup.level for lookup in info] == ["semantic"]
    last = last_lookup()
    assert last is not None
    assert last.level == "semantic"
    ask.cache_clear()
    assert ask("c@0") == "answer to c@0"
    assert calls == ["c@0", "c@0"]


# -- interpreter exit ------------------------------------------------------------------------------------------


EXIT_SCRIPT = """
import sys, threading
from cachelayers import Settings, configure, multilevel_cached, batched

configure(Settings(tiers={{"memory": "memory://", "redis": "{redis}", "disk": "disk://{disk}"}}))

@multilevel_cached(ttl="1h", stale="1m")
def f(x: int) -> int:
    return x + 1

@batched(max_wait="10ms")
def g(items: list[int]) -> list[int]:
    return items

threads = [threading.Thread(target=lambda i=i: [f(i % 3), g(i)]) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f(1), g(5))
"""


@pytest.mark.redis
def test_interpreter_exit_is_clean(tmp_path: Path, redis_url: str) -> None:
    """A program using sync functions on Redis and disk tiers exits with status 0 and nothing on stderr (no
    pending task destroyed, no unclosed connection, no thread left hanging)."""
    script = EXIT_SCRIPT.format(disk=tmp_path / "disk", redis=redis_url)
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 5"
    assert done.stderr == ""


def test_a_plain_call_joining_an_async_computation_of_its_key_gets_the_value() -> None:
    """A ``def`` and an ``async def`` with one identity share entries (and single flight): a plain call made
    while the async call computes its key waits for it across the two loops, rather than forever."""
    runs: list[str] = []

    @multilevel_cached(ttl=60, name="tests.sync.shared")
    async def answer_async(q: str) -> str:
        runs.append("async")
        await asyncio.sleep(0.3)
        return f"answer to {q}"

    @multilevel_cached(ttl=60, name="tests.sync.shared")
    def answer_sync(q: str) -> str:
        runs.append("sync")
        return f"answer to {q}"

    async def main() -> tuple[str, str]:
        computing = asyncio.ensure_future(answer_async("q"))
        await asyncio.sleep(0.05)
        joined = await asyncio.wait_for(asyncio.to_thread(answer_sync, "q"), timeout=10)
        return await computing, joined

    assert asyncio.run(main()) == ("answer to q", "answer to q")
    assert runs == ["async"]  # the plain call waited for it: one computation
