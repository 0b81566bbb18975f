"""@batched and its engine `Batcher`: triggers, timers, dedupe, order, errors, cancellation, shutdown, loops.

Tests that depend on time run on virtual time (`tests.virtual_time`): timers fire exactly on time without
sleeping. The others never depend on time: their ``max_wait`` is long and batches go by size or by ``flush()``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, assert_type

import anyio
import numpy as np
import numpy.typing as npt
import pytest
import trio

import cachelayers
from cachelayers import (
    BatchedFunction,
    Batcher,
    BatcherClosedError,
    BatchError,
    BatchQueueFullError,
    ConfigError,
    SyncBatchedFunction,
    batched,
    multilevel_cached,
)
from tests.virtual_time import VIRTUAL_BACKENDS, run_virtual

pytestmark = pytest.mark.anyio

LONG = 3600.0  # a max_wait no test waits for: those batches go by size or flush()


class Provider:
    """A fake batch provider: records every batch, can hold batches until released, answers ``r:<item>``."""

    def __init__(self, *, hold: bool = False, duration: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.started_at: list[float] = []
        self.in_flight = 0
        self.peak = 0
        self.completed = 0
        self.cancelled = 0
        self.hold = hold
        self.duration = duration
        self._released: anyio.Event | None = None
        self.answer: Callable[[list[Any]], Any] = lambda items: [f"r:{x}" for x in items]

    async def __call__(self, items: list[Any], /, **kwargs: Any) -> Any:
        self.batches.append(list(items))
        self.kwargs.append(kwargs)
        self.started_at.append(anyio.current_time())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold:
                if self._released is None:
                    self._released = anyio.Event()
                await self._released.wait()
            if self.duration:
                await anyio.sleep(self.duration)
            result = self.answer(items)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        self.completed += 1
        return result

    def release(self) -> None:
        """Let held batches (and every later one) complete."""
        self.hold = False
        if self._released is not None:
            self._released.set()


class Caller:
    """One caller of a batched function, in its own cancel scope so a test can cancel it alone."""

    def __init__(self, call: Callable[[], Awaitable[Any]]) -> None:
        self.call = call
        self.scope = anyio.CancelScope()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = False
        self.finished = False
        self.cancelled = False

    async def run(self) -> None:
        self.started = True
        with self.scope:
            try:
                self.result = await self.call()
            except Exception as exc:
                self.error = exc
            self.finished = True
            return
        self.cancelled = True


async def start(tg: anyio.abc.TaskGroup, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Caller:
    """Start a caller of ``fn(*args, **kwargs)`` and return once its item is in (or it waits for room).

    Callers start one after the other, so the order of items is the order of the calls on every backend
    (trio runs newly started tasks in random order).
    """
    caller = Caller(functools.partial(fn, *args, **kwargs))
    tg.start_soon(caller.run)
    await settle(lambda: caller.started)
    return caller


async def settle(condition: Callable[[], bool], rounds: int = 500) -> None:
    """Let other tasks run (checkpoints, not time) until ``condition`` holds."""
    for _ in range(rounds):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


@pytest.fixture
async def loop_errors(anyio_backend: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """On asyncio, what reaches the loop's exception handler ("exception was never retrieved" and the like)."""
    errors: list[dict[str, Any]] = []
    name = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if name != "asyncio":
        yield errors
        return
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()  # unretrieved exceptions are reported when their future is collected
    await anyio.lowlevel.checkpoint()
    loop.set_exception_handler(previous)
    assert errors == []


# -- configuration -------------------------------------------------------------------------------------------


async def _items(items: list[str]) -> list[str]:
    return items


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_size": 0}, "max_size"),
    ({"max_size": -3}, "max_size"),
    ({"max_size": True}, "max_size"),
    ({"max_size": 2.5}, "max_size"),
    ({"max_wait": "soon"}, "max_wait"),
    ({"max_wait": -0.1}, "max_wait"),
    ({"max_wait": float("nan")}, "max_wait"),
    ({"max_weight": 0, "weight": len}, "max_weight"),
    ({"max_weight": -1, "weight": len}, "max_weight"),
    ({"max_weight": float("inf"), "weight": len}, "max_weight"),
    ({"max_weight": 100}, "weight"),
    ({"weight": len}, "weight"),
    ({"max_weight": 10, "weight": "len"}, "weight"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"max_queue": 0}, "max_queue"),
    ({"queue_full": "drop"}, "queue_full"),
    ({"key": "id"}, "key"),
    ({"dedupe": "yes"}, "dedupe"),
])
def test_bad_configuration_is_a_config_error_at_decoration(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        batched(**kwargs)(_items)
    assert info.value.field == field


def test_a_non_function_is_a_type_error_and_a_sync_function_a_sync_batched_function() -> None:
    """(Issue 14 made sync batch functions welcome; their behaviour is tested in tests/test_sync.py.)"""
    def sync(items: list[str]) -> list[str]:
        return items

    with pytest.raises(TypeError, match="needs a function"):
        batched(max_size=2)("not a function")  # type: ignore[call-overload]
    assert isinstance(batched(sync), SyncBatchedFunction)


def test_a_misspelt_option_is_a_type_error_at_decoration() -> None:
    """The options are declared once (BatchOptions): the decorator and the engine refuse any other keyword."""
    with pytest.raises(TypeError, match="max_sise"):
        batched(max_sise=4)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="maxsize"):
        Batcher(_items, maxsize=4)  # type: ignore[call-arg]


