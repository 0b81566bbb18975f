"""`PairVerifier`: a logistic regression over cheap features of two texts, as a `semantic_cached` verifier."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayers import ConfigError, explain, semantic_cached
from cachelayers.embedders import PAIR_FEATURES, PAIR_VERIFIER_WEIGHTS, PairVerifier, pair_features
from tests.semantic_helpers import AngleEmbedder

pytestmark = pytest.mark.anyio

texts = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), max_size=40)


@settings(max_examples=200, deadline=None)
@given(texts, texts, st.floats(-1.0, 1.0))
def test_features_are_bounded_named_and_symmetric_in_the_texts(a: str, b: str, similarity: float) -> None:
    features = pair_features(a, b, similarity)
    assert len(features) == len(PAIR_FEATURES) == len(PAIR_VERIFIER_WEIGHTS) - 1
    assert features[0] == similarity
    assert all(0.0 <= f <= 1.0 for f in features[1:])
    assert features == pair_features(b, a, similarity)


def test_features_see_numbers_negations_and_shared_words() -> None:
    same = pair_features("How do I install version 2?", "how do i install VERSION 2", 0.99)
    assert same[PAIR_FEATURES.index("token_jaccard")] == 1.0
    assert same[PAIR_FEATURES.index("number_mismatch")] == 0.0
    other_number = pair_features("How do I install version 2?", "How do I install version 3?", 0.99)
    assert other_number[PAIR_FEATURES.index("number_mismatch")] == 1.0
    negated = pair_features("Is the cache safe?", "Is the cache not safe?", 0.99)
    assert negated[PAIR_FEATURES.index("negation_mismatch")] == 1.0


def test_the_probability_rises_with_similarity_and_falls_with_a_changed_number() -> None:
    verifier = PairVerifier()
    low = verifier.probability("How do I reset my password?", "How can I reset my password?", 0.6)
    high = verifier.probability("How do I reset my password?", "How can I reset my password?", 0.95)
    assert 0.0 < low < high < 1.0
    changed = verifier.probability("What is new in version 2?", "What is new in version 3?", 0.95)
    assert changed < verifier.probability("What is new in version 2?", "What is new in version 2 ?", 0.95)


@pytest.mark.parametrize(("arguments", "field"), [
    ({"min_probability": 1.5}, "min_probability"),
    ({"min_probability": -0.1}, "min_probability"),
    ({"weights": (1.0, 2.0)}, "weights"),
    ({"weights": (float("nan"),) * (len(PAIR_FEATURES) + 1)}, "weights"),
])
def test_bad_configuration_names_the_field(arguments: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PairVerifier(**arguments)  # type: ignore[arg-type]
    assert caught.value.field == field


async def test_a_rejected_candidate_is_computed_and_counted() -> None:
    # bias -1 on every feature at zero weight: probability 0.27, below 0.5, so every candidate is rejected
    reject = PairVerifier(0.5, weights=(-1.0,) + (0.0,) * len(PAIR_FEATURES))

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, verifier=reject, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("a@0", "zero")])
    with explain() as info:
        assert await ask("a@1") == "computed a@1"
    assert info.last is not None
    assert (info.last.level, info.last.rejected) == ("computed", 1)
    assert ask.cache_info().verifier_rejections == 1


async def test_an_accepted_candidate_is_served() -> None:
    accept = PairVerifier(0.5, weights=(1.0,) + (0.0,) * len(PAIR_FEATURES))

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, verifier=accept, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("a@0", "zero")])
    assert await ask("a@1") == "zero"


class RejectingEmbedder(AngleEmbedder):
    """An `AngleEmbedder` carrying a measured default configuration whose verifier rejects everything."""

    default_threshold = 0.9  # type: ignore[assignment]
    default_verifier = PairVerifier(0.5, weights=(-1.0,) + (0.0,) * len(PAIR_FEATURES))


async def test_the_embedder_default_verifier_comes_with_its_default_threshold_only() -> None:
    @semantic_cached(embed=RejectingEmbedder(), cache_embeddings=False)
    async def defaults(question: str) -> str:
        return f"computed {question}"

    @semantic_cached(embed=RejectingEmbedder(), threshold=0.9, cache_embeddings=False)
    async def own_threshold(question: str) -> str:
        return f"computed {question}"

    for ask in (defaults, own_threshold):
        await ask.prefill([("a@0", "zero")])
    assert await defaults("a@1") == "computed a@1"
    assert defaults.cache_info().verifier_rejections == 1
    assert await own_threshold("a@1") == "zero"
