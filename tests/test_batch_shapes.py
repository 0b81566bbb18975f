"""What a batch function returns, in both batch forms (``@batched`` and ``multilevel_cached(batch=...)``).

Item *i* gets element *i* of the result, so only an ordered container of exactly one result per item may be
served: a list, a tuple, an array (first dimension: the items) or another sequence that is not a string. A
mapping, a set, a string or bytes, an iterator, ``None``, a scalar or a wrong length is a `BatchError` to every
caller of the batch, nothing of it is cached, and nothing is left for the event loop's exception handler.
The property at the end draws result shapes and proves that no caller ever gets another item's value.
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest

from cachelayers import Batcher, BatchError, MemoryBackend, Settings, TieredCache, batched, multilevel_cached
from tests.conftest import FakeClock
from tests.virtual_time import run_virtual

pytestmark = pytest.mark.anyio

LONG = 3600.0


def f(item: int) -> int:
    """The per-item answer every batch function here is meant to give."""
    return 10 * item + 7


Shape = Callable[[list[int]], Any]  # the items of one call -> what the batch function returns

# Shapes that are one result per item, in order: served.
GOOD: dict[str, Shape] = {
    "list": lambda items: [f(x) for x in items],
    "tuple": lambda items: tuple(f(x) for x in items),
    "array-1d": lambda items: np.array([f(x) for x in items], dtype=np.int64),
    "array-2d": lambda items: np.array([[f(x), f(x) + 1] for x in items], dtype=np.int64).reshape(len(items), 2),
    "user-list": lambda items: collections.UserList(f(x) for x in items),
}
# Everything else: a BatchError to every caller, nothing cached.
BAD: dict[str, Shape] = {
    "list-short": lambda items: [f(x) for x in items][:-1],
    "list-long": lambda items: [*(f(x) for x in items), -1],
    "list-double": lambda items: [f(x) for x in items] * 2,
    "tuple-short": lambda items: tuple(f(x) for x in items)[1:],
    "array-short": lambda items: np.array([f(x) for x in items][:-1], dtype=np.int64),
    "array-transposed": lambda items: np.array([[f(x) for x in items]] * (len(items) + 1)),
    "array-0d": lambda items: np.array(f(items[0])),
    "dict-by-item": lambda items: {x: f(x) for x in items},
    "dict-by-index": lambda items: {i: f(x) for i, x in enumerate(items)},
    "dict-keys": lambda items: {x: f(x) for x in items}.keys(),
    "str": lambda items: "".join(chr(65 + x % 26) for x in items),
    "bytes": lambda items: bytes(x % 256 for x in items),
    "bytearray": lambda items: bytearray(x % 256 for x in items),
    "set": lambda items: {f(x) for x in items},
    "frozenset": lambda items: frozenset(f(x) for x in items),
    "generator": lambda items: (f(x) for x in items),
    "iterator": lambda items: iter([f(x) for x in items]),
    "map": lambda items: map(f, items),
    "none": lambda items: None,
    "int": lambda items: f(items[0]),
    "numpy-scalar": lambda items: np.int64(f(items[0])),
}
SHAPES: dict[str, Shape] = {**GOOD, **BAD}


def expected(item: int, shape: str) -> list[int] | int:
    """What a caller of ``item`` must get when ``shape`` is served (rows of 2-D arrays as lists)."""
    return [f(item), f(item) + 1] if shape == "array-2d" else f(item)


def plain(value: Any) -> Any:
    """A served value as plain Python, to compare with `expected` (numpy scalars and rows included)."""
    return np.asarray(value).tolist() if isinstance(value, np.ndarray | np.generic) else value


class LoopErrors:
    """What reaches asyncio's exception handler of the running loop ("Task exception was never retrieved")."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def install(self) -> None:
        """Catch the handler's calls on the running loop, if it is asyncio's (trio crashes the run instead)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.set_exception_handler(lambda _loop, context: self.contexts.append(context))

    def check(self) -> None:
        gc.collect()  # an unretrieved exception is reported when its task is collected
        assert self.contexts == []


# -- one shape at a time ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(BAD))
async def test_batched_a_malformed_result_is_a_batch_error_to_every_caller(shape: str) -> None:
    errors = LoopErrors()
    errors.install()
    sent: list[list[int]] = []

    @batched(max_size=3, max_wait=LONG, name="shaped")
    async def compute(items: list[int]) -> Any:
        sent.append(list(items))
        return SHAPES[shape](items)

    outcomes: list[Any] = [None] * 3

    async def call(index: int, item: int) -> None:
        try:
            outcomes[index] = await compute(item)
        except BatchError as exc:
            outcomes[index] = exc

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for index, item in enumerate([1, 2, 3]):
                tg.start_soon(call, index, item)
    assert len(sent) == 1
    for error in outcomes:
        assert isinstance(error, BatchError), f"{shape}: a caller got {error!r}"
        assert "shaped() returned" in str(error)  # about the result, not "cancelled" or a crash of the batch
        assert error.batch_size == 3
    assert compute.batch_info().failed_batches == 1
    errors.check()


@pytest.mark.parametrize("shape", sorted(BAD))
async def test_batch_form_a_malformed_result_is_a_batch_error_and_nothing_is_cached(
        shape: str, clock: FakeClock) -> None:
    l1, l2 = MemoryBackend(clock=clock), MemoryBackend(clock=clock)
    cache = TieredCache(Settings(), backends={"l1": l1, "l2": l2}, clock=clock)
    mode = {"shape": shape}
    computed: list[list[int]] = []

    @multilevel_cached(batch=True, cache=cache)
    async def compute(items: list[int]) -> Any:
        computed.append(list(items))
        return SHAPES[mode["shape"]](items)

    with pytest.raises(BatchError) as caught:
        await compute([1, 2, 3])
    assert "<locals>.compute" in str(caught.value)
    assert caught.value.batch_size == 3
    assert len(l1) == 0
    assert len(l2) == 0
    mode["shape"] = "list"
    assert await compute([1, 2, 3]) == [f(1), f(2), f(3)]
    assert computed == [[1, 2, 3], [1, 2, 3]]  # nothing was cached from the malformed result
    await cache.background.aclose()


@pytest.mark.parametrize(("shape", "words"), [
    ("dict-by-item", ["returned a dict", "mapping"]),
    ("str", ["returned a str"]),
    ("bytes", ["returned a bytes"]),
    ("set", ["returned a set", "no order"]),
    ("frozenset", ["returned a frozenset"]),
    ("generator", ["returned a generator", "unknown"]),
    ("none", ["returned a NoneType"]),
    ("int", ["returned an int"]),
    ("numpy-scalar", ["returned a numpy.int64"]),
    ("array-0d", ["numpy.ndarray of shape ()"]),
    ("array-short", ["numpy.ndarray of shape (2,)", "expected 3 rows"]),
    ("list-short", ["returned a list of 2 results; expected 3"]),
    ("tuple-short", ["returned a tuple of 2 results; expected 3"]),
])
async def test_the_error_names_the_function_the_type_and_the_lengths(shape: str, words: list[str],
                                                                     clock: FakeClock) -> None:
    async def answer(items: list[int]) -> Any:
        return SHAPES[shape](items)

    batcher = Batcher(answer, max_size=3, max_wait=LONG, name="my_embedder")
    with anyio.fail_after(5), pytest.raises(BatchError) as by_batcher:
        await batcher.submit_many([1, 2, 3])
    cached = multilevel_cached(batch=True, cache=TieredCache(Settings(), clock=clock), name="my_embedder")(answer)
    with pytest.raises(BatchError) as by_cache:
        await cached([1, 2, 3])
    for error in (by_batcher.value, by_cache.value):
        message = str(error)
        assert message.startswith("batch of 3 items to ")
        assert "my_embedder()" in message
        for word in words:
            assert word in message


async def test_batch_form_annotated_to_return_an_array_rejects_a_dict(clock: FakeClock) -> None:
    @multilevel_cached(batch=True, cache=TieredCache(Settings(), clock=clock))
    async def embed(texts: list[str]) -> np.ndarray:
        return {t: np.ones(2) for t in texts}  # type: ignore[return-value]

    with pytest.raises(BatchError, match="returned a dict"):
        await embed(["a", "b"])


async def test_good_shapes_are_served_row_by_row(clock: FakeClock) -> None:
    for shape in GOOD:
        async def answer(items: list[int], shape: str = shape) -> Any:
            return SHAPES[shape](items)

        batcher = Batcher(answer, max_size=3, max_wait=LONG)
        cached = multilevel_cached(batch=True, cache=TieredCache(Settings(), clock=clock), name=shape)(answer)
        with anyio.fail_after(5):
            by_batcher = await batcher.submit_many([1, 2, 3])
        by_cache = await cached([1, 2, 3])
        for results in (by_batcher, by_cache):
            assert [plain(v) for v in results] == [expected(x, shape) for x in [1, 2, 3]], shape


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_unretrieved_task_exception_for_a_dict_or_a_set(anyio_backend: str) -> None:
    """A dict of the right length used to raise KeyError inside the batch's task: never retrieved."""
    calls: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: calls.append(context))
    try:
        for shape in ("dict-by-item", "set", "str", "map"):
            async def answer(items: list[int], shape: str = shape) -> Any:
                return SHAPES[shape](items)

            batcher = Batcher(answer, max_size=3, max_wait=LONG)
            with anyio.fail_after(5), pytest.raises(BatchError):
                await batcher.submit_many([10, 20, 30])
            del batcher, answer
        gc.collect()
        await anyio.lowlevel.checkpoint()
        assert calls == []
    finally:
        loop.set_exception_handler(previous)