def test_max_wait_accepts_strings_and_zero() -> None:
    assert Batcher(_items, max_wait="5ms").max_wait == pytest.approx(0.005)
    assert Batcher(_items, max_wait=0).max_wait == 0.0


def test_construction_binds_nothing_to_an_event_loop() -> None:
    """Decorating and constructing outside any event loop works (module import time)."""
    fn: BatchedFunction[str, [], str] = batched(max_size=4)(_items)
    assert len(fn.batcher._loops) == 0
    assert fn.__name__ == "_items"
    assert repr(fn) == "<batched tests.test_batching._items>"
    assert fn.__wrapped__ is _items


async def test_types_of_the_decorated_function() -> None:
    @batched
    async def embed(texts: list[str], *, model: str = "m") -> list[float]:
        return [float(len(t)) for t in texts]

    @batched(max_size=8)
    async def rows(texts: list[str]) -> npt.NDArray[np.float32]:
        return np.zeros((len(texts), 3), dtype=np.float32)

    assert_type(await embed("abc", model="x"), float)
    assert_type(await embed.many(["a", "bb"]), list[float])
    assert await embed("abc", model="x") == 3.0
    row = await rows("a")
    assert row.shape == (3,)


# -- when a batch goes ---------------------------------------------------------------------------------------


async def test_a_full_batch_goes_at_once_without_waiting_for_its_timer() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, f"x{i}") for i in range(7)]
            await settle(lambda: sum(c.finished for c in callers) == 6)
            assert provider.batches == [["x0", "x1", "x2"], ["x3", "x4", "x5"]]
            assert not callers[6].finished  # alone in an open batch whose timer is an hour away
            b.flush()
    assert provider.batches[2] == ["x6"]
    assert [c.result for c in callers] == [f"r:x{i}" for i in range(7)]


async def test_a_batch_goes_when_its_weight_is_reached_and_a_heavy_item_goes_alone() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=100, max_wait=LONG, max_weight=10, weight=len)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for text in ["aaaa", "bbbb", "cc", "ddd", "e" * 25, "ff"]:
                await start(tg, b.submit, text)
            await settle(lambda: len(provider.batches) == 3)
            b.flush()
    # aaaa+bbbb+cc = 10 (full); ddd would overflow with the heavy item, which goes alone; ff is flushed.
    # (ddd's batch and the heavy one close together: either may be sent first.)
    assert sorted(provider.batches) == [["aaaa", "bbbb", "cc"], ["ddd"], ["e" * 25], ["ff"]]
    assert all(sum(map(len, batch)) <= 10 or len(batch) == 1 for batch in provider.batches)


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_batch_goes_exactly_max_wait_after_its_first_item() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=100, max_wait=0.05)
    with anyio.fail_after(60):
        start_time = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.submit, "a")
            await anyio.sleep(0.03)
            tg.start_soon(b.submit, "b")  # joins the open batch: does not restart its timer
            await anyio.sleep(0.04)  # 0.07: the first batch went at 0.05
            tg.start_soon(b.submit, "c")  # a new batch, with its own timer
    assert provider.batches == [["a", "b"], ["c"]]
    assert provider.started_at[0] - start_time == pytest.approx(0.05, abs=1e-9)
    assert provider.started_at[1] - start_time == pytest.approx(0.12, abs=1e-9)


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_max_wait_zero_batches_what_arrives_in_the_same_round() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=100, max_wait=0)
    with anyio.fail_after(60):
        assert await b.submit_many(["a", "b", "c"]) == ["r:a", "r:b", "r:c"]
    assert provider.batches == [["a", "b", "c"]]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # counts asyncio's timer handles
async def test_one_timer_per_batch_on_asyncio() -> None:
    """Every item of a batch shares its one timer: the loop schedules exactly one timer for the batch."""
    loop = asyncio.get_running_loop()
    provider = Provider()
    b = Batcher(provider, max_size=100, max_wait=0.01)
    created: list[float] = []
    original = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        created.append(when)
        return original(when, callback, *args, context=context)

    loop.call_at = counting_call_at  # type: ignore[method-assign, assignment]
    try:
        results = await asyncio.gather(*(b.submit(f"x{i}") for i in range(20)))
    finally:
        loop.call_at = original  # type: ignore[method-assign]
    assert results == [f"r:x{i}" for i in range(20)]
    assert provider.batches == [[f"x{i}" for i in range(20)]]
    assert len(created) == 1


