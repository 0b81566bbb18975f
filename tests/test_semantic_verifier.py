"""`PairVerifier`: a logistic regression over cheap features of two texts, as a `semantic_cached` verifier."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayers import Candidate, ConfigError, explain, semantic_cached
from cachelayers.embedders import PAIR_FEATURES, PAIR_VERIFIER_WEIGHTS, PairVerifier, pair_features, same_words
from cachelayers.verifiers import facts_differ
from tests.semantic_helpers import AngleEmbedder, WordsEmbedder

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
    ({"min_probability": True}, "min_probability"),  # a bool is not a probability
    ({"min_probability": float("nan")}, "min_probability"),
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

    @semantic_cached(embed=WordsEmbedder(), threshold=0.9, verifier=reject, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("how do I reset my password", "zero")])  # no numbers: the model alone decides
    with explain() as info:
        assert await ask("how can I reset my password") == "computed how can I reset my password"
    assert info.last is not None
    assert (info.last.level, info.last.rejected) == ("computed", 1)
    assert ask.cache_info().verifier_rejections == 1


async def test_an_accepted_candidate_is_served() -> None:
    accept = PairVerifier(0.5, weights=(1.0,) + (0.0,) * len(PAIR_FEATURES))

    @semantic_cached(embed=WordsEmbedder(), threshold=0.9, verifier=accept, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("how do I reset my password", "zero")])
    assert await ask("how can I reset my password") == "zero"


@pytest.mark.parametrize(("cached", "asked"), [
    ("what is the dose for 5 mg tablets", "what is the dose for 50 mg tablets"),
    ("is the bridge open today", "is the bridge not open today"),
])
async def test_a_candidate_whose_numbers_or_negation_differ_is_never_accepted(cached: str, asked: str) -> None:
    accept = PairVerifier(0.5, weights=(60.0,) + (0.0,) * len(PAIR_FEATURES))  # the model accepts anything

    @semantic_cached(embed=WordsEmbedder(), threshold=0.9, verifier=accept, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([(cached, "cached answer")])
    assert await ask(asked) == f"computed {asked}"
    assert ask.cache_info().verifier_rejections == 1


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


@pytest.mark.parametrize(("text", "other", "same"), [
    ("How do I reset my password? ", "how do I reset my password", True),
    ("How do I  reset my password?", "HOW DO I RESET MY PASSWORD!", True),
    ("\uff30\uff41\uff53\uff53\uff57\uff4f\uff52\uff44 reset", "password reset", True),  # full-width (NFKC)
    ("how do I reset my password", "how can I reset my password", False),
    ("reset my password", "my password reset", False),  # the order of the words is kept
    ("costs 2.5 dollars", "costs 25 dollars", False),
    ("I can't log in", "I cant log in", False),
    ("The `columns` method", "the columns method", True),  # backticks around a word
    ("如何重置密码\uff1f", "如何重置密码", True),  # a full-width question mark
    ("如何重置密码", "如何删除账户", False),  # other words, not "no words on both sides"
    ("Привет, мир!", "привет мир", True),
    ("What is -5 squared?", "What is 5 squared?", False),  # a sign is a word of its own
    ("Is $100 enough?", "Is €100 enough?", False),
    ("is x > 5", "is x < 5", False),
    ("2+2", "2-2", False),
    ("take .5 mg", "take 5 mg", False),  # a leading decimal point belongs to the number
    ("WHERE a != b", "WHERE a = b", False),  # a run of marks is one word: != is not =
    ("a == b", "a = b", False),
    ("jax.devices()[0]", "`jax.devices()[0]`", True),  # brackets and backticks only
    ("???", "!!!", False),  # no words: never the same words
    ("", "", False),
])
def test_same_words_ignores_case_spacing_and_punctuation_only(text: str, other: str, same: bool) -> None:
    assert same_words(text, other) is same
    assert same_words(other, text) is same


async def test_the_default_verifier_accepts_a_candidate_with_the_same_words_the_model_would_reject() -> None:
    verifier = PairVerifier(0.70)
    text, other = "How do I reset my password? ", "how do I reset my password?"
    assert verifier.probability(text, other, 1.0) < 0.70  # the model alone would reject the same question
    assert await verifier(text, Candidate(other, None, 1.0))
    assert not await verifier("How do I reset my password?", Candidate("How do I delete my account?", None, 0.95))

    reject = PairVerifier(0.5, weights=(-1.0,) + (0.0,) * len(PAIR_FEATURES))

    @semantic_cached(embed=WordsEmbedder(), threshold=0.9, verifier=reject, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask.prefill([("How do I reset my password?", "answer")])
    with explain() as info:
        assert await ask("how do I reset my password ") == "answer"  # same words: served
        assert await ask("how do I reset the password") == "computed how do I reset the password"
    assert [lookup.level for lookup in info] == ["semantic", "computed"]


RECORD = ("Patient record: adult male, hypertension, type two diabetes, chronic kidney disease stage three, "
          "penicillin allergy, current medications metformin lisinopril atorvastatin aspirin, blood pressure "
          "elevated, creatinine stable, potassium normal. Question: {}")


@pytest.mark.parametrize(("cached", "asked"), [
    ("is a daily dose of 5 mg amlodipine appropriate?", "is a daily dose of 50 mg amlodipine appropriate?"),
    ("is a daily dose of amlodipine appropriate?", "is a daily dose of amlodipine not appropriate?"),
])
async def test_the_default_configuration_refuses_a_long_prompt_differing_in_a_number_or_a_negation(
        cached: str, asked: str) -> None:
    """Under 40 words (the rule of differing words starts there), one number apart: the built-in embedder
    scores 0.98, its calibrated threshold; its default verifier (`SameFacts`) refuses the candidate."""

    @semantic_cached()
    async def advise(prompt: str) -> str:
        return f"computed {prompt[-45:]}"

    await advise.prefill([(RECORD.format(cached), "cached answer")])
    with explain() as info:
        assert await advise(RECORD.format(asked)) == f"computed {RECORD.format(asked)[-45:]}"
    assert info.last is not None
    assert info.last.rejected == 1  # the embedding found it; the verifier refused it


@pytest.mark.parametrize(("text", "other", "differ"), [
    ("dose for 5 mg", "dose for 50 mg", True),
    ("version 3.10", "version 3.1", True),
    ("it is -40 degrees", "it is 40 degrees", True),
    ("x = \u22123", "x = 3", True),  # a Unicode minus
    ("is it safe", "is it not safe", True),
    ("can I go", "I can't go", True),
    ("1,000 users", "1000 users", False),
    ("pages 10-20", "pages 10 to 20", False),  # a dash between numbers is no sign
    ("isn\u2019t it", "isn't it", False),
    ("no numbers", "none here either", False),  # both negate
])
def test_facts_differ_reads_numbers_as_written_and_negation(text: str, other: str, differ: bool) -> None:
    assert (facts_differ(text, other) is not None) is differ
    assert (facts_differ(other, text) is not None) is differ