# -- the property ----------------------------------------------------------------------------------------------


def _scenario() -> Any:
    from hypothesis import strategies as st

    calls = st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=6), min_size=1, max_size=3)
    return st.sampled_from(sorted(SHAPES)), calls


def _check_served(outcomes: list[tuple[int, Any]], shape: str) -> None:
    """Each caller got exactly its own item's value, or a BatchError; a bad shape never served anything."""
    for item, outcome in outcomes:
        if isinstance(outcome, BatchError):
            assert shape in BAD, f"{shape} was refused: {outcome}"
        else:
            assert shape in GOOD, f"{shape} served {outcome!r} for item {item}"
            assert plain(outcome) == expected(item, shape), f"item {item} got {outcome!r} from {shape}"


def _check_batched(backend: str, shape: str, calls: list[list[int]]) -> None:
    """``@batched`` behind a per-item cache: callers of one item each, concurrently."""
    errors = LoopErrors()
    mode = {"shape": shape}
    computed: list[int] = []

    async def answer(items: list[int]) -> Any:
        computed.extend(items)
        return SHAPES[mode["shape"]](items)

    async def main() -> None:
        errors.install()
        batcher = Batcher(answer, max_size=4, max_wait=0.001)
        cache = TieredCache(Settings(), clock=FakeClock())

        @multilevel_cached(cache=cache, name="one")
        async def one(item: int) -> Any:
            return await batcher.submit(item)

        outcomes: list[tuple[int, Any]] = []

        async def call(item: int) -> None:
            try:
                outcomes.append((item, await one(item)))
            except BatchError as exc:
                outcomes.append((item, exc))

        items = [item for call_items in calls for item in call_items]
        with anyio.fail_after(100):
            async with anyio.create_task_group() as tg:
                for item in items:
                    tg.start_soon(call, item)
        assert len(outcomes) == len(items)
        _check_served(outcomes, shape)
        # The cache holds only correct entries: with a correct function, the answers are right, and only the
        # items that failed are computed again.
        mode["shape"] = shape if shape in GOOD else "list"
        served = {item for item, outcome in outcomes if not isinstance(outcome, BatchError)}
        computed.clear()
        for item in sorted(set(items)):
            assert plain(await one(item)) == expected(item, mode["shape"])
        assert sorted(computed) == sorted(set(items) - served)
        await cache.background.aclose()

    run_virtual(backend, main)
    errors.check()


