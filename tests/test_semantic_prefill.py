"""`fn.prefill(entries, **partition_arguments)`: pre-loading a semantic cache through the public decorator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachelayers
from cachelayers import explain, semantic_cached
from tests.conftest import FakeClock
from tests.semantic_helpers import AngleEmbedder

pytestmark = pytest.mark.anyio


async def test_prefilled_answers_are_served_to_similar_calls_without_calling_the_function() -> None:
    calls: list[str] = []

    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False)
    async def ask(question: str) -> str:
        calls.append(question)
        return f"computed {question}"

    assert await ask.prefill([("a@0", "answer a"), ("b@0", "answer b")]) == 2
    with explain() as info:
        assert await ask("a@5") == "answer a"  # cos 5 degrees = 0.996
        assert await ask("b@0") == "answer b"
        assert await ask("a@60") == "computed a@60"  # too far from the prefilled one
    assert [lookup.level for lookup in info] == ["semantic", "exact", "computed"]
    assert calls == ["a@60"]
    assert ask.cache_info().entries == 3


async def test_entries_land_in_the_partition_their_arguments_name() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, ignore=("client",), cache_embeddings=False)
    async def ask(question: str, tenant: str, client: object = None, lang: str = "en") -> str:
        return f"computed {question}/{tenant}/{lang}"

    await ask.prefill([("a@0", "acme's answer")], tenant="acme")  # client ignored, lang defaulted
    assert await ask("a@1", "acme", client=object()) == "acme's answer"
    assert await ask("a@1", "acme", lang="fr") == "computed a@1/acme/fr"
    assert await ask("a@1", "globex") == "computed a@1/globex/en"


async def test_a_partition_function_decides_the_partition_of_prefilled_entries_too() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False,
                     text=lambda messages, **_: messages[-1], partition=lambda model, **_: model)
    async def chat(model: str, messages: list[str]) -> str:
        return f"computed {messages[-1]} by {model}"

    assert await chat.prefill([("a@0", "small's answer")], model="small") == 1
    assert await chat("small", ["hi", "a@2"]) == "small's answer"
    assert await chat("large", ["a@2"]) == "computed a@2 by large"


async def test_a_chat_function_is_prefilled_with_a_whole_call_s_messages() -> None:
    """The documented way for a text= function whose partition drops the last message."""
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False,
                     text=lambda messages, **_: messages[-1]["content"],
                     partition=lambda model, messages, **_: (model, messages[:-1]))
    async def chat(messages: list[dict[str, str]], model: str) -> str:
        return f"computed {messages[-1]['content']}"

    system = {"role": "system", "content": "be brief"}
    stand_in = {"role": "user", "content": ""}
    assert await chat.prefill([("a@0", "prefilled")], model="m", messages=[system, stand_in]) == 1
    with explain() as info:
        assert await chat([system, {"role": "user", "content": "a@1"}], "m") == "prefilled"
        assert await chat([{"role": "system", "content": "be long"}, {"role": "user", "content": "a@1"}],
                          "m") == "computed a@1"  # another system message: another partition
    assert [lookup.level for lookup in info] == ["semantic", "computed"]


async def test_positional_only_parameters_are_given_by_name_to_prefill() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False)
    async def ask(question: str, tenant: str, /, lang: str = "en") -> str:
        return f"computed {question}/{tenant}/{lang}"

    assert await ask.prefill([("a@0", "acme's answer")], tenant="acme") == 1
    assert await ask("a@1", "acme") == "acme's answer"
    assert await ask("a@1", "globex") == "computed a@1/globex/en"
    with pytest.raises(TypeError, match="missing partition argument"):
        await ask.prefill([("a@0", "nobody's answer")])

    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False, ignore=["client"], text="q")
    async def with_client(client: object, q: str, /, model: str = "m") -> str:
        return f"computed {q}/{model}"

    assert await with_client.prefill([("b@0", "b's answer")], model="m") == 1  # the ignored client left out
    assert await with_client(object(), "b@1") == "b's answer"


async def test_bad_entries_and_arguments_are_type_errors_and_store_nothing() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False)
    async def ask(question: str, tenant: str) -> str:
        return question

    with pytest.raises(TypeError, match=r"missing partition argument.*'tenant'"):
        await ask.prefill([("a@0", "x")])
    with pytest.raises(TypeError, match="prefill of"):
        await ask.prefill([("a@0", "x")], tenant="t", colour="red")
    with pytest.raises(TypeError, match="'question' is the semantic text"):
        await ask.prefill([("a@0", "x")], tenant="t", question="a@0")
    bad: list[Any] = [("a@0", "x"), ("b@0",)]
    with pytest.raises(TypeError, match=r"\(text, value\) pairs"):
        await ask.prefill(bad, tenant="t")
    with pytest.raises(TypeError, match=r"\(text, value\) pairs"):
        await ask.prefill([(1, "x")], tenant="t")  # type: ignore[list-item]
    assert ask.cache_info().entries == 0


async def test_empty_texts_are_skipped_and_the_ttl_and_bounds_apply(clock: FakeClock) -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, ttl=60, max_entries=3, cache_embeddings=False,
                     clock=clock)
    async def ask(question: str) -> str:
        return f"computed {question}"

    assert await ask.prefill([]) == 0
    assert await ask.prefill([("   ", "blank"), ("a@0", "A")]) == 1
    assert await ask.prefill([(f"b@{d}", f"B{d}") for d in range(0, 50, 10)]) == 5
    assert ask.cache_info().entries == 3  # max_entries per partition
    assert ask.cache_info().evictions == 3
    assert await ask("b@41") == "B40"
    clock.advance(61)
    assert await ask("b@41") == "computed b@41"  # the prefilled entry expired with the function's ttl


async def test_prefilling_the_same_text_again_replaces_its_answer() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("a@0", "old")])
    await ask.prefill([("a@0", "new")])
    assert await ask("a@0") == "new"
    assert ask.cache_info().entries == 1


@settings(max_examples=25, deadline=None)
@given(angles=st.lists(st.integers(0, 359), min_size=1, max_size=12, unique=True))
def test_every_prefilled_text_is_answered_exactly_with_its_own_value(angles: list[int]) -> None:
    import anyio

    async def run() -> None:
        @semantic_cached(embed=AngleEmbedder(), threshold=0.999, cache_embeddings=False)
        async def ask(question: str) -> str:
            raise AssertionError("a prefilled text was computed")

        texts = [f"t{n % 3}@{a}" for n, a in enumerate(angles)]
        assert await ask.prefill([(t, f"value of {t}") for t in texts]) == len(texts)
        for t in texts:
            assert await ask(t) == f"value of {t}"

    anyio.run(run)


def test_a_sync_function_is_prefilled_the_same_way() -> None:
    calls: list[str] = []

    @semantic_cached(embed=AngleEmbedder(), threshold=0.95, cache_embeddings=False)
    def ask(question: str, tenant: str) -> str:
        calls.append(question)
        return f"computed {question}"

    assert ask.prefill([("a@0", "acme's answer")], tenant="acme") == 1
    assert ask("a@3", "acme") == "acme's answer"
    assert ask("a@3", "globex") == "computed a@3"
    assert calls == ["a@3"]


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
async def test_a_clear_while_a_chunk_is_embedded_stores_nothing_of_it(on_disk: bool, tmp_path: Path) -> None:
    """A clear that lands while prefill awaits the embedder: the chunk embedded meanwhile is not stored."""
    if on_disk:
        cachelayers.configure(vector_index=f"usearch://{tmp_path}")
    inner = AngleEmbedder()
    embedding, go_on = anyio.Event(), anyio.Event()

    async def slow(texts: list[str]) -> Any:
        if texts[0].startswith("a@"):  # the prefill's chunk
            embedding.set()
            await go_on.wait()
        return inner(texts)

    slow.name = "slow-angles"  # type: ignore[attr-defined]  # a disk store needs a name known after restarts

    @semantic_cached(embed=slow, threshold=0.99)
    async def ask(question: str) -> str:
        return "computed " + question

    async with anyio.create_task_group() as tg:
        async def prefill() -> None:
            assert await ask.prefill([("a@0", "stale 0"), ("a@40", "stale 40")]) == 0

        tg.start_soon(prefill)
        await embedding.wait()
        await ask.cache_clear()
        go_on.set()
    assert ask.cache_info().entries == 0
    assert await ask("a@0") == "computed a@0"
    await ask.aclose()
