"""Single-flight and many concurrent calls: each key computed once, every caller gets its own value.

The functions under test wait on a gate that opens only once every task is blocked, so the overlap of the
calls is certain rather than a matter of timing.
"""

from __future__ import annotations

import random
import traceback
from typing import Any

import anyio
import pytest

from cachelayers import Settings, TieredCache, multilevel_cached
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

WAITERS = 50


class Gate:
    """A function body that records each run and waits until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.started: list[Any] = []

    async def run(self, key: Any) -> None:
        self.started.append(key)
        await self.opened.wait()


async def test_concurrent_calls_for_one_key_run_the_function_once(clock: FakeClock) -> None:
    """N concurrent callers of one key: one computation, N equal results, N-1 hits."""
    gate = Gate()

    @multilevel_cached(cache=TieredCache(Settings(), clock=clock))
    async def slow(x: int) -> dict[str, int]:
        await gate.run(x)
        return {"x": x}

    results: list[dict[str, int]] = []

    async def call() -> None:
        results.append(await slow(7))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(WAITERS):
                tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert gate.started == [7]
            gate.opened.set()
    assert results == [{"x": 7}] * WAITERS
    assert all(result is results[0] for result in results)  # the one computed object, shared
    info = slow.cache_info()
    assert (info.misses, info.hits) == (1, WAITERS - 1)


async def test_a_waiter_takes_over_when_the_computing_caller_is_cancelled(clock: FakeClock) -> None:
    """Cancelling the caller that computes never strands the others: one of them computes instead."""
    gate = Gate()

    @multilevel_cached(cache=TieredCache(Settings(), clock=clock))
    async def slow(x: int) -> str:
        await gate.run(x)
        return f"value {x}"

    results: list[str] = []
    first = anyio.CancelScope()

    async def computing_caller() -> None:
        with first:
            results.append(await slow(1))

    async def waiting_caller() -> None:
        results.append(await slow(1))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(computing_caller)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiting_caller)
            tg.start_soon(waiting_caller)
            await anyio.wait_all_tasks_blocked()
            assert gate.started == [1]
            first.cancel()
            await anyio.wait_all_tasks_blocked()
            assert gate.started == [1, 1]  # exactly one waiter took over
            gate.opened.set()
    assert first.cancelled_caught
    assert results == ["value 1", "value 1"]
    assert await slow(1) == "value 1"
    assert gate.started == [1, 1]


class Refused(Exception):
    """An error with extra state, as SDK errors carry (a status code)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status)
        self.status = status


@pytest.mark.parametrize("error", [LookupError("no result for 3"), Refused("no result for 3", 429)])
async def test_an_exception_reaches_every_waiter_and_is_not_cached(clock: FakeClock, error: Exception) -> None:
    """Concurrent callers share one failed computation, each raising its own copy of the failure (one shared
    exception object would gather every waiter's frames in its traceback); the next call computes again."""
    gate = Gate()
    fail = True

    @multilevel_cached(cache=TieredCache(Settings(), clock=clock))
    async def flaky(x: int) -> int:
        await gate.run(x)
        if fail:
            raise error
        return x

    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await flaky(3)
        except (LookupError, Refused) as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(WAITERS):
                tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            gate.opened.set()
    assert len(errors) == WAITERS
    assert {(type(exc), exc.args, getattr(exc, "status", None)) for exc in errors} == {
        (type(error), error.args, getattr(error, "status", None))}
    assert len({id(exc) for exc in errors}) == WAITERS
    assert max(len(traceback.extract_tb(exc.__traceback__)) for exc in errors) < 25
    assert gate.started == [3]
    fail = False
    assert await flaky(3) == 3
    assert await flaky(3) == 3
    assert gate.started == [3, 3]


