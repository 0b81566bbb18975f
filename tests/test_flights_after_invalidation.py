"""A call made after an invalidation never waits for a computation that began before it (single flight).

Callers that find the same call being computed wait for its value instead of computing it again; but a value
computed from before a clear or an invalidation is what the invalidation removed, so a caller that comes
after it computes anew. Callers that joined before the invalidation still get the value they waited for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from cachelayers import invalidate_tags, multilevel_cached, semantic_cached

pytestmark = pytest.mark.anyio


def _gated(decorator: Callable[[Callable[[str], Awaitable[str]]], Any]) -> tuple[Any, dict[str, Any]]:
    state: dict[str, Any] = {"kb": "old", "started": anyio.Event(), "release": anyio.Event(), "runs": 0}

    @decorator
    async def answer(question: str) -> str:
        snapshot = state["kb"]
        state["runs"] += 1
        if snapshot == "old":
            state["started"].set()
            await state["release"].wait()
        return f"{question} from {snapshot}"

    return answer, state


async def _race(fn: Any, state: dict[str, Any], invalidate: Callable[[], Awaitable[Any]]) -> None:
    results: dict[str, str] = {}

    async def call(name: str) -> None:
        results[name] = await fn("refund window?")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "before")
        await state["started"].wait()
        tg.start_soon(call, "joined before")
        await anyio.wait_all_tasks_blocked()  # it waits for the computation begun by "before"
        state["kb"] = "new"
        await invalidate()
        after = await fn("refund window?")  # computed anew: it does not wait for the old computation
        assert after == "refund window? from new"
        state["release"].set()
    assert results == {"before": "refund window? from old", "joined before": "refund window? from old"}
    assert state["runs"] == 2
    assert await fn("refund window?") == "refund window? from new"  # and the old result was not stored
    assert state["runs"] == 2


@pytest.mark.parametrize("decorator", [multilevel_cached(), semantic_cached()], ids=["multilevel", "semantic"])
async def test_a_call_after_a_clear_computes_again(decorator: Any) -> None:
    fn, state = _gated(decorator)
    await _race(fn, state, fn.cache_clear)


async def test_a_call_after_invalidating_its_key_computes_again() -> None:
    fn, state = _gated(multilevel_cached())
    await _race(fn, state, lambda: fn.invalidate("refund window?"))


async def test_an_unrelated_invalidation_keeps_one_computation() -> None:
    """Invalidating another key or tag must not defeat single flight for this one (no herd of recomputations)."""
    started, release = anyio.Event(), anyio.Event()
    runs: list[str] = []

    @multilevel_cached(tags=lambda question: [f"q:{question}"])
    async def answer(question: str) -> str:
        runs.append(question)
        if question == "slow":
            started.set()
            await release.wait()
        return f"answer to {question}"

    results: list[str] = []

    async def call() -> None:
        results.append(await answer("slow"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await started.wait()
        await answer.invalidate("other")
        await invalidate_tags("q:other")
        for _ in range(3):
            tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert runs == ["slow"]
    assert results == ["answer to slow"] * 4


@pytest.mark.parametrize("related", [False, True], ids=["unrelated-tag", "clear"])
async def test_a_batch_function_joins_or_recomputes_an_item_as_the_invalidations_say(related: bool) -> None:
    started, release = anyio.Event(), anyio.Event()
    batches: list[list[str]] = []
    kb = ["old"]

    @multilevel_cached(batch=True)
    async def embed(texts: list[str]) -> list[str]:
        batches.append(list(texts))
        snapshot = kb[0]
        if snapshot == "old":
            started.set()
            await release.wait()
        return [f"{t} from {snapshot}" for t in texts]

    results: list[list[str]] = []

    async def call() -> None:
        results.append(await embed(["slow"]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await started.wait()
        kb[0] = "new"
        await (embed.cache_clear() if related else invalidate_tags("unrelated"))
        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        release.set()
    if related:  # the later call computed anew and got the new value
        assert batches == [["slow"], ["slow"]]
        assert sorted(results) == [["slow from new"], ["slow from old"]]
    else:  # it waited for the computation under way
        assert batches == [["slow"]]
        assert results == [["slow from old"]] * 2