async def test_an_idle_batcher_has_no_task_no_timer_and_never_wakes_the_loop(anyio_backend: str) -> None:
    """After its batches are done, a batcher leaves nothing behind that could wake the event loop.

    The count of loop iterations while idle is compared with a poller's in the same test, to show the
    measure would catch one.
    """
    provider = Provider()
    b = Batcher(provider, max_size=4, max_wait=0.002)
    if anyio_backend == "trio":
        before = trio.lowlevel.current_statistics()
    else:
        loop = asyncio.get_running_loop()
        tasks_before = asyncio.all_tasks()
        timers_before = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert await b.submit_many([f"x{i}" for i in range(10)]) == [f"r:x{i}" for i in range(10)]
    await b.submit("y")  # one batch going by its timer
    await anyio.lowlevel.checkpoint()

    if anyio_backend == "trio":
        after = trio.lowlevel.current_statistics()
        assert after.seconds_to_next_deadline == before.seconds_to_next_deadline == float("inf")  # no timer
        assert after.tasks_living == before.tasks_living
        return

    assert asyncio.all_tasks() == tasks_before
    assert [h for h in loop._scheduled if not h.cancelled()] == timers_before == []  # type: ignore[attr-defined]
    selector = loop._selector  # type: ignore[attr-defined]
    iterations = 0
    real_select = selector.select

    def counting_select(timeout: float | None = None) -> Any:
        nonlocal iterations
        iterations += 1
        return real_select(timeout)

    selector.select = counting_select
    try:
        await anyio.sleep(0.05)  # idle: our own sleep is the only thing that may wake the loop
        idle_iterations = iterations
        iterations = 0

        for _ in range(20):  # the control: a poller's 20 naps, each a wake-up the counter must see
            await anyio.sleep(0.001)
        polling_iterations = iterations
    finally:
        selector.select = real_select
    assert idle_iterations <= 3
    assert polling_iterations >= 20


# -- dedupe, order, shared arguments -------------------------------------------------------------------------


async def test_identical_pending_items_are_sent_once_and_every_caller_gets_the_result() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=100, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b", "a", "c", "a", "b"]]
            await settle(lambda: b.info().calls == 6)
            b.flush()
    assert provider.batches == [["a", "b", "c"]]
    assert [c.result for c in callers] == ["r:a", "r:b", "r:a", "r:c", "r:a", "r:b"]
    info = b.info()
    assert (info.calls, info.deduplicated, info.items, info.batches) == (6, 3, 3, 1)


async def test_an_identical_item_joins_one_in_flight() -> None:
    provider = Provider(hold=True)
    b = Batcher(provider, max_size=1, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = await start(tg, b.submit, "a")
            await settle(lambda: provider.in_flight == 1)
            second = await start(tg, b.submit, "a")
            await settle(lambda: b.info().deduplicated == 1)
            provider.release()
    assert provider.batches == [["a"]]
    assert first.result == second.result == "r:a"


async def test_dedupe_by_key_or_turned_off() -> None:
    provider = Provider()
    by_key = Batcher(provider, max_size=3, max_wait=LONG, key=str.lower)
    with anyio.fail_after(5):
        assert await by_key.submit_many(["A", "a", "b", "c"]) == ["r:A", "r:A", "r:b", "r:c"]
    assert provider.batches == [["A", "b", "c"]]

    provider = Provider()
    every = Batcher(provider, max_size=3, max_wait=LONG, dedupe=False)
    with anyio.fail_after(5):
        assert await every.submit_many(["a", "a", "a"]) == ["r:a"] * 3
    assert provider.batches == [["a", "a", "a"]]


async def test_default_dedupe_keeps_equal_values_of_different_types_apart_and_sends_unhashables() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=5, max_wait=LONG)
    with anyio.fail_after(5):
        results = await b.submit_many([1, 1.0, True, [1], [1], 1])
    assert provider.batches == [[1, 1.0, True, [1], [1]]]
    assert results == ["r:1", "r:1.0", "r:True", "r:[1]", "r:[1]", "r:1"]


async def test_items_reach_the_function_in_order_and_results_come_back_in_order() -> None:
    provider = Provider()
    provider.answer = lambda items: [x * 10 for x in items]
    b = Batcher(provider, max_size=50, max_wait=LONG)
    order = list(range(50))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, i) for i in order]
    assert provider.batches == [order]
    assert [c.result for c in callers] == [i * 10 for i in order]


async def test_calls_with_different_shared_arguments_never_share_a_batch() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=2, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [
                await start(tg, b.submit, "a", model="x"),
                await start(tg, b.submit, "a", model="y"),
                await start(tg, b.submit, "b", model="x"),
                await start(tg, b.submit, "b", model="y", tags=["t"]),  # unhashable: grouped canonically
                await start(tg, b.submit, "c", tags=["t"], model="y"),
            ]
            await settle(lambda: len(provider.batches) == 2)  # the two full ones
            b.flush()
    assert [c.result for c in callers] == ["r:a", "r:a", "r:b", "r:b", "r:c"]
    batches = {(tuple(batch), repr(sorted(kw.items()))) for batch, kw in zip(provider.batches, provider.kwargs,
                                                                             strict=True)}
    assert batches == {(("a", "b"), "[('model', 'x')]"), (("a",), "[('model', 'y')]"),
                       (("b", "c"), "[('model', 'y'), ('tags', ['t'])]")}


# -- errors --------------------------------------------------------------------------------------------------