async def test_a_thousand_concurrent_mixed_calls(clock: FakeClock) -> None:
    """1,000 concurrent calls of two functions over 80 keys, some cached beforehand, in every spelling:
    each caller gets the value of its own arguments and each uncached key is computed exactly once."""
    gate = Gate()
    cache = TieredCache(Settings(), clock=clock)

    @multilevel_cached(cache=cache)
    async def square(x: int, offset: int = 0) -> int:
        await gate.run(("square", x))
        return x * x + offset

    @multilevel_cached(cache=cache, tags=lambda word, **_: [word[:1]])
    async def shout(word: str) -> str:
        await gate.run(("shout", word))
        return word.upper()

    gate.opened.set()
    for x in range(0, 40, 4):  # pre-cache 10 of the 40 squares and 5 of the 40 words
        await square(x)
    for i in range(0, 40, 8):
        await shout(f"w{i}")
    precomputed = len(gate.started)
    gate.opened = anyio.Event()

    rng = random.Random(1234)
    calls: list[tuple[str, Any, Any]] = []
    for n in range(1000):
        if n % 2:
            x = rng.randrange(40)
            spelling = rng.choice(["positional", "keyword", "default"])
            calls.append(("square", (x, spelling), x * x))
        else:
            word = f"w{rng.randrange(40)}"
            calls.append(("shout", word, word.upper()))
    rng.shuffle(calls)
    results: list[tuple[Any, Any]] = []

    async def call(kind: str, args: Any, expected: Any) -> None:
        if kind == "square":
            n, spelling = args
            got: object = await (square(n) if spelling == "positional" else square(x=n) if spelling == "keyword"
                                 else square(n, offset=0))
        else:
            got = await shout(args)
        results.append((got, expected))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for kind, args, expected in calls:
                tg.start_soon(call, kind, args, expected)
            await anyio.wait_all_tasks_blocked()
            # Every uncached key is being computed at once: calls for different keys do not queue.
            expected_keys = ({("square", args[0]) for kind, args, _ in calls if kind == "square"}
                             | {("shout", args) for kind, args, _ in calls if kind == "shout"})
            already = set(gate.started[:precomputed])
            assert set(gate.started[precomputed:]) == expected_keys - already
            gate.opened.set()

    assert len(results) == 1000
    assert all(got == expected for got, expected in results)
    computed = gate.started[precomputed:]
    assert len(computed) == len(set(computed)) == len(expected_keys - already)
    info_square, info_shout = square.cache_info(), shout.cache_info()
    assert info_square.hits + info_square.misses == 500 + 10
    assert info_shout.hits + info_shout.misses == 500 + 5
    assert info_square.misses + info_shout.misses == len(gate.started)


async def test_cancelling_a_waiter_leaves_the_others_alone(clock: FakeClock) -> None:
    """A waiter that gives up does not cancel the computation nor the other waiters."""
    gate = Gate()

    @multilevel_cached(cache=TieredCache(Settings(), clock=clock))
    async def slow(x: int) -> int:
        await gate.run(x)
        return x + 1

    results: list[int] = []
    impatient = anyio.CancelScope()

    async def call(scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            results.append(await slow(1))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, impatient)
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            impatient.cancel()
            await anyio.wait_all_tasks_blocked()
            gate.opened.set()
    assert impatient.cancelled_caught
    assert results == [2, 2]
    assert gate.started == [1]


@pytest.mark.parametrize("how", ["arguments", "tag", "namespace", "clear"])
async def test_an_invalidation_during_a_computation_wins(clock: FakeClock, how: str) -> None:
    """A result computed while its entry was invalidated reaches its caller but is not stored: the next call
    computes again instead of serving a value from before the invalidation."""
    gate = Gate()
    cache = TieredCache(Settings(), clock=clock)

    @multilevel_cached(cache=cache, tags=["catalog"], namespace="prices")
    async def price(item: int) -> int:
        await gate.run(item)
        return len(gate.started)

    results: list[int] = []

    async def call() -> None:
        results.append(await price(7))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            if how == "arguments":
                await price.invalidate(7)
            elif how == "tag":
                await cache.invalidate_tags("catalog")
            elif how == "namespace":
                await cache.invalidate_namespace("prices")
            else:
                await cache.clear()
            gate.opened.set()
    assert results == [1]
    assert await price(7) == 2
    assert await price(7) == 2

