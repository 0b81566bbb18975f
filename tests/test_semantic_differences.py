"""Long texts that share most of their words (a prompt's retrieved context) are compared by what differs."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelayers import Candidate, explain, semantic_cached
from cachelayers.engines.semantic.differences import LONG_TEXT_WORDS, differing_parts, parts_are_alike
from tests.semantic_helpers import AngleEmbedder

pytestmark = pytest.mark.anyio

CONTEXT = " ".join(f"Section {i}: the warranty covers parts and labour for item {i} under normal use."
                   for i in range(40))
QUESTIONS = [
    "Is water damage covered by the warranty?",
    "How do I cancel my subscription and get a refund?",
    "Which courier delivers orders to Norway?",
    "Can I change the email address of my account?",
    "What is the boiling point of water on Mount Everest?",
]


def test_the_parts_between_a_shared_beginning_and_end_are_what_differs() -> None:
    a = CONTEXT + "\nQuestion: " + QUESTIONS[0] + " Answer briefly."
    b = CONTEXT + "\nquestion: " + QUESTIONS[1] + " Answer briefly."
    assert differing_parts(a, b) == (QUESTIONS[0], QUESTIONS[1])
    assert differing_parts(a, a) == ("", "")
    assert differing_parts(a, CONTEXT + " Extra words. Question: " + QUESTIONS[0] + " Answer briefly.") == (
        "", "Extra words.")
    short = "How do I reset my password?"
    assert differing_parts(short, "How do I reset my router?") is None  # short texts are compared whole
    words = [f"w{i}" for i in range(LONG_TEXT_WORDS * 2)]
    other = [f"v{i}" for i in range(LONG_TEXT_WORDS * 2)]
    assert differing_parts(" ".join(words), " ".join(other)) is None  # nothing shared: compared whole
    half = words[:LONG_TEXT_WORDS] + other[LONG_TEXT_WORDS:]
    assert differing_parts(" ".join(words), " ".join(half)) == (
        " ".join(words[LONG_TEXT_WORDS:]), " ".join(other[LONG_TEXT_WORDS:]))


def test_every_region_that_differs_is_in_the_parts() -> None:
    a = "Today is 2024-05-01. " + CONTEXT + " Question: " + QUESTIONS[0]
    b = "Today is 2024-05-02. " + CONTEXT + " Question: " + QUESTIONS[1]
    assert differing_parts(a, b) == ("2024-05-01. " + QUESTIONS[0], "2024-05-02. " + QUESTIONS[1])
    middle = CONTEXT.replace("item 20 ", "item 21 ")
    assert differing_parts(CONTEXT, middle + " please") == ("20", "21 please")


async def test_a_long_prompt_whose_header_and_question_both_differ_is_not_served() -> None:
    @semantic_cached()
    async def answer(prompt: str) -> str:
        return prompt.rsplit("Question: ", 1)[1]

    with explain() as info:
        for user, question in zip(("Alice", "Bob", "Carol"), QUESTIONS, strict=False):
            assert await answer(f"The user is {user}. {CONTEXT} Question: {question}") == question
    assert [lookup.level for lookup in info] == ["computed"] * 3


async def test_the_verifier_sees_long_texts_whole_when_only_case_or_punctuation_differs() -> None:
    seen: list[tuple[str, str]] = []

    async def case_sensitive(text: str, candidate: Candidate) -> bool:  # code: API_KEY is not api_key
        seen.append((text, candidate.text))
        return text == candidate.text

    @semantic_cached(verifier=case_sensitive, threshold=0.9)
    async def run(prompt: str) -> str:
        return "ran " + prompt.rsplit(" ", 1)[1]

    assert await run(CONTEXT + " print(API_KEY)") == "ran print(API_KEY)"
    with explain() as info:
        assert await run(CONTEXT + " print(api_key)") == "ran print(api_key)"
    assert info.last is not None
    assert info.last.level == "computed"
    assert seen == [(CONTEXT + " print(api_key)", CONTEXT + " print(API_KEY)")]


def test_parts_that_need_no_embedding_are_decided_at_once() -> None:
    assert parts_are_alike("", "") is True
    assert parts_are_alike("Covered?", "covered") is True
    assert parts_are_alike("", "not") is False  # words added: what they change is unknown
    assert parts_are_alike("water damage", "a refund") is None


async def test_a_long_prompt_with_another_question_is_never_answered_from_the_first() -> None:
    calls = 0

    @semantic_cached()  # the built-in default embedder and its threshold: the context outweighs the question
    async def answer(prompt: str) -> str:
        nonlocal calls
        calls += 1
        return "answer to " + prompt.rsplit("Question: ", 1)[1]

    with explain() as info:
        for question in QUESTIONS:
            assert await answer(CONTEXT + "\nQuestion: " + question) == "answer to " + question
        assert await answer(CONTEXT + "\nquestion: " + QUESTIONS[0].upper()) == "answer to " + QUESTIONS[0]
    assert [lookup.level for lookup in info] == ["computed"] * len(QUESTIONS) + ["semantic"]
    assert calls == len(QUESTIONS)
    assert answer.cache_info().difference_rejections >= len(QUESTIONS) - 1


async def test_the_differing_parts_go_through_the_threshold_and_the_verifier() -> None:
    angles = AngleEmbedder()
    judged: list[tuple[str, str, float]] = []

    def by_last_word(texts: list[str]) -> np.ndarray:  # what a text asks is its last word ("q@<degrees>")
        return angles([text.split()[-1] for text in texts])

    async def verifier(text: str, candidate: Candidate) -> bool:
        judged.append((text, candidate.text, round(candidate.similarity, 3)))
        return text != "q@20"

    @semantic_cached(embed=by_last_word, threshold=0.9, verifier=verifier, cache_embeddings=False)
    async def answer(prompt: str) -> str:
        return "answer to " + prompt.split()[-1]

    await answer(CONTEXT + " q@0")
    with explain() as info:
        assert await answer(CONTEXT + " q@10") == "answer to q@0"  # parts at 0.985: the verifier accepts
        assert await answer(CONTEXT + " q@20") == "answer to q@20"  # parts at 0.940: the verifier refuses
        assert await answer(CONTEXT + " q@-40") == "answer to q@-40"  # parts at 0.766: below the threshold
    assert [lookup.level for lookup in info] == ["semantic", "computed", "computed"]
    assert judged[:2] == [("q@10", "q@0", 0.985), ("q@20", "q@0", 0.94)]
    assert ["q@10", "q@0"] in angles.calls  # the two parts were embedded in one call
    assert all(text != "q@-40" for text, _, _ in judged)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.lists(st.sampled_from(CONTEXT.split()), min_size=LONG_TEXT_WORDS, max_size=200),
       order=st.permutations(range(len(QUESTIONS))))
def test_no_question_after_a_shared_context_gets_another_question_s_answer(context: list[str],
                                                                          order: list[int]) -> None:
    prompt = " ".join(context) + "\nQuestion: "

    async def run() -> None:
        @semantic_cached(threshold=0.9, cache_embeddings=False)
        async def answer(text: str) -> str:
            return text.rsplit("Question: ", 1)[1]

        for i in order:
            assert await answer(prompt + QUESTIONS[i]) == QUESTIONS[i]

    anyio.run(run)


async def test_threshold_one_serves_identical_vectors_and_similarities_never_exceed_one() -> None:
    @semantic_cached(threshold=1.0)
    async def ask(question: str) -> str:
        return f"computed {question}"

    await ask("Hello World there")
    with explain() as info:
        for question in ("hello world there", "Hello World there!", "HELLO world there"):
            assert await ask(question) == "computed Hello World there"  # the same vector, whatever the rounding
    assert [lookup.level for lookup in info] == ["semantic"] * 3
    assert all(lookup.similarity is not None and lookup.similarity <= 1.0 for lookup in info)
