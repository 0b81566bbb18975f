"""The rate limiter on a real Redis: across processes, Retry-After shared by every process, FIFO, returning
units (rollbacks, corrections, cancellation), storage failures, and where the storage URL comes from.

The multi-process test runs P = 4 processes x T = 20 tasks on one ``20 per 2 seconds`` limit and checks the
bound honestly. limits' moving window stores, for each admission, the client's clock read just before its
Lua script ran; that time lies between ``before`` and ``after`` of the storage call, and the moving window
guarantees at most N stored times in any closed window of W seconds. So the check is: no set of more than N
admissions whose whole ``[before, after]`` intervals fit in one window of W. (Counting the times the decorated
functions *started* instead can show N + 1 in a window: a body starts a round trip after its admission was
stored. The test prints that figure too.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cachelayers import BackendError, ConfigError, RateLimiter, RateLimitExceeded, Settings, rate_limited
from cachelayers.backends.limits_storage import limits_storage_url
from tests.redis_server import RedisServer
from tests.test_rate_limit import ProviderRateLimitError

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Settings(limits={"rpm": "5/second", "tiny": "2/second", "minute": "100/minute", "fast": "20/second"})


@pytest.fixture
def anyio_backend() -> str:
    """Redis needs asyncio."""
    return "asyncio"


@pytest.fixture
async def lim(redis_url: str) -> AsyncIterator[RateLimiter]:
    engine = RateLimiter(SETTINGS, storage=redis_url)
    yield engine
    await engine.aclose()


async def remaining(engine: RateLimiter, limit: str, key: str = "") -> int:
    return (await engine.window(limit, key))[1]


def worker(args: dict[str, Any], **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.rate_limit_worker", json.dumps(args)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, **popen)


# -- across processes -----------------------------------------------------------------------------------


def honest_max_in_window(grants: list[tuple[float, float]], window: float) -> int:
    """The most admissions whose whole [before, after] intervals fit in one closed window of ``window``."""
    grants = sorted(grants)
    best = 0
    for start, _ in grants:
        best = max(best, sum(1 for b, a in grants if b >= start and a <= start + window))
    return best


def naive_max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` in one closed window of ``window`` (ignores how uncertain each time is)."""
    times = sorted(times)
    return max(sum(1 for t in times if s <= t <= s + window) for s in times)