async def test_an_exception_returned_for_one_item_reaches_only_its_callers() -> None:
    provider = Provider()
    boom = ValueError("bad item b")
    provider.answer = lambda items: [boom if x == "b" else f"r:{x}" for x in items]
    b = Batcher(provider, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b", "c", "b"]]
            b.flush()  # the second b joined the first, or (if that batch was done) waits in a batch of its own
    assert [c.result for c in callers] == ["r:a", None, "r:c", None]
    assert callers[1].error is boom
    assert callers[3].error is boom
    assert callers[0].error is None
    assert callers[2].error is None
    assert b.info().failed_batches == 0


async def test_key_or_weight_failing_for_one_item_fails_only_that_caller() -> None:
    provider = Provider()

    def key(item: str) -> str:
        if item == "bad-key":
            raise KeyError(item)
        return item

    def weight(item: str) -> float:
        return -1 if item == "bad-weight" else 1

    b = Batcher(provider, max_size=3, max_wait=LONG, key=key, max_weight=100, weight=weight)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "bad-key", "bad-weight", "b", "c"]]
    assert isinstance(callers[1].error, KeyError)
    assert isinstance(callers[2].error, ValueError)
    assert "weight=" in str(callers[2].error)
    assert [callers[i].result for i in (0, 3, 4)] == ["r:a", "r:b", "r:c"]
    assert provider.batches == [["a", "b", "c"]]


async def test_a_failed_batch_fails_each_of_its_callers_with_the_cause_and_the_next_batch_works() -> None:
    provider = Provider()
    cause = RuntimeError("provider down")

    def answer(items: list[Any]) -> list[str]:
        if "boom" in items:
            raise cause
        return [f"r:{x}" for x in items]

    provider.answer = answer
    b = Batcher(provider, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "boom", "c"]]
        assert await b.submit_many(["d", "e", "f"]) == ["r:d", "r:e", "r:f"]
    for caller in callers:
        assert isinstance(caller.error, BatchError)
        assert caller.error.__cause__ is cause
        assert caller.error.batch_size == 3
        assert "provider down" in str(caller.error)
    assert b.info().failed_batches == 1


