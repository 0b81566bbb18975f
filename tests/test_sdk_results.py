"""Results users actually return are cached as themselves, in every tier (issue 11: results users return).

pydantic v2 models (OpenAI's ``ChatCompletion``, Anthropic's ``Message``), dataclasses and named tuples named by
the function's return annotation are stored without ``register_codec`` and come back as the same class; a value
that cannot be stored is counted as ``unstorable`` and never as a write.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import pydantic
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion

from cachelayers import Settings, TieredCache, multilevel_cached

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The codec is loop-agnostic."""
    return "asyncio"


COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "A vector index finds near neighbours."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}
MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet",
    "content": [{"type": "text", "text": "It finds near neighbours."}],
    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 6},
}


@dataclasses.dataclass(frozen=True)
class Passage:
    """A retrieved passage."""

    text: str
    score: float


class Hit(NamedTuple):
    """A search hit."""

    doc: str
    rank: int


class Answer(pydantic.BaseModel):
    """An answer with its sources."""

    text: str
    sources: list[Passage]


@pytest.mark.parametrize("kind", ["memory", "memory+disk"])
async def test_sdk_responses_come_back_as_themselves(kind: str, tmp_path: Path) -> None:
    """A ``ChatCompletion`` and a ``Message`` are cached (one computation) and come back as their class, also
    read from the disk by an engine whose memory is empty."""
    url = {"memory": "memory://", "disk": f"disk://{tmp_path}"} if kind == "memory+disk" else {"memory": "memory://"}
    cache = TieredCache(Settings(tiers=url))
    calls: list[str] = []

    @multilevel_cached(cache=cache)
    async def complete(prompt: str) -> ChatCompletion:
        calls.append(prompt)
        return ChatCompletion.model_validate(COMPLETION)

    @multilevel_cached(cache=cache)
    async def message(prompt: str) -> Message:
        calls.append(prompt)
        return Message.model_validate(MESSAGE)

    first, again = await complete("q"), await complete("q")
    assert type(again) is ChatCompletion
    assert again == first
    assert type(await message("q")) is Message
    assert await message("q") == Message.model_validate(MESSAGE)
    assert calls == ["q", "q"]
    assert complete.cache_info().unstorable == 0
    if kind == "memory+disk":
        assert cache.local is not None
        cache.local.clear_now()
        fresh = await complete("q")
        assert type(fresh) is ChatCompletion
        assert fresh == first
        assert complete.cache_info().hits_by_tier.get("disk") == 1
        assert calls == ["q", "q"]
    await cache.aclose()


async def test_dataclasses_named_tuples_and_models_of_the_annotation(tmp_path: Path) -> None:
    """Nested classes named by the return annotation round-trip through the disk tier as their classes."""
    cache = TieredCache(Settings(tiers={"memory": "memory://", "disk": f"disk://{tmp_path}"}))

    @multilevel_cached(cache=cache)
    async def answer(question: str) -> Answer:
        return Answer(text=question.upper(), sources=[Passage("p", 0.5)])

    @multilevel_cached(cache=cache)
    async def search(question: str) -> list[Hit]:
        return [Hit(question, 1), Hit("other", 2)]

    expected_answer, expected_hits = await answer("why"), await search("why")
    assert cache.local is not None
    cache.local.clear_now()
    got_answer, got_hits = await answer("why"), await search("why")
    assert got_answer == expected_answer
    assert type(got_answer.sources[0]) is Passage
    assert got_hits == expected_hits
    assert all(type(hit) is Hit for hit in got_hits)
    assert answer.cache_info().hits_by_tier == {"disk": 1}
    await cache.aclose()


async def test_an_unannotated_model_is_unstorable_counted_and_never_a_write() -> None:
    """Without an annotation naming the class (and no codec registered), the call still returns, is counted as
    unstorable, and no tier counts a write."""
    cache = TieredCache(Settings())

    @multilevel_cached(cache=cache)
    async def complete(prompt: str) -> Any:
        return ChatCompletion.model_validate(COMPLETION)

    assert type(await complete("q")) is ChatCompletion
    assert type(await complete("q")) is ChatCompletion
    info = complete.cache_info()
    assert (info.hits, info.misses, info.unstorable) == (0, 2, 2)
    assert all(stats["writes"] == 0 for stats in cache.tier_stats().values())
    await cache.aclose()


async def test_a_value_larger_than_the_memory_bound_is_unstorable_not_a_write() -> None:
    """A value that cannot fit ``max_bytes`` of the only tier is counted as unstorable, never as a write."""
    cache = TieredCache(Settings(tiers={"memory": "memory://?max_bytes=1KiB"}))

    @multilevel_cached(cache=cache)
    async def big(n: int) -> bytes:
        return b"x" * n

    assert await big(10_000) == b"x" * 10_000
    assert await big(10) == b"x" * 10
    info = big.cache_info()
    assert info.unstorable == 1
    assert cache.tier_stats()["memory"]["writes"] == 1
    await cache.aclose()
