"""A type-checked usage file: `@multilevel_cached`, bare and with arguments, keeps the function's signature.

mypy --strict checks this file with ``warn_unused_ignores``: each ``# type: ignore[...]`` below marks a call
that must be a type error. Were the signature lost (an ``Any`` wrapper), the ignore would be unused and mypy
would fail. pytest runs the same calls, so the file stays honest at run time too.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

import pytest

from cachelayers import CachedFunction, CacheInfo, FunctionCache, Settings, TieredCache, multilevel_cached

pytestmark = pytest.mark.anyio

CACHE = TieredCache(Settings())


@multilevel_cached
async def bare(x: int, label: str = "n") -> list[int]:
    """Bare form."""
    return [x + 0] * len(label)


@multilevel_cached(ttl="1h", tags=["typing"], cache=CACHE)
async def configured(question: str, *, top_k: int = 3) -> dict[str, int]:
    """Form with arguments, keyword-only parameter."""
    return {question: top_k}


@multilevel_cached(cache=CACHE)
async def optional(x: int | None = None) -> None:
    """Returns None."""


class Retriever:
    @multilevel_cached(ignore=("self",), cache=CACHE)
    async def search(self, query: str, limit: int = 5) -> tuple[str, ...]:
        """A method."""
        return (query,) * limit


async def test_signatures_and_return_types_are_kept() -> None:
    """Calls type-check against the wrapped signature and return the wrapped return type."""
    call = assert_type(bare(1), Coroutine[Any, Any, list[int]])
    assert_type(await call, list[int])
    assert_type(await bare(x=2, label="ab"), list[int])
    assert_type(await configured("q", top_k=1), dict[str, int])
    assert_type(await optional(), None)
    assert_type(await Retriever().search("q", limit=2), tuple[str, ...])

    assert await bare(1) == [1]
    assert await bare(x=2, label="ab") == [2, 2]
    assert await configured("q", top_k=1) == {"q": 1}
    assert await Retriever().search("q", limit=2) == ("q", "q")


async def test_management_api_is_typed() -> None:
    """``cache_info``, ``invalidate`` (same parameters as the function) and ``cache`` are typed."""
    assert_type(bare.cache_info(), CacheInfo)
    invalidation = assert_type(bare.invalidate(1, label="x"), Coroutine[Any, Any, None])
    await invalidation
    assert isinstance(bare.cache, FunctionCache)
    assert_type(bare.__name__, str)
    assert_type(bare.__qualname__, str)
    assert bare.__name__ == "bare"
    await configured.invalidate_all()
    await configured.cache_clear()
    assert bare.cache_info().misses >= 0


def test_decorated_functions_are_cached_functions() -> None:
    """Both forms give a `CachedFunction` of the same parameters and return type."""
    as_protocol: CachedFunction[[int, str], list[int]] = bare
    assert as_protocol is bare


async def test_wrong_calls_are_type_errors() -> None:
    """Each of these is rejected by mypy (the ignores would be unused otherwise) and fails at run time."""
    with pytest.raises(TypeError):
        await bare("one")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await bare(1, "a", 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await configured("q", 5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await configured("q", k=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await bare.invalidate(1, unknown=2)  # type: ignore[call-arg]
