"""Every decorator returns a typed, final wrapper class that stands for the function it wraps."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from typing import Any, get_type_hints

import pytest

from cachelayers import (
    BatchedFunction,
    CachedFunction,
    RateLimitedFunction,
    SemanticCachedFunction,
    batched,
    multilevel_cached,
    rate_limited,
    semantic_cached,
)


async def answer(question: str, model: str = "small") -> str:
    """Stands for an LLM call."""
    return f"{model}:{question}"


@multilevel_cached
async def cached_answer(question: str, model: str = "small") -> str:
    """Stands for an LLM call."""
    return f"{model}:{question}"


@semantic_cached(threshold=0.99)
async def similar_answer(question: str, model: str = "small") -> str:
    """Stands for an LLM call."""
    return f"{model}:{question}"


@rate_limited("1000/second")
async def limited_answer(question: str, model: str = "small") -> str:
    """Stands for an LLM call."""
    return f"{model}:{question}"


@batched
async def embed_one(texts: list[str]) -> list[int]:
    """Stands for a batch embedding call."""
    return [len(text) for text in texts]


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The wrappers are loop-agnostic; asyncio is enough here."""
    return "asyncio"


PER_CALL: list[tuple[Any, type]] = [(cached_answer, CachedFunction), (similar_answer, SemanticCachedFunction),
                                    (limited_answer, RateLimitedFunction)]


@pytest.mark.parametrize(("wrapper", "cls"), [*PER_CALL, (embed_one, BatchedFunction)])
def test_each_decorator_returns_its_final_wrapper_class(wrapper: Any, cls: type) -> None:
    """The wrapper is an instance of a public ``@final`` class, named like the function it wraps."""
    assert wrapper.__name__ == wrapper.__wrapped__.__name__
    assert wrapper.__doc__ == wrapper.__wrapped__.__doc__
    assert getattr(cls, "__final__", False) is True
    assert type(wrapper) is cls


@pytest.mark.parametrize(("wrapper", "cls"), PER_CALL)
async def test_a_wrapper_stands_for_its_async_function(wrapper: Any, cls: type) -> None:
    """Same signature and hints, a coroutine function to `inspect`, the same result, pickled by reference."""
    assert inspect.signature(wrapper) == inspect.signature(answer)
    assert get_type_hints(wrapper) == get_type_hints(answer)
    assert wrapper.__qualname__ == wrapper.__wrapped__.__qualname__
    assert inspect.iscoroutinefunction(wrapper)
    assert await wrapper("why?", model="big") == "big:why?"
    assert pickle.loads(pickle.dumps(wrapper)) is wrapper


@pytest.mark.parametrize("decorate", [multilevel_cached, semantic_cached(threshold=0.99), rate_limited("1000/second")],
                         ids=["multilevel_cached", "semantic_cached", "rate_limited"])
async def test_a_wrapper_binds_as_a_method(decorate: Callable[[Any], Any]) -> None:
    """On a class, the wrapper binds to the instance like the function it wraps, and stays itself on the class."""

    class Assistant:
        def __init__(self, tone: str) -> None:
            self.tone = tone

        async def reply(self, question: str) -> str:
            return f"{self.tone}:{question}"

        def __cache_key__(self) -> str:
            return self.tone

    Assistant.reply = decorate(Assistant.__dict__["reply"])  # type: ignore[method-assign]
    assert await Assistant("warm").reply("hi") == "warm:hi"
    assert await Assistant("dry").reply("hi") == "dry:hi"
    assert Assistant.__dict__["reply"].__get__(None, Assistant) is Assistant.__dict__["reply"]


def test_a_misspelt_option_is_a_type_error_at_decoration() -> None:
    """Options are declared once; one that is not declared is refused, naming it."""
    with pytest.raises(TypeError, match="'tll'"):
        multilevel_cached(tll=60)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="'treshold'"):
        semantic_cached(treshold=0.9)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'keys'"):
        rate_limited("10/second", keys=lambda: 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'max_sise'"):
        batched(max_sise=3)  # type: ignore[call-overload]