def test_four_processes_never_admit_more_than_the_limit_in_any_window(redis_url: str) -> None:
    processes, tasks, amount, window, windows = 4, 20, 20, 2.0, 3
    args = {"mode": "saturate", "url": redis_url, "limit": f"{amount} per {int(window)} seconds", "tasks": tasks}
    procs = [worker(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(processes)]
    for p in procs:  # every worker has imported and connected
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    start_at = time.time() + 0.3
    stop_at = start_at + windows * window + 0.5
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(json.dumps({"start_at": start_at, "stop_at": stop_at}) + "\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]

    grants = [tuple(g) for r in results for g in r["grants"]]
    calls = [tuple(c) for r in results for c in r["calls"]]
    assert len(grants) == len(calls)
    assert all(r["grants"] for r in results), "every process got admissions"
    honest = honest_max_in_window(grants, window)
    naive = naive_max_in_window([started for _, started in calls], window)
    first = min(before for before, _ in grants)
    used = sum(1 for _, after in grants if after <= first + windows * window)  # surely in the first 3 windows
    utilisation = used / (amount * windows)
    per_process = [(len(r["grants"]), round(r["info"]["window_calls_per_admission"], 2),
                    round(r["info"]["calls_per_admission"], 2)) for r in results]
    print(f"\n{processes} processes x {tasks} tasks, {amount} per {window:g}s: {len(grants)} admissions; "
          f"max in any {window:g}s window: {honest} (honest: whole [before, after] inside), {naive} counting body "
          f"starts; utilisation {utilisation:.1%} ({used}/{amount * windows} in {windows} windows); storage calls "
          f"per admission per process (admissions, window's, with pause reads) {per_process}; first admission "
          f"{first - start_at:+.2f}s after the start")
    assert honest <= amount
    assert honest == amount  # and the limit was reached
    assert utilisation >= 0.9


async def test_retry_after_from_one_process_pauses_the_others(redis_url: str) -> None:
    probe = worker({"mode": "probe", "url": redis_url, "limit": "100/second", "key": "gpt", "pause_check": 0.05},
                   stdin=subprocess.PIPE)
    engine = RateLimiter(Settings(limits={"shared": "100/second"}), storage=redis_url)  # as the probe's
    try:
        assert probe.stdout is not None
        assert probe.stdin is not None
        line = await anyio.to_thread.run_sync(probe.stdout.readline)
        assert line.strip() == "ready"

        @rate_limited("shared", key=lambda model, **_: model, limiter=engine)
        async def complete(model: str) -> None:
            raise ProviderRateLimitError("2")

        # The pause (Retry-After: 2 s) is set at some instant during this call: bracket it, so that a slow moment
        # of the machine between the pause and the next line cannot pass for the probe starting early.
        before = time.time()
        with pytest.raises(ProviderRateLimitError):
            await complete("gpt")
        after = time.time()
        probe.stdin.write("go\n")
        probe.stdin.flush()
        started = json.loads(await anyio.to_thread.run_sync(probe.stdout.readline))["started"]
        assert before + 2 - 0.05 <= started <= after + 2 + 0.5
    finally:
        probe.kill()
        probe.communicate()
        await engine.aclose()


async def test_a_busy_engine_learns_of_a_pause_within_pause_check(redis_url: str) -> None:
    here = RateLimiter(SETTINGS, storage=redis_url, pause_check=0.1)
    there = RateLimiter(SETTINGS, storage=redis_url, pause_check=0.1)
    try:
        await there.acquire("rpm", key="m")  # "there" has just synced: it will not look again for 0.1 s
        await here.pause("rpm", key="m", seconds=1.5)
        paused_at = time.time()
        await anyio.sleep(0.15)
        await there.acquire("rpm", key="m")
        assert time.time() - paused_at >= 1.49
        assert there.info().pauses == 1
    finally:
        await here.aclose()
        await there.aclose()


# -- fairness and returning units ----------------------------------------------------------------------------


async def test_fifo_per_key_in_a_process_over_redis(lim: RateLimiter) -> None:
    import itertools
    import random

    rng = random.Random(3)
    counter = itertools.count()
    granted: list[int] = []

    async def client(delay: float, cost: int) -> None:
        await anyio.sleep(delay)
        seq = next(counter)
        await lim.acquire("fast", cost=cost)
        granted.append(seq)

    async with anyio.create_task_group() as tg:
        for _ in range(25):
            tg.start_soon(client, rng.uniform(0, 1), rng.choice([1, 2, 3, 4]))
    assert len(granted) == 25
    assert granted == sorted(granted)
    assert lim.info().waited > 5


async def test_several_limits_over_redis_a_refused_attempt_gives_the_other_units_back(lim: RateLimiter) -> None:
    observed: list[int] = []

    async def observer() -> None:
        await anyio.sleep(0.5)
        observed.extend([await remaining(lim, "rpm"), await remaining(lim, "tiny")])

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lim.acquire, "rpm", "tiny")
        tg.start_soon(observer)
    assert observed == [3, 0]
    assert lim.info().refunds >= 1


async def test_actual_costs_are_charged_and_returned_over_redis(lim: RateLimiter) -> None:
    async with lim.limit("minute", cost=50) as permit:
        permit.report(20)
    assert await remaining(lim, "minute") == 80
    async with lim.limit("minute", cost=10) as permit:
        permit.report(30)
    assert await remaining(lim, "minute") == 50


async def test_cancelled_while_redis_hangs_the_head_gives_its_units_back(own_redis: RedisServer) -> None:
    engine = RateLimiter(SETTINGS, storage=own_redis.url)
    try:
        await engine.acquire("tiny")
        await engine.acquire("tiny")

        async def hang_redis_during_the_heads_call() -> None:
            await anyio.sleep(0.8)
            own_redis.pause()  # the head tries again at ~1.0 s: its call hangs
            await anyio.sleep(1.2)
            own_redis.resume()  # at 2.0 s the call completes (and succeeds): the engine must give it back

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang_redis_during_the_heads_call)
            with anyio.move_on_after(1.5) as scope:
                await engine.acquire("tiny")
        assert scope.cancelled_caught
        assert await remaining(engine, "tiny") == 2
        assert engine.info().cancelled == 1
    finally:
        own_redis.resume()
        await engine.aclose()