@pytest.mark.parametrize(("answer", "message"), [
    (lambda items: [f"r:{x}" for x in items][:-1], "returned a list of 2 results; expected 3, one per item"),
    (lambda items: [*items, "extra", "more"], "returned a list of 5 results"),
    (lambda items: None, "returned a NoneType"),
    (lambda items: (f"r:{x}" for x in items), "returned a generator"),
])
async def test_a_length_mismatch_or_unsized_result_is_an_error_to_all(answer: Callable[[list[Any]], Any],
                                                                       message: str) -> None:
    provider = Provider()
    provider.answer = answer
    b = Batcher(provider, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b", "c"]]
    for caller in callers:
        assert isinstance(caller.error, BatchError)
        assert message in str(caller.error)


async def test_an_array_result_gives_each_caller_its_own_row_copied() -> None:
    async def embed(texts: list[str]) -> npt.NDArray[np.float64]:
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float64)

    b = Batcher(embed, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        rows = await b.submit_many(["a", "bb", "ccc"])
    assert [row.tolist() for row in rows] == [[1, 0], [2, 1], [3, 2]]
    assert all(row.base is None for row in rows)  # not views pinning the whole batch's array


# -- cancellation ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("loop_errors")
async def test_cancelling_one_caller_before_dispatch_drops_its_item_and_spares_the_others() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = {t: await start(tg, b.submit, t) for t in ["a", "b", "c"]}
            await settle(lambda: b.info().pending == 3)
            callers["b"].scope.cancel()
            await settle(lambda: b.info().pending == 2)
            b.flush()
    assert provider.batches == [["a", "c"]]
    assert callers["b"].cancelled
    assert not callers["b"].finished
    assert (callers["a"].result, callers["c"].result) == ("r:a", "r:c")
    assert b.info().dropped == 1


@pytest.mark.usefixtures("loop_errors")
async def test_an_item_stays_while_any_of_its_callers_waits() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = await start(tg, b.submit, "a")
            second = await start(tg, b.submit, "a")
            await settle(lambda: b.info().calls == 2)
            first.scope.cancel()
            await settle(lambda: first.cancelled)
            b.flush()
    assert provider.batches == [["a"]]
    assert first.cancelled
    assert second.result == "r:a"
    assert b.info().dropped == 0


@pytest.mark.usefixtures("loop_errors")
async def test_cancelling_the_caller_that_opened_the_batch_does_not_stop_the_batch() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            opener = await start(tg, b.submit, "a")
            others = [await start(tg, b.submit, "b")]
            await settle(lambda: b.info().pending == 2)
            opener.scope.cancel()  # its task spawned the batch's task: that one goes on
            await settle(lambda: opener.cancelled)
            others += [await start(tg, b.submit, t) for t in ["c", "d"]]
    assert provider.batches == [["b", "c", "d"]]
    assert [c.result for c in others] == ["r:b", "r:c", "r:d"]


@pytest.mark.usefixtures("loop_errors")
async def test_when_every_caller_cancels_the_batch_is_never_sent_and_nothing_is_left_running() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b"]]
            await settle(lambda: b.info().pending == 2)
            for caller in callers:
                caller.scope.cancel()
        await settle(lambda: not b._loop().batches)
    assert provider.batches == []
    assert b.info().dropped == 2
    assert b.info().pending == 0
    async with anyio.create_task_group() as tg:  # and the batcher still works
        later = await start(tg, b.submit, "c")
        await settle(lambda: b.info().pending == 1)
        b.flush()
    assert later.result == "r:c"
    assert provider.batches == [["c"]]


@pytest.mark.usefixtures("loop_errors")
async def test_cancelling_a_caller_after_dispatch_cancels_nothing_else() -> None:
    provider = Provider(hold=True)
    b = Batcher(provider, max_size=3, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b", "c"]]
            await settle(lambda: provider.in_flight == 1)
            callers[1].scope.cancel()
            await settle(lambda: callers[1].cancelled)
            provider.release()
    assert provider.cancelled == 0
    assert provider.completed == 1
    assert (callers[0].result, callers[2].result) == ("r:a", "r:c")
    assert callers[1].cancelled
    assert callers[1].result is None


@pytest.mark.usefixtures("loop_errors")
async def test_a_batch_failing_after_its_only_caller_cancelled_leaves_no_unretrieved_error() -> None:
    provider = Provider(hold=True)

    def fail(items: list[Any]) -> list[Any]:
        raise RuntimeError("nobody is listening")

    provider.answer = fail
    b = Batcher(provider, max_size=1, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            caller = await start(tg, b.submit, "a")
            await settle(lambda: provider.in_flight == 1)
            caller.scope.cancel()
            await settle(lambda: caller.cancelled)
            provider.release()
        await settle(lambda: not b._loop().batches)
    assert b.info().failed_batches == 1


@pytest.mark.usefixtures("loop_errors")
async def test_cancelling_a_caller_of_many_drops_only_its_unsent_items() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            many = await start(tg, b.submit_many, ["a", "b", "c"])
            single = await start(tg, b.submit, "b")
            await settle(lambda: b.info().calls == 4)
            many.scope.cancel()
            await settle(lambda: many.cancelled)
            b.flush()
    assert provider.batches == [["b"]]
    assert single.result == "r:b"


async def test_many_raises_the_first_error_and_drops_its_unsent_items() -> None:
    provider = Provider()

    def key(item: str) -> str:
        if item == "bad":
            raise KeyError(item)
        return item

    b = Batcher(provider, max_size=10, max_wait=LONG, key=key)
    with anyio.fail_after(5), pytest.raises(KeyError):
        await b.submit_many(["a", "b", "bad", "c"])
    await settle(lambda: not b._loop().batches)
    assert provider.batches == []
    assert b.info().dropped == 2


# -- concurrency and queue ---------------------------------------------------------------------------------------


async def test_max_concurrency_bounds_batches_in_flight_and_slots_go_first_come_first_served() -> None:
    batches: list[list[int]] = []
    gates: list[anyio.Event] = []
    in_flight = peak = 0

    async def held(items: list[int]) -> list[str]:
        nonlocal in_flight, peak
        gate = anyio.Event()
        batches.append(items)
        gates.append(gate)
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()  # each batch runs until the test lets it finish
        in_flight -= 1
        return [f"r:{i}" for i in items]

    b = Batcher(held, max_size=2, max_wait=LONG, max_concurrency=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, i) for i in range(10)]
            await settle(lambda: in_flight == 2)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert batches == [[0, 1], [2, 3]]  # the other three wait in line
            # finishing one batch hands its slot to the oldest batch waiting, and to no other
            for finished, expected in [(1, [4, 5]), (0, [6, 7]), (2, [8, 9])]:
                count = len(batches)
                gates[finished].set()
                await settle(lambda: len(batches) == count + 1)  # noqa: B023 - read at once, in this iteration
                assert batches[-1] == expected
                assert in_flight == 2
            for gate in gates:
                gate.set()
    assert peak == 2
    assert [c.result for c in callers] == [f"r:{i}" for i in range(10)]


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_due_batch_keeps_filling_while_it_waits_for_a_slot() -> None:
    release = anyio.Event()
    batches: list[list[str]] = []

    async def slow(items: list[str]) -> list[str]:
        batches.append(items)
        if len(batches) == 1:
            await release.wait()
        return items

    b = Batcher(slow, max_size=10, max_wait=0.01, max_concurrency=1)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.submit, "first")
            await anyio.sleep(0.02)  # the first batch is in flight, holding the only slot
            for item in ["a", "b"]:
                tg.start_soon(b.submit, item)
            await anyio.sleep(0.05)  # the second batch is due but has no slot...
            for item in ["c", "d"]:
                tg.start_soon(b.submit, item)  # ...so it still takes these
            await anyio.sleep(0.05)
            release.set()
    assert batches[0] == ["first"]
    assert sorted(batches[1]) == ["a", "b", "c", "d"]  # (started together, they arrive in any order)
    assert len(batches) == 2


async def test_a_full_queue_makes_callers_wait_for_room() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG, max_queue=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b", "c"]]
            await settle(lambda: b.info().pending == 2)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert b.info().pending == 2
            assert not callers[2].finished
            dup = await start(tg, b.submit, "a")  # identical to a pending item: needs no room
            await settle(lambda: b.info().deduplicated == 1)
            b.flush()  # a and b leave the queue: c gets in
            await settle(lambda: b.info().pending == 1)
            b.flush()
    assert provider.batches == [["a", "b"], ["c"]]
    assert [c.result for c in [*callers, dup]] == ["r:a", "r:b", "r:c", "r:a"]


async def test_a_full_queue_raises_when_told_to() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG, max_queue=2, queue_full="raise")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b"]]
            await settle(lambda: b.info().pending == 2)
            with pytest.raises(BatchQueueFullError, match="max_queue=2"):
                await b.submit("c")
            b.flush()
    assert [c.result for c in callers] == ["r:a", "r:b"]
    assert b.info().rejected == 1


