"""Answer agreement: would-be hits checked by computing them, as often as the disagreements seen require."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, cast

import anyio
import numpy as np
import pydantic
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cachelayers import AnswerAgreement, ConfigError, explain, semantic_cached
from tests.semantic_helpers import AngleEmbedder

pytestmark = pytest.mark.anyio


def test_a_cold_policy_checks_nearly_everything() -> None:
    policy = AnswerAgreement(0.02)
    assert policy.estimated_error == 0.5  # one agreeing and one disagreeing check assumed
    assert policy.rate == pytest.approx(0.96)
    assert (policy.window, policy.min_rate) == (50, 0.01)
    assert AnswerAgreement(0.5).window == 10
    assert AnswerAgreement(0.02, window=48).window == 48  # 1/50 = 0.02: the shortest window reaching the floor


def test_agreements_lower_the_rate_to_the_floor_and_disagreements_raise_it() -> None:
    policy = AnswerAgreement(0.02, window=50, min_rate=0.05, seed=1)
    for _ in range(50):
        policy.observe("same", "same")
    assert policy.estimated_error == pytest.approx(1 / 52)
    assert policy.rate == 0.05  # 1 - 0.02 / (1/52) < 0: the floor keeps a few checks
    for _ in range(3):
        policy.observe("new", "old")
    assert policy.estimated_error == pytest.approx(4 / 52)  # the window slid: 47 agreeing, 3 not
    assert policy.rate == pytest.approx(1 - 0.02 / (4 / 52))
    assert (policy.checks, policy.disagreements) == (53, 3)


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(st.booleans(), max_size=120), window=st.integers(1, 120),
       max_error=st.floats(0.01, 0.5), min_rate=st.floats(0.0, 1.0))
def test_property_the_rate_follows_the_window_and_a_disagreement_never_lowers_it(
        outcomes: list[bool], window: int, max_error: float, min_rate: float) -> None:
    assume(window + 2 > 1 / max_error)
    policy = AnswerAgreement(max_error, window=window, min_rate=min_rate, seed=0)
    for agreed in outcomes:
        policy.observe(1, 1 if agreed else 2)
    recent = outcomes[-window:]
    error = (recent.count(False) + 1) / (len(recent) + 2)
    assert policy.estimated_error == pytest.approx(error)
    assert min_rate <= policy.rate <= 1.0
    assert policy.rate == pytest.approx(min(1.0, max(min_rate, 1 - max_error / error)))
    disagreeing, agreeing = AnswerAgreement(max_error, window=window, min_rate=min_rate), \
        AnswerAgreement(max_error, window=window, min_rate=min_rate)
    for agreed in outcomes:
        disagreeing.observe(1, 1 if agreed else 2)
        agreeing.observe(1, 1 if agreed else 2)
    disagreeing.observe(1, 2)
    agreeing.observe(1, 1)
    assert disagreeing.rate >= agreeing.rate


@pytest.mark.parametrize(("field", "kwargs"), [
    ("max_error", {"max_error": 0.0}), ("max_error", {"max_error": 1.0}), ("max_error", {"max_error": math.nan}),
    ("max_error", {"max_error": "2%"}), ("max_error", {"max_error": True}), ("window", {"window": 0}),
    ("window", {"window": 2.5}), ("window", {"max_error": 0.02, "window": 47}), ("min_rate", {"min_rate": -0.1}),
    ("min_rate", {"min_rate": 1.5}), ("agree", {"agree": "equal"}), ("seed", {"seed": [1]}),
    ("seed", {"seed": object()}), ("seed", {"seed": True}),
])
def test_bad_arguments_are_config_errors_naming_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as error:
        AnswerAgreement(**kwargs)
    assert error.value.field == field


def test_numpy_numbers_are_accepted_as_shares() -> None:
    policy = AnswerAgreement(cast(float, np.float32(0.02)), min_rate=np.float64(0.05), seed="run 1")
    assert policy.max_error == pytest.approx(0.02)
    assert policy.min_rate == 0.05
    assert isinstance(policy.max_error, float)


@dataclasses.dataclass
class Embedded:
    text: str
    vector: np.ndarray


class EmbeddedModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    text: str
    vector: list[Any]


class Quote(pydantic.BaseModel):
    plan: str
    discount: float


@dataclasses.dataclass
class PlainQuote:
    plan: str
    discount: float


@pytest.mark.parametrize(("new", "cached", "agreed"), [
    # distinct NaN objects, as in a value read back from a store (the same object would pass `is` in ==)
    (Quote(plan="a", discount=float("nan")), Quote(plan="a", discount=float("nan")), True),  # its own == is False
    (Quote(plan="a", discount=float("nan")), Quote(plan="b", discount=float("nan")), False),
    (Quote(plan="a", discount=1.0), Quote(plan="a", discount=2.0), False),
    (PlainQuote("a", float("nan")), PlainQuote("a", float("nan")), True),
    (PlainQuote("a", float("nan")), PlainQuote("b", float("nan")), False),
    (np.arange(4.0), np.arange(4.0), True),
    (np.arange(4.0), np.arange(4.0) + 1, False),
    (np.arange(4.0), np.arange(5.0), False),  # another shape
    (np.array([1.0, np.nan]), np.array([1.0, np.nan]), True),  # NaN is NaN in a value read back
    (np.array(["a", "b"]), np.array(["a", "b"]), True),  # no NaN in strings: compared without it
    ({"vector": np.ones(3), "label": "x"}, {"vector": np.ones(3), "label": "x"}, True),
    ({"vector": np.ones(3), "label": "x"}, {"vector": np.zeros(3), "label": "x"}, False),
    ({"vector": np.ones(3)}, {"other": np.ones(3)}, False),
    ([np.ones(2), 1], [np.ones(2), 1], True),
    ((np.ones(2),), [np.ones(2)], False),  # a tuple is not a list
    (math.nan, math.nan, True),
    ({"a": 1}, {"a": 1.0}, True),
    ([1, 2, 3], np.array([1, 2, 3]), False),  # an array only equals an array
    (OrderedDict(v=np.ones(2)), OrderedDict(v=np.ones(2)), True),
    ({(1, "a"): 2}, {(1, "a"): 2}, True),
    (np.float32("nan"), np.float32("nan"), True),
    (complex("nan+1j"), complex("nan+1j"), True),
    (Embedded("x", np.ones(3)), Embedded("x", np.ones(3)), True),  # a dataclass holding an array
    (Embedded("x", np.ones(3)), Embedded("x", np.zeros(3)), False),
    (EmbeddedModel(text="x", vector=[np.ones(2)]), EmbeddedModel(text="x", vector=[np.ones(2)]), True),
    (EmbeddedModel(text="x", vector=[np.ones(2)]), EmbeddedModel(text="y", vector=[np.ones(2)]), False),
    ("answer", "answer", True),
    ("answer", "other", False),
])
def test_the_default_agree_compares_arrays_and_containers_of_them_whole(new: Any, cached: Any,
                                                                         agreed: bool) -> None:
    policy = AnswerAgreement(0.02)
    assert policy.observe(new, cached) is agreed
    assert policy.error is None


def test_an_ambiguous_comparison_is_a_disagreement_that_keeps_its_error() -> None:
    class Elementwise:  # == answers element by element, like a pandas object without .equals
        def __eq__(self, other: object) -> Any:
            return np.array([True, False])

    policy = AnswerAgreement(0.02)
    assert policy.observe(Elementwise(), Elementwise()) is False
    assert isinstance(policy.error, ValueError)
    assert policy.observe(1, 1) is True
    assert policy.error is None


async def test_array_answers_that_agree_are_served_rather_than_stored_again() -> None:
    policy = AnswerAgreement(0.02, seed=3)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False, agreement=policy)
    async def ask(question: str) -> np.ndarray:
        return np.ones(8)  # every question of the topic has this answer

    await ask.prefill([("a@0", np.ones(8))])
    for i in range(200):
        np.testing.assert_array_equal(await ask(f"a@{1 + (i % 20) / 10}"), np.ones(8))
    assert policy.disagreements == 0
    assert 20 <= policy.checks <= 100
    stats = ask.cache_info()
    assert stats.entries == 1  # an agreeing answer is not stored again
    assert stats.semantic_hits == 200 - policy.checks


def test_a_refused_decoration_leaves_the_policy_and_the_name_free() -> None:
    policy = AnswerAgreement(0.02)

    async def ask(question: str) -> str:
        return question

    with pytest.raises(ConfigError) as error:
        semantic_cached(embed=AngleEmbedder(), threshold=0.9, agreement=policy, max_candidates=0)(ask)
    assert error.value.field == "max_candidates"
    kept = error.value  # a traceback still referencing the refused engine (pytest.raises, a notebook)
    fixed = semantic_cached(embed=AngleEmbedder(), threshold=0.9, agreement=policy)(ask)
    assert fixed.cache._agreement is policy
    assert kept is error.value


def test_an_async_agree_is_refused_and_a_coroutine_returned_anyway_is_a_disagreement() -> None:
    async def agree(new: Any, cached: Any) -> bool:
        return True

    with pytest.raises(ConfigError) as error:
        AnswerAgreement(0.02, agree=cast(Any, agree))
    assert error.value.field == "agree"
    sneaky = AnswerAgreement(0.02, agree=cast(Any, lambda new, cached: agree(new, cached)))  # returns a coroutine
    assert sneaky.observe(1, 1) is False
    assert sneaky.disagreements == 1


def test_an_agreement_that_is_not_a_policy_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigError) as error:
        @semantic_cached(embed=AngleEmbedder(), threshold=0.9, agreement=0.02)  # type: ignore[arg-type]
        async def ask(question: str) -> str:
            return question
    assert error.value.field == "agreement"


def test_one_policy_serves_one_function() -> None:
    policy = AnswerAgreement(0.02)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, agreement=policy, name="agreement.first")
    async def first(question: str) -> str:
        return question

    with pytest.raises(ConfigError, match="already used by") as error:
        @semantic_cached(embed=AngleEmbedder(), threshold=0.9, agreement=policy, name="agreement.second")
        async def second(question: str) -> str:
            return question
    assert error.value.field == "agreement"
    assert first.cache._agreement is policy


async def test_a_checked_would_be_hit_that_disagrees_is_computed_stored_and_counted() -> None:
    calls: list[str] = []

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False,
                     agreement=AnswerAgreement(0.02, seed=0))
    async def ask(question: str) -> str:
        calls.append(question)
        return f"answer to {question}"  # every question has its own answer

    await ask.prefill([("a@0", "answer to a@0")])
    with explain() as info:
        assert await ask("a@3") == "answer to a@3"  # cos 3 degrees = 0.9986: a would-be hit, checked (rate 0.96)
        assert await ask("a@3") == "answer to a@3"  # now an entry of its own
    assert [(lookup.level, lookup.reason) for lookup in info] == [
        ("computed", "checked: the cached answer disagreed"), ("exact", None)]
    assert info[0].similarity == pytest.approx(math.cos(math.radians(3)), abs=1e-6)
    assert calls == ["a@3"]
    stats = ask.cache_info()
    assert (stats.answer_checks, stats.answer_disagreements, stats.misses, stats.semantic_hits) == (1, 1, 1, 0)
    assert stats.entries == 2


async def test_a_function_whose_answers_never_agree_serves_about_max_error_of_its_would_be_hits() -> None:
    policy = AnswerAgreement(0.02, seed=7)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.5, cache_embeddings=False, agreement=policy,
                     max_entries=10_000)
    async def ask(question: str) -> str:
        return f"answer to {question}"

    await ask.prefill([("a@0", "answer to a@0")])
    served_wrong = 0
    for i in range(1, 601):
        question = f"a@{i / 100}"  # each new question is near the entries before it, and has its own answer
        if await ask(question) != f"answer to {question}":
            served_wrong += 1
    # Every check disagreed, so the estimate is about 1 and the rate about 1 - 0.02: ~2 % of 600 were served.
    assert policy.checks + served_wrong == 600
    assert policy.disagreements == policy.checks
    assert 3 <= served_wrong <= 30  # some are served: an always-checking policy fails this
    assert ask.cache_info().semantic_hits == served_wrong


async def test_a_function_whose_answers_agree_checks_less_and_less() -> None:
    policy = AnswerAgreement(0.1, window=20, min_rate=0.1, seed=3)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.5, cache_embeddings=False, agreement=policy)
    async def ask(question: str) -> str:
        return "the one answer"

    await ask.prefill([("a@0", "the one answer")])
    for i in range(1, 401):
        assert await ask(f"a@{i / 10}") == "the one answer"
    assert policy.disagreements == 0
    assert ask.cache_info().entries == 1  # agreeing results are not stored: the entry that agreed answers them
    assert policy.rate == 0.1  # the estimate (1/22) fell below max_error: the floor
    # The first would-be hits were mostly checked, the rest at 10 %: far fewer than 400 computed.
    assert 20 <= policy.checks <= 100
    assert ask.cache_info().semantic_hits == 400 - policy.checks


async def test_an_agree_that_raises_is_a_disagreement_and_the_call_still_answers() -> None:
    def agree(new: Any, cached: Any) -> bool:
        raise RuntimeError("cannot compare")

    policy = AnswerAgreement(0.02, agree=agree, seed=0)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False, agreement=policy)
    async def ask(question: str) -> str:
        return "answer"

    await ask.prefill([("a@0", "answer")])
    assert await ask("a@2") == "answer"
    assert (policy.checks, policy.disagreements) == (1, 1)


async def test_a_custom_agree_compares_what_matters() -> None:
    policy = AnswerAgreement(0.1, window=10, agree=lambda new, cached: new["text"] == cached["text"], seed=2)
    counter = 0

    @semantic_cached(embed=AngleEmbedder(), threshold=0.5, cache_embeddings=False, agreement=policy)
    async def ask(question: str) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        return {"id": counter, "text": "same words"}  # a completion: a new id every time, the same message

    await ask("a@0")
    for i in range(1, 101):
        assert (await ask(f"a@{i / 10}"))["text"] == "same words"
    assert policy.disagreements == 0
    assert counter < 60  # equality of whole objects would have checked nearly every call


def test_the_sync_decorator_takes_the_policy_too() -> None:
    policy = AnswerAgreement(0.02, seed=0)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False, agreement=policy)
    def ask(question: str) -> str:
        return f"answer to {question}"

    ask.prefill([("a@0", "answer to a@0")])
    assert ask("a@1") == "answer to a@1"
    stats = ask.cache_info()
    assert (policy.checks, stats.answer_checks, stats.answer_disagreements, stats.misses) == (1, 1, 1, 1)
    assert stats.entries == 2
    assert ask("a@1") == "answer to a@1"
    assert ask.cache_info().exact_hits == 1


async def test_a_caller_waiting_on_a_check_of_the_same_text_gets_its_result() -> None:
    policy = AnswerAgreement(0.02, seed=0)
    calls: list[str] = []
    release = anyio.Event()

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False, agreement=policy)
    async def ask(question: str) -> str:
        calls.append(question)
        await release.wait()
        return f"answer to {question}"

    await ask.prefill([("a@0", "answer to a@0")])
    results: list[str] = []

    async def one() -> None:
        results.append(await ask("a@2"))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert results == ["answer to a@2"] * 3
    assert calls == ["a@2"]  # one check, the other two joined it
    assert (policy.checks, ask.cache_info().exact_hits) == (1, 2)


async def test_a_candidate_the_verifier_rejects_is_never_checked() -> None:
    policy = AnswerAgreement(0.02, seed=0)

    async def reject(text: str, candidate: Any) -> bool:
        return False

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False, agreement=policy,
                     verifier=reject)
    async def ask(question: str) -> str:
        return f"answer to {question}"

    await ask.prefill([("a@0", "answer to a@0")])
    with explain() as info:
        assert await ask("a@2") == "answer to a@2"
    assert policy.checks == 0
    assert (info[0].level, info[0].reason, info[0].rejected) == ("computed", None, 1)


async def test_a_check_whose_result_cannot_be_stored_still_answers_and_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    policy = AnswerAgreement(0.02, seed=0)

    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, cache_embeddings=False, agreement=policy)
    async def ask(question: str) -> str:
        return f"answer to {question}"

    await ask.prefill([("a@0", "answer to a@0")])
    store = await ask.cache.store()

    async def broken(*args: Any, **kwargs: Any) -> bool:
        raise OSError("disk full")

    monkeypatch.setattr(store, "insert", broken)
    with explain() as info:
        assert await ask("a@2") == "answer to a@2"
    assert (policy.checks, policy.disagreements) == (1, 1)
    assert info[0].reason == "checked: the cached answer disagreed"
    stats = ask.cache_info()
    assert (stats.entries, stats.index_errors, stats.answer_checks) == (1, 1, 1)