async def test_a_failing_storage_raises_backend_error_or_fails_open(own_redis: RedisServer) -> None:
    strict = RateLimiter(SETTINGS, storage=own_redis.url.replace("/0", "/0?timeout=0.5"))
    lenient = RateLimiter(SETTINGS, storage=own_redis.url.replace("/0", "/0?timeout=0.5"), fail_open=True)
    try:
        await strict.acquire("rpm")
        own_redis.kill()
        with pytest.raises(BackendError, match="rate-limit storage failed") as info:
            await strict.acquire("rpm")
        assert info.value.__cause__ is not None
        await lenient.acquire("rpm")  # lets the call through
    finally:
        await strict.aclose()
        await lenient.aclose()


# -- configuration ------------------------------------------------------------------------------------------


async def test_the_settings_redis_tier_is_the_default_storage(redis_url: str) -> None:
    engine = RateLimiter(Settings(tiers=["memory://", redis_url], limits={"rpm": "2/second"}))
    other = RateLimiter(Settings(tiers=["memory://", redis_url], limits={"rpm": "2/second"}))
    try:
        assert engine.storage_url == redis_url
        await engine.acquire("rpm")
        await other.acquire("rpm")  # another engine (think: process) on the same Redis
        with pytest.raises(RateLimitExceeded):
            await engine.acquire("rpm", timeout=0)
    finally:
        await engine.aclose()
        await other.aclose()


async def test_limits_are_shared_over_a_verified_tls_connection(tls_redis: tuple[RedisServer, int, str]) -> None:
    """``rediss://`` storage with the issuing CA: two engines (think: processes) share one limit over TLS, and
    without the CA the storage is refused rather than used unverified."""
    import redis

    server, tls_port, ca_file = tls_redis
    plain = redis.Redis(port=server.port)
    plain.flushall()
    url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca_file}&ssl_cert_reqs=required"
    one = RateLimiter(Settings(limits={"rpm": "2/second"}), storage=url)
    two = RateLimiter(Settings(limits={"rpm": "2/second"}), storage=url)
    unverified = RateLimiter(Settings(limits={"rpm": "2/second"}), storage=f"rediss://localhost:{tls_port}/0",
                             fail_open=False)
    try:
        await one.acquire("rpm")
        await two.acquire("rpm")
        with pytest.raises(RateLimitExceeded):
            await one.acquire("rpm", timeout=0)
        assert any(b"rl:" in key for key in plain.keys("*"))  # the windows live on that server
        with pytest.raises(BackendError):
            await unverified.acquire("rpm", timeout=0)
    finally:
        await one.aclose()
        await two.aclose()
        await unverified.aclose()
        plain.close()


def test_storage_urls_map_to_limits_urls() -> None:
    assert limits_storage_url("redis://:pw@h:6380/2?timeout=2s&max_connections=5") == (
        "async+redis://:pw@h:6380/2", {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "max_connections": 5})
    assert limits_storage_url("rediss://h:6380/0")[0] == "async+rediss://h:6380/0"
    assert limits_storage_url("redis+cluster://h:7000")[0] == "async+redis+cluster://h:7000"
    assert limits_storage_url("unix:///tmp/r.sock?db=3")[0] == "async+redis+unix:///tmp/r.sock?db=3"
    assert limits_storage_url("memory://") == ("memory://", {})
    assert limits_storage_url("async+redis://h:1") == ("async+redis://h:1", {})
    with pytest.raises(ConfigError) as info:
        limits_storage_url("memcached://h:11211", "storage")
    assert info.value.field == "storage"


def test_redis_storage_under_trio_is_a_clear_config_error(redis_url: str) -> None:
    engine = RateLimiter(SETTINGS, storage=redis_url)

    async def main() -> None:
        await engine.acquire("rpm")

    with pytest.raises(ConfigError, match="needs asyncio"):
        anyio.run(main, backend="trio")



async def test_an_absurd_retry_after_pauses_for_the_longest_lifetime_and_the_call_keeps_its_error(
        redis_url: str) -> None:
    """A provider's ``Retry-After: 1e30`` (or a pause of 1e30 s asked for) is more than Redis keeps: the pause is
    the longest lifetime instead, and the caller sees the provider's error, not Redis's "out of range"."""
    engine = RateLimiter(Settings(limits={"shared": "100/second"}), storage=redis_url)
    try:
        @rate_limited("shared", limiter=engine, timeout=0)
        async def complete() -> None:
            raise ProviderRateLimitError("1e30")

        with pytest.raises(ProviderRateLimitError):
            await complete()
        with pytest.raises(RateLimitExceeded):  # paused, in Redis too
            await complete()
        with pytest.raises(ConfigError, match="seconds"):
            await engine.pause("shared", seconds=1e30)
    finally:
        await engine.aclose()