def _check_batch_form(backend: str, shape: str, calls: list[list[int]]) -> None:
    """``multilevel_cached(batch=True)``: concurrent calls of item lists, overlapping items shared in flight."""
    mode = {"shape": shape}
    computed: list[int] = []
    clock = FakeClock()
    l1, l2 = MemoryBackend(clock=clock), MemoryBackend(clock=clock)
    cache = TieredCache(Settings(), backends={"l1": l1, "l2": l2}, clock=clock)

    @multilevel_cached(batch=True, cache=cache, name="many")
    async def many(items: list[int]) -> Any:
        computed.extend(items)
        await anyio.lowlevel.checkpoint()  # let concurrent calls find these items in flight
        return SHAPES[mode["shape"]](items)

    async def main() -> None:
        outcomes: list[tuple[int, Any]] = []

        async def call(items: list[int]) -> None:
            try:
                outcomes.extend(zip(items, await many(items), strict=True))
            except BatchError as exc:
                outcomes.extend((item, exc) for item in items)

        async with anyio.create_task_group() as tg:
            for call_items in calls:
                tg.start_soon(call, call_items)
        _check_served(outcomes, shape)
        if shape in BAD:
            assert (len(l1), len(l2)) == (0, 0)
        mode["shape"] = shape if shape in GOOD else "list"
        computed.clear()
        for call_items in calls:
            assert [plain(v) for v in await many(call_items)] == [expected(x, mode["shape"]) for x in call_items]
        everything = {item for call_items in calls for item in call_items}
        assert sorted(computed) == (sorted(everything) if shape in BAD else [])
        await cache.background.aclose()

    run_virtual(backend, main)


@pytest.mark.parametrize("form", ["batched", "batch-form"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_property_no_caller_ever_gets_another_items_value(backend: str, form: str) -> None:
    from hypothesis import HealthCheck, given, settings

    shapes, calls = _scenario()
    check_one = _check_batched if form == "batched" else _check_batch_form

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(shapes, calls)
    def check(shape: str, calls: list[list[int]]) -> None:
        check_one(backend, shape, calls)

    check()