@pytest.mark.usefixtures("loop_errors")
async def test_a_caller_cancelled_while_waiting_for_room_takes_none() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG, max_queue=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = await start(tg, b.submit, "a")
            waiting = await start(tg, b.submit, "b")
            await settle(lambda: b.info().pending == 1)
            waiting.scope.cancel()
            await settle(lambda: waiting.cancelled)
            b.flush()
    assert provider.batches == [["a"]]
    assert first.result == "r:a"
    assert b.info().pending == 0
    assert b.info().calls == 1


# -- shutdown ----------------------------------------------------------------------------------------------------


async def test_aclose_flushes_pending_items_and_waits_for_every_caller() -> None:
    provider = Provider(duration=0.001)
    b = Batcher(provider, max_size=10, max_wait=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, b.submit, t) for t in ["a", "b", "c"]]
            await settle(lambda: b.info().pending == 3)
            await b.aclose()
            # it returned only once the batch had completed: every caller has its answer
            assert provider.completed == 1
            assert b.info().in_flight == 0
            assert b.info().pending == 0
    assert [c.result for c in callers] == ["r:a", "r:b", "r:c"]
    assert b.closed
    with pytest.raises(BatcherClosedError):
        await b.submit("d")


async def test_aclose_without_flush_rejects_pending_items_and_completes_in_flight_ones() -> None:
    provider = Provider(hold=True)
    b = Batcher(provider, max_size=2, max_wait=LONG, max_queue=3, max_concurrency=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            sent = [await start(tg, b.submit, t) for t in ["a", "b"]]
            await settle(lambda: provider.in_flight == 1)
            pending = [await start(tg, b.submit, t) for t in ["c", "d", "e", "f"]]  # f waits for room
            await settle(lambda: b.info().pending == 3)
            closing = await start(tg, b.aclose, flush=False)
            await settle(lambda: all(c.finished for c in pending))
            assert not closing.finished  # still waiting for the batch in flight
            provider.release()
    assert [c.result for c in sent] == ["r:a", "r:b"]
    assert all(isinstance(c.error, BatcherClosedError) for c in pending)
    assert provider.batches == [["a", "b"]]
    assert closing.finished


async def test_the_context_manager_flushes_on_exit() -> None:
    provider = Provider()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, Batcher(provider, max_size=10, max_wait=LONG) as b:
            callers = [await start(tg, b.submit, t) for t in ["a", "b"]]
            await settle(lambda: b.info().pending == 2)
    assert [c.result for c in callers] == ["r:a", "r:b"]


async def test_the_decorated_function_closes_too() -> None:
    provider = Provider()
    fn = batched(max_size=10, max_wait=LONG)(provider)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, fn:
            caller = await start(tg, fn, "a")
            await settle(lambda: fn.batch_info().pending == 1)
    assert caller.result == "r:a"
    with pytest.raises(BatcherClosedError):
        await fn("b")


# -- event loops -------------------------------------------------------------------------------------------------

_module_provider = Provider()
module_level = batched(max_size=4, max_wait=0.001)(_module_provider)


def test_one_batcher_serves_repeated_asyncio_runs_and_trio() -> None:
    """Not bound to the first event loop: a module-level batched function works in each new loop."""

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(module_level(f"x{i}") for i in range(6))))

    for _ in range(3):
        assert asyncio.run(main()) == [f"r:x{i}" for i in range(6)]

    async def trio_main() -> list[Any]:
        return await module_level.many([f"y{i}" for i in range(6)])

    assert trio.run(trio_main) == [f"r:y{i}" for i in range(6)]
    assert asyncio.run(main()) == [f"r:x{i}" for i in range(6)]


def test_a_loop_that_ends_with_pending_items_leaves_nothing_behind() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=10, max_wait=LONG)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def abandon() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        asyncio.get_running_loop().create_task(b.submit("orphan"))
        await asyncio.sleep(0)  # the item is pending when the loop ends

    asyncio.run(abandon())
    gc.collect()
    assert loops[0]() is None  # the dead loop was not kept alive by the batcher
    assert len(b._loops) == 0

    async def later() -> Any:
        task = asyncio.get_running_loop().create_task(b.submit("fresh"))
        await asyncio.sleep(0)
        b.flush()
        return await task

    assert asyncio.run(later()) == "r:fresh"
    assert provider.batches == [["fresh"]]


def test_threads_with_their_own_loops_share_one_batcher() -> None:
    import threading

    provider = Provider()
    b = Batcher(provider, max_size=3, max_wait=0.001)
    results: dict[int, list[Any]] = {}

    def worker(n: int) -> None:
        async def main() -> list[Any]:
            return await b.submit_many([f"{n}-{i}" for i in range(5)])

        results[n] = asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {n: [f"r:{n}-{i}" for i in range(5)] for n in range(3)}


def test_using_a_batcher_outside_an_event_loop_is_a_clear_error() -> None:
    b = Batcher(_items)
    with pytest.raises(RuntimeError, match="running asyncio or trio event loop"):
        b.flush()


async def test_the_batch_function_sees_the_context_of_the_call_that_opened_the_batch() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
    seen: list[str] = []

    async def fn(items: list[str]) -> list[str]:
        seen.append(request_id.get())
        return items

    b = Batcher(fn, max_size=2, max_wait=LONG)

    async def call(item: str, rid: str) -> str:
        request_id.set(rid)
        return await b.submit(item)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await start(tg, call, "a", "first")
            await start(tg, call, "b", "second")
    assert seen == ["first"]


# -- composition and statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)  # what shares a batch is timing
async def test_per_item_caching_outside_batching_sends_only_misses() -> None:
    """``@multilevel_cached`` on the per-item call: hits never reach the batch, misses are batched together."""
    provider = Provider()
    provider.answer = lambda texts: [[float(len(t))] for t in texts]
    embed_many = batched(max_size=16, max_wait=0.001)(provider)

    @multilevel_cached(ttl="1h")
    async def embed(text: str) -> list[float]:
        vector: list[float] = await embed_many(text)
        return vector

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for text in ["a", "bb", "ccc"]:
                tg.start_soon(embed, text)
        assert [sorted(batch) for batch in provider.batches] == [["a", "bb", "ccc"]]
        async with anyio.create_task_group() as tg:
            callers = [await start(tg, embed, t) for t in ["a", "dddd", "bb", "eeeee", "a"]]
    assert sorted(provider.batches[1]) == ["dddd", "eeeee"]  # only the misses, together
    assert [c.result for c in callers] == [[1.0], [4.0], [2.0], [5.0], [1.0]]
    assert embed.cache_info().hits == 3


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)  # what shares a batch is timing
async def test_the_batch_form_of_the_cache_sends_only_misses_merged_across_callers() -> None:
    """``@multilevel_cached(batch=True)`` on a list function whose misses go through the batcher.

    Callers pass lists (embed a document set); each list's cached items are answered per item, and the misses
    of concurrent callers are merged into full provider batches.
    """
    provider = Provider()
    provider.answer = lambda texts: [[float(len(t))] for t in texts]
    to_provider = batched(max_size=4, max_wait=0.001)(provider)

    @multilevel_cached(batch=True, ttl="1h")
    async def embed_texts(texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = await to_provider.many(texts)
        return vectors

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = await start(tg, embed_texts, ["a", "bb"])
            second = await start(tg, embed_texts, ["ccc", "dddd"])
        assert [sorted(batch) for batch in provider.batches] == [["a", "bb", "ccc", "dddd"]]  # merged, full
        assert first.result == [[1.0], [2.0]]
        assert second.result == [[3.0], [4.0]]
        assert await embed_texts(["ccc", "eeeee", "a"]) == [[3.0], [5.0], [1.0]]
    assert provider.batches[1:] == [["eeeee"]]  # the only miss


async def test_batching_in_front_of_the_batch_form_of_the_cache_sends_only_misses() -> None:
    """``@batched`` over ``@multilevel_cached(batch=True)``: per-item callers, and the provider sees misses only."""
    provider = Provider()
    provider.answer = lambda texts: [[float(len(t))] for t in texts]

    @batched(max_size=3, max_wait=LONG)
    @multilevel_cached(batch=True, ttl="1h")
    async def embed(texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = await provider(texts)
        return vectors

    with anyio.fail_after(5):
        assert await embed.many(["a", "bb", "ccc"]) == [[1.0], [2.0], [3.0]]
        assert await embed.many(["bb", "dddd", "a"]) == [[2.0], [4.0], [1.0]]
    assert provider.batches == [["a", "bb", "ccc"], ["dddd"]]


async def test_info_and_global_stats() -> None:
    provider = Provider()
    b = Batcher(provider, max_size=4, max_wait=LONG, name="embedder")
    with anyio.fail_after(5):
        await b.submit_many(["a", "b", "c", "d", "a"])  # the second "a" joins the first
        b.flush()
    info = b.info()
    assert (info.calls, info.items, info.batches, info.deduplicated) == (5, 4, 1, 1)
    assert info.mean_size == 4
    assert info.fill_ratio == 1.0
    assert info.wait_p50 is not None
    assert info.batch_p50 is not None
    assert cachelayers.stats()["embedder (batched)"]["items"] == 4


# -- the property ----------------------------------------------------------------------------------------------

# One arrival: (delay before it, item, its kind, weight, cancel after (None: never)).
Arrival = tuple[float, int, str, int, float | None]


def _scenario() -> Any:
    from hypothesis import strategies as st

    arrival = st.tuples(
        st.sampled_from([0.0, 0.0, 0.0005, 0.001, 0.003, 0.01]),
        st.integers(0, 12),  # few distinct items, so identical pending items are common
        st.sampled_from(["ok", "ok", "ok", "ok", "error", "poison"]),
        st.integers(1, 5),
        st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.0005, 0.002, 0.02])),
    )
    config = st.fixed_dictionaries({
        "max_size": st.integers(1, 6),
        "max_wait": st.sampled_from([0.0, 0.001, 0.004]),
        "max_weight": st.one_of(st.none(), st.integers(3, 12)),
        "max_concurrency": st.one_of(st.none(), st.integers(1, 3)),
        "max_queue": st.one_of(st.none(), st.integers(1, 8)),
        "duration": st.sampled_from([0.0, 0.001, 0.005]),
    })
    return config, st.lists(arrival, min_size=1, max_size=30)


def _check_property(backend: str, config: dict[str, Any], arrivals: list[Arrival]) -> None:
    # The kind belongs to the item (an item is "poison" or "error" whoever submits it), so identical items agree.
    kinds = {item: kind for _, item, kind, _, _ in reversed(arrivals)}
    weights = {item: weight for _, item, _, weight, _ in reversed(arrivals)}
    max_size, max_weight, max_concurrency = config["max_size"], config["max_weight"], config["max_concurrency"]
    sent: list[list[int]] = []
    waiting: dict[int, int] = {}  # item -> callers still waiting (as the test sees them)
    in_flight = 0
    peak = 0

    async def fn(items: list[int]) -> list[Any]:
        nonlocal in_flight, peak
        sent.append(list(items))
        for item in items:
            assert waiting.get(item, 0) > 0, f"item {item} was sent although all its callers had cancelled"
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            if config["duration"]:
                await anyio.sleep(config["duration"])
            if any(kinds[item] == "poison" for item in items):
                raise RuntimeError("poisoned batch")
            return [ValueError(f"item {item}") if kinds[item] == "error" else ("r", item) for item in items]
        finally:
            in_flight -= 1

    b = Batcher(fn, max_size=max_size, max_wait=config["max_wait"], max_concurrency=max_concurrency,
                max_queue=config["max_queue"], max_weight=max_weight,
                weight=(lambda item: weights[item]) if max_weight is not None else None)
    outcomes: list[tuple[str, Any]] = [("none", None)] * len(arrivals)

    async def call(index: int, item: int, cancel_after: float | None) -> None:
        waiting[item] = waiting.get(item, 0) + 1
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + cancel_after if cancel_after is not None
                                   else float("inf")) as scope:
                try:
                    outcomes[index] = ("value", await b.submit(item))
                except Exception as exc:
                    outcomes[index] = ("error", exc)
            if scope.cancelled_caught:
                outcomes[index] = ("cancelled", None)
        finally:
            waiting[item] -= 1

    async def main() -> None:
        with anyio.fail_after(1000):
            async with anyio.create_task_group() as tg:
                for index, (delay, item, _, _, cancel_after) in enumerate(arrivals):
                    if delay:
                        await anyio.sleep(delay)
                    tg.start_soon(call, index, item, cancel_after)

    run_virtual(backend, main)

    # every caller got exactly one outcome, and it is its own
    for index, (_, item, _, _, _) in enumerate(arrivals):
        state, value = outcomes[index]
        assert state != "none", f"caller {index} got nothing"
        if state == "cancelled":
            continue
        if state == "error" and isinstance(value, BatchError):
            # only a batch holding a poisoned item fails, and this item must have been in one
            assert isinstance(value.__cause__, RuntimeError)
            assert any(item in batch and any(kinds[i] == "poison" for i in batch) for batch in sent)
        elif kinds[item] == "poison":
            raise AssertionError(f"caller {index} of a poisoned item got {outcomes[index]}")
        elif kinds[item] == "error":
            assert state == "error"
            assert isinstance(value, ValueError)
            assert str(value) == f"item {item}"
        else:
            assert outcomes[index] == ("value", ("r", item))
    # no batch exceeds its caps, and no item is sent twice in one batch
    for batch in sent:
        assert 1 <= len(batch) <= max_size
        assert len(set(batch)) == len(batch)
        if max_weight is not None and len(batch) > 1:
            assert sum(weights[item] for item in batch) <= max_weight
    if max_concurrency is not None:
        assert peak <= max_concurrency
    info = b.info()
    assert info.pending == 0
    assert info.in_flight == 0
    assert info.items == sum(map(len, sent))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_property_every_caller_gets_its_own_outcome_within_caps(backend: str) -> None:
    from hypothesis import HealthCheck, given, settings

    config_strategy, arrivals_strategy = _scenario()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config_strategy, arrivals_strategy)
    def check(config: dict[str, Any], arrivals: list[Arrival]) -> None:
        _check_property(backend, config, arrivals)

    check()
