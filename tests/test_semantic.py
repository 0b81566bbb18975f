"""@semantic_cached in memory mode: levels, explain, partitions, TTL, eviction, verifier, bad input, fail-open."""

from __future__ import annotations

import json
import logging
import math
import traceback
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachelayers
from cachelayers import (
    Candidate,
    ConfigError,
    EmbeddingError,
    HashingEmbedder,
    SyncSemanticCachedFunction,
    explain,
    last_lookup,
    multilevel_cached,
    semantic_cached,
)
from cachelayers.backends.vectors import VectorIndex
from cachelayers.engines.semantic import SemanticFunction, arguments
from tests.conftest import FakeClock
from tests.semantic_helpers import AngleEmbedder, CountingEmbedder

pytestmark = pytest.mark.anyio


def store_of(fn: Any) -> Any:
    engine: SemanticFunction[Any, Any] = fn.cache
    assert engine._store is not None
    return engine._store


# -- levels and explain --------------------------------------------------------------------------------------


async def test_exact_semantic_and_computed_levels_are_reported_without_changing_the_return_value() -> None:
    emb = AngleEmbedder()
    calls: list[str] = []

    @semantic_cached(embed=emb, threshold=0.9)
    async def ask(question: str) -> dict[str, str]:
        calls.append(question)
        return {"answer": question}

    with explain() as info:
        first = await ask("pw@0")
        again = await ask("pw@0")
        near = await ask("pw@20")  # cos 20° = 0.94 >= 0.9
        # cos 40° = 0.77 < 0.9; pw@20 was answered, not stored, so answers never chain: computed.
        far = await ask("pw@40")
    assert first == again == near == {"answer": "pw@0"}
    assert far == {"answer": "pw@40"}
    assert calls == ["pw@0", "pw@40"]
    assert [lookup.level for lookup in info] == ["computed", "exact", "semantic", "computed"]
    assert info[2].matched_text == "pw@0"
    assert info[2].similarity == pytest.approx(math.cos(math.radians(20)), abs=1e-5)
    assert info.levels() == {"computed": 2, "exact": 1, "semantic": 1}
    last = last_lookup()
    assert last is not None
    assert last.text == "pw@40"


async def test_below_threshold_computes_and_reports_the_best_similarity() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.9)
    async def ask(question: str) -> str:
        return question

    await ask("a@0")
    with explain() as info:
        assert await ask("a@60") == "a@60"
    assert info.last is not None
    assert info.last.level == "computed"
    assert info.last.similarity == pytest.approx(0.5, abs=1e-5)
    assert info.last.matched_text is None


async def test_threshold_boundary_is_inclusive() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.5 - 1e-6)
    async def ask(question: str) -> str:
        return question

    await ask("t@0")
    assert await ask("t@60") == "t@0"  # similarity 0.5 == threshold (to float precision)


async def test_the_default_embedder_and_its_calibrated_threshold_are_used_without_arguments() -> None:
    @semantic_cached()
    async def ask(question: str) -> str:
        return question.upper()

    assert ask.cache.threshold == HashingEmbedder.default_threshold
    assert await ask("How do I reset my password?") == "HOW DO I RESET MY PASSWORD?"
    assert await ask("how do I reset my password") == "HOW DO I RESET MY PASSWORD?"
    assert await ask("What is the capital of France?") == "WHAT IS THE CAPITAL OF FRANCE?"


async def test_an_explain_block_inside_another_gives_its_calls_to_both() -> None:
    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> str:
        return question

    with explain() as outer:
        await ask("first question here")
        with explain() as inner:
            await ask("second question here")
        await ask("third question here")
    assert [lookup.text for lookup in outer] == ["first question here", "second question here",
                                                 "third question here"]
    assert [lookup.text for lookup in inner] == ["second question here"]


async def test_explain_collects_calls_made_in_child_tasks() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.9)
    async def ask(question: str) -> str:
        return question

    with explain() as info:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(ask, f"topic{i}@0")
    assert sorted(lookup.text or "" for lookup in info) == ["topic0@0", "topic1@0", "topic2@0"]


# -- partitions -----------------------------------------------------------------------------------------------


async def test_every_other_argument_is_part_of_the_partition_by_default() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.0)
    async def ask(question: str, model: str, temperature: float = 0.0) -> str:
        return f"{question}/{model}/{temperature}"

    assert await ask("q@0", "m1") == "q@0/m1/0.0"
    assert await ask("q@10", "m1") == "q@0/m1/0.0"
    assert await ask("q@10", "m2") == "q@10/m2/0.0"
    assert await ask("q@10", "m1", temperature=0.7) == "q@10/m1/0.7"
    assert await ask("q@10", model="m1", temperature=0.0) == "q@0/m1/0.0"  # normalised through the signature


async def test_a_partition_function_decides_what_must_be_equal() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.0, partition=lambda model, **_: model)
    async def ask(question: str, model: str, request_id: int) -> str:
        return f"{question}/{model}/{request_id}"

    assert await ask("q@0", "m1", 1) == "q@0/m1/1"
    assert await ask("q@5", "m1", 2) == "q@0/m1/1"  # request_id is not part of the partition
    assert await ask("q@5", "m2", 3) == "q@5/m2/3"


async def test_a_text_function_takes_the_last_user_message() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.9, text=lambda messages, **_: messages[-1]["content"],
                     partition=lambda messages, model, **_: (model, messages[:-1]))
    async def chat(messages: list[dict[str, str]], model: str) -> str:
        return messages[-1]["content"]

    system = {"role": "system", "content": "be brief"}
    assert await chat([system, {"role": "user", "content": "x@0"}], "m") == "x@0"
    assert await chat([system, {"role": "user", "content": "x@10"}], "m") == "x@0"
    other = {"role": "system", "content": "be verbose"}
    assert await chat([other, {"role": "user", "content": "x@10"}], "m") == "x@10"


partition_values = st.sampled_from(["m1", "m2"])
tenants = st.sampled_from(["acme", "globex", "initech"])
texts = st.sampled_from(["reset password", "reset my password", "password reset please", "delete account",
                         "how to delete my account", "reset password"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(tenants, partition_values, texts), min_size=1, max_size=25), st.booleans())
def test_no_call_is_ever_answered_from_another_partition_or_tenant(calls: list[tuple[str, str, str]],
                                                                  custom_partition: bool) -> None:
    """Threshold 0 answers with *any* entry of the partition, so any leak between partitions would show."""

    async def run() -> None:
        partition = (lambda tenant, model, **_: (tenant, model)) if custom_partition else None
        deco = semantic_cached(threshold=0.0, partition=partition, cache_embeddings=False, max_entries=3)

        @deco
        async def ask(question: str, tenant: str, model: str, nonce: int = 0) -> tuple[str, str, str]:
            return tenant, model, question

        for tenant, model, question in calls:
            with explain() as info:
                got = await ask(question, tenant, model)
            assert got[:2] == (tenant, model), f"answered from another partition: {got} for {tenant}/{model}"
            lookup = info.last
            assert lookup is not None
            assert lookup.level in ("exact", "semantic", "computed")
            if lookup.level != "computed":
                assert lookup.matched_text == got[2]

    anyio.run(run)


async def test_partitions_of_equal_looking_scalars_never_share_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The partition digest of plain scalar arguments is remembered per function: ``1``, ``True``, ``1.0``,
    ``"1"``, ``b"1"`` (equal or alike to Python) stay distinct partitions, also after the memo fills and starts
    again (its size is made 2 here), and each digest is the one computed without the memo."""
    monkeypatch.setattr(arguments, "_MEMO_SIZE", 2)

    @semantic_cached(threshold=0.0, cache_embeddings=False)
    async def ask(question: str, model: Any) -> tuple[str, Any]:
        return question, model

    models: list[Any] = [1, True, 1.0, "1", b"1", None, 0, False, 2**70]
    for round_ in range(2):
        for model in models:
            got = await ask(f"question {round_}", model)
            assert type(got[1]) is type(model), (model, got)
            assert got[1] == model, (model, got)
    splitter = ask.cache._split
    for model in models:
        expected = splitter._digest({"model": model})
        assert splitter.split({"question": "q", "model": model})[1] == expected
    assert len(splitter._memo) <= 2


async def test_an_unkeyable_partition_argument_raises_a_type_error_naming_it() -> None:
    @semantic_cached(threshold=0.9)
    async def ask(question: str, client: object) -> str:
        return question

    with pytest.raises(cachelayers.UnkeyableArgumentError, match="client") as raised:
        await ask("q", object())
    assert "Pass partition=... to the decorator" in str(raised.value)  # semantic_cached has no key=


# -- configuration errors --------------------------------------------------------------------------------------


def test_a_numpy_threshold_and_margin_are_taken() -> None:
    options: dict[str, Any] = {"threshold": np.float32(0.9), "margin": np.float64(0.05)}  # e.g. read from a config
    fn = semantic_cached(**options)(_noop)
    assert fn.cache.threshold == pytest.approx(0.9)
    assert fn.cache.margin == 0.05


@pytest.mark.parametrize("threshold", [-0.01, 1.01, math.nan, math.inf, True, "0.9"])
def test_a_threshold_outside_0_1_is_a_config_error_at_decoration(threshold: Any) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        semantic_cached(threshold=threshold)(_noop)


async def _noop(question: str, model: str = "m") -> str:
    return question


def test_bad_decoration_arguments_are_config_errors_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="text"):
        semantic_cached(threshold=0.9, text="prompt")(_noop)
    with pytest.raises(ConfigError, match="partition"):
        semantic_cached(threshold=0.9, text=lambda question, **_: question)(_noop)
    with pytest.raises(ConfigError, match="threshold"):
        semantic_cached(embed=AngleEmbedder())(_noop)  # no calibrated default for this embedder
    with pytest.raises(ConfigError, match="max_entries"):
        semantic_cached(threshold=0.9, max_entries=0)(_noop)
    with pytest.raises(ConfigError, match="ttl"):
        semantic_cached(threshold=0.9, ttl=-1)(_noop)
    with pytest.raises(ConfigError, match="vector_index"):
        semantic_cached(threshold=0.9, vector_index="faiss:///tmp/x")(_noop)
    with pytest.raises(ConfigError, match="dtype"):
        semantic_cached(threshold=0.9, vector_index="memory://?dtype=f8")(_noop)
    for url in ("redis+cluster://", "redis://localhost:6379/x", "redis+cluster://localhost:7000/3"):
        with pytest.raises(ConfigError, match="vector_index"):
            semantic_cached(threshold=0.9, vector_index=url)(_noop)
    with pytest.raises(ConfigError, match="namespace"):
        semantic_cached(threshold=0.9, namespace=5)(_noop)  # type: ignore[arg-type]
    for name in ("", "   "):
        with pytest.raises(ConfigError, match="name"):
            semantic_cached(threshold=0.9, name=name)(_noop)
    with pytest.raises(ConfigError, match="cache_embeddings"):
        semantic_cached(threshold=0.9, cache_embeddings="no")(_noop)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"text='options'.*collects several arguments"):
        semantic_cached(threshold=0.9, text="options")(_varargs)
    with pytest.raises(ConfigError, match="no parameter to take the text from"):
        semantic_cached(threshold=0.9)(_only_varargs)
    with pytest.raises(TypeError, match="needs a function"):
        semantic_cached(threshold=0.9)("not a function")  # type: ignore[call-overload]
    # A plain function is welcome since issue 14 (tests/test_sync.py).
    assert isinstance(semantic_cached(threshold=0.9)(lambda question: question), SyncSemanticCachedFunction)


async def _varargs(question: str, **options: Any) -> str:
    return question


async def _only_varargs(*args: Any) -> str:
    return ""


async def test_an_ignored_first_parameter_is_not_taken_for_the_text() -> None:
    @semantic_cached(threshold=0.9, ignore=("client",))
    async def ask(client: object, question: str, tenant: str) -> str:
        return f"{tenant}: {question}"

    with explain() as info:
        assert await ask(object(), "how do I reset my password", "a") == "a: how do I reset my password"
        assert await ask(object(), "how do I reset my password", "a") == "a: how do I reset my password"
    assert [(lookup.level, lookup.text) for lookup in info] == [
        ("computed", "how do I reset my password"), ("exact", "how do I reset my password")]


async def test_a_non_string_text_is_a_type_error_at_call_time() -> None:
    calls = 0

    @semantic_cached(threshold=0.9)
    async def ask(question: Any) -> str:
        nonlocal calls
        calls += 1
        return str(question)

    with pytest.raises(TypeError, match="must be a str"):
        await ask(42)
    assert calls == 0


async def test_empty_text_runs_uncached() -> None:
    emb = CountingEmbedder(HashingEmbedder())
    calls = 0

    @semantic_cached(embed=emb, threshold=0.9)
    async def ask(question: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    with explain() as info:
        assert await ask("   ") == 1
        assert await ask("   ") == 2
    assert [lookup.level for lookup in info] == ["uncached", "uncached"]
    assert info[0].reason == "empty text"
    assert emb.texts == []
    assert ask.cache_info().uncached == 2


async def test_wrong_arguments_reach_the_function_as_its_own_type_error() -> None:
    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> str:
        return question

    with pytest.raises(TypeError):
        await ask()  # type: ignore[call-arg, misc]


# -- fail-open -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["nan", "inf", "dimension", "rows", "zeros", "raise", "ragged"])
async def test_a_broken_embedder_makes_the_call_proceed_uncached_and_is_counted(broken: str) -> None:
    emb = CountingEmbedder(HashingEmbedder(64), broken=broken)
    calls = 0

    @semantic_cached(embed=emb, threshold=0.5)
    async def ask(question: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    with explain() as info:
        assert await ask("hello world") == 1
        assert await ask("hello world") == 2  # nothing was stored
    assert [lookup.level for lookup in info] == ["uncached", "uncached"]
    assert info[0].reason is not None
    assert "embedding failed" in info[0].reason
    assert ask.cache_info().embed_errors == 2
    assert len(store_of(ask)) == 0


async def test_strict_mode_raises_embedding_errors() -> None:
    cachelayers.configure(strict=True)
    emb = CountingEmbedder(HashingEmbedder(64), broken="nan")

    @semantic_cached(embed=emb, threshold=0.5)
    async def ask(question: str) -> str:
        return question

    with pytest.raises(EmbeddingError, match="NaN"):
        await ask("hello")


async def test_an_index_failure_makes_the_call_proceed_uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    @semantic_cached(threshold=0.5, cache_embeddings=False)
    async def ask(question: str) -> str:
        return question

    await ask("first question")

    def broken(self: VectorIndex, vector: np.ndarray, count: int = 1) -> Any:
        raise RuntimeError("index corrupted")

    monkeypatch.setattr(VectorIndex, "search", broken)
    with explain() as info:
        assert await ask("second question") == "second question"
    assert info.last is not None
    assert info.last.level == "uncached"
    assert ask.cache_info().index_errors == 1


async def test_a_failing_partition_function_does_not_fail_the_call() -> None:
    @semantic_cached(threshold=0.5, partition=lambda model, **_: model["missing"])
    async def ask(question: str, model: Any) -> str:
        return question

    assert await ask("q", {}) == "q"  # KeyError
    with explain() as info:
        assert await ask("q", None) == "q"  # TypeError ('NoneType' object is not subscriptable), the user's own
    assert ask.cache_info().uncached == 2
    assert info.last is not None
    assert info.last.level == "uncached"
    assert info.last.reason is not None
    assert info.last.reason.startswith("TypeError")

    @semantic_cached(threshold=0.5, text=lambda messages, **_: messages[-1]["content"],
                     partition=lambda messages, **_: len(messages))
    async def chat(messages: Any) -> str:
        return "reply"

    assert await chat(None) == "reply"  # the text= function raises TypeError: uncached too
    assert chat.cache_info().uncached == 1


async def test_a_text_with_a_lone_surrogate_does_not_fail_the_call() -> None:
    calls = 0

    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> str:
        nonlocal calls
        calls += 1
        return "answer"

    broken = json.loads('"what is \\ud83d"')  # a truncated emoji, as JSON lets through
    assert await ask(broken) == "answer"
    assert calls == 1


async def test_each_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    angles = AngleEmbedder()
    down = False

    def emb(texts: list[str]) -> Any:
        if down:
            raise ConnectionError("embedding service unreachable")
        return angles(texts)

    @semantic_cached(embed=emb, threshold=0.9, cache_embeddings=False)
    async def ask(question: str) -> str:
        return question

    caplog.set_level(logging.WARNING, logger="cachelayers")
    for outage in range(2):
        down = True
        for i in range(3):
            assert await ask(f"o@{outage * 10 + i}") == f"o@{outage * 10 + i}"
        down = False
        for i in range(3):
            await ask(f"o@{50 + outage * 10 + i}")
    lines = [r.getMessage() for r in caplog.records if "embedder" in r.getMessage()]
    assert [line.rsplit(" ", 1)[-1] if line.endswith("recovered") else "failing" for line in lines] == [
        "failing", "recovered", "failing", "recovered"]


async def test_a_computation_running_during_a_clear_stores_nothing() -> None:
    started, release = anyio.Event(), anyio.Event()
    calls = 0

    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await release.wait()
        return f"answer {calls} from the data as it was"

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "what does the report say")
        await started.wait()
        await ask.invalidate_all()  # the data changed while the first call was computing
        release.set()
    with explain() as info:
        assert await ask("what does the report say") == "answer 2 from the data as it was"
    assert info.last is not None
    assert info.last.level == "computed"
    assert ask.cache_info().entries == 1


async def test_clears_are_limited_and_audited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    cachelayers.configure(invalidation_limit="1/minute")

    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> str:
        return question

    await ask("q")
    await ask.invalidate_all()
    with pytest.raises(cachelayers.RateLimitExceeded):
        await ask.cache_clear()
    records = [r.audit for r in caplog.records if r.name == "cachelayers.audit" and hasattr(r, "audit")
               and r.audit["event"] == "clear"]
    assert [(a["event"], a["outcome"], a["tiers"]) for a in records] == [
        ("clear", "ok", [f"semantic:{ask.cache.identity}"]), ("clear", "refused", [f"semantic:{ask.cache.identity}"])]


# -- TTL, eviction, key reuse ----------------------------------------------------------------------------------


async def test_entries_expire_at_their_absolute_ttl_and_hits_do_not_extend_it(clock: FakeClock) -> None:
    emb = AngleEmbedder()
    calls = 0

    @semantic_cached(embed=emb, threshold=0.9, ttl=60, clock=clock)
    async def ask(question: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await ask("q@0") == 1
    clock.advance(50)
    assert await ask("q@10") == 1  # semantic hit at 50 s
    assert await ask("q@0") == 1  # exact hit at 50 s
    clock.advance(11)  # 61 s after insert: expired although it was just used
    assert await ask("q@10") == 2
    assert await ask("q@0") == 2  # the new entry (q@10, 2) answers; the expired one never does
    clock.advance(61)
    assert await ask("q@30") == 3
    await store_of(ask).sweep()
    assert [e.text for e in store_of(ask).entries.values()] == ["q@30"]
    assert ask.cache_info().expirations >= 1


async def test_settings_default_ttl_applies_when_the_decorator_gives_none(clock: FakeClock) -> None:
    cachelayers.configure(default_ttl=10)
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.9, clock=clock)
    async def ask(question: str) -> float:
        return clock()

    first = await ask("q@0")
    clock.advance(11)
    assert await ask("q@0") != first


async def test_capacity_per_partition_evicts_least_recently_used_vector_and_payload() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.99, max_entries=3, cache_embeddings=False)
    async def ask(question: str, tenant: str) -> str:
        return f"{question}/{tenant}"

    for topic in ("a", "b", "c"):
        await ask(f"{topic}@0", "t1")
    await ask("z@0", "t2")
    await ask("a@0", "t1")  # a is now the most recently used in t1
    await ask("d@0", "t1")  # evicts b (least recently used)
    store = store_of(ask)
    texts = sorted(e.text for e in store.entries.values() if e.text != "z@0")
    assert texts == ["a@0", "c@0", "d@0"]
    part = store.partitions[next(iter(store.entries.values())).partition]
    assert all(len(p.index) == len(p.lru) for p in store.partitions.values())
    assert sum(len(p.index) for p in store.partitions.values()) == 4
    assert len(part.index) <= 3
    with explain() as info:
        assert await ask("b@0", "t1") == "b@0/t1"  # recomputed: no vector or payload of b survived
    assert info.last is not None
    assert info.last.level == "computed"
    assert ask.cache_info().evictions == 2
    assert await ask("z@0", "t2") == "z@0/t2"  # the other partition was untouched


async def test_a_partition_of_capacity_one_keeps_serving_its_newest_entry() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.99, max_entries=1, cache_embeddings=False)
    async def ask(question: str) -> str:
        return question

    await ask("a@0")
    await ask("b@0")  # evicts a@0, the partition's only entry
    with explain() as info:
        assert await ask("b@0") == "b@0"
    assert info.last is not None
    assert info.last.level == "exact"
    assert store_of(ask).find_exact(next(iter(store_of(ask).partitions)), "b@0") is not None


def test_vector_index_schemes_are_in_the_one_registry() -> None:
    from cachelayers.backends.registry import registered_schemes

    assert registered_schemes("vector_index") == ["memory", "redis", "redis+cluster", "rediss", "usearch"]


async def test_removed_keys_are_reused() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.999, max_entries=4, cache_embeddings=False)
    async def ask(question: str) -> str:
        return question

    for i in range(40):
        await ask(f"k{i % 4}@{i * 3}")
    store = store_of(ask)
    assert len(store) == 4
    assert store._next_key <= 8  # keys of evicted entries were handed out again
    assert max(store.entries) < 8


async def test_same_text_recomputed_after_expiry_replaces_the_entry(clock: FakeClock) -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.9, ttl=5, clock=clock)
    async def ask(question: str) -> float:
        return clock()

    await ask("q@0")
    clock.advance(6)
    await ask("q@0")
    store = store_of(ask)
    assert len(store) == 1
    assert sum(len(p.index) for p in store.partitions.values()) == 1


# -- verifier ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain-function"])
async def test_a_verifier_confirms_or_rejects_candidates_before_they_are_served(plain: bool) -> None:
    emb = AngleEmbedder()
    seen: list[tuple[str, Candidate]] = []

    def judge(text: str, candidate: Candidate) -> bool:
        seen.append((text, candidate))
        return not text.endswith("@15")

    async def judge_async(text: str, candidate: Candidate) -> bool:
        return judge(text, candidate)

    @semantic_cached(embed=emb, threshold=0.9, verifier=judge if plain else judge_async)
    async def ask(question: str) -> str:
        return f"answer {question}"

    await ask("v@0")
    assert await ask("v@10") == "answer v@0"
    with explain() as info:
        assert await ask("v@15") == "answer v@15"
    assert info.last is not None
    assert info.last.level == "computed"
    assert info.last.rejected >= 1
    text, candidate = seen[0]
    assert text == "v@10"
    assert candidate.text == "v@0"
    assert candidate.value == "answer v@0"
    assert candidate.similarity == pytest.approx(math.cos(math.radians(10)), abs=1e-5)
    assert ask.cache_info().verifier_rejections >= 1
    assert ask.cache_info().verifier_errors == 0  # a plain function's bool is not awaited


async def test_a_rejected_candidate_lets_the_next_candidate_be_tried() -> None:
    emb = AngleEmbedder()

    async def verifier(text: str, candidate: Candidate) -> bool:
        return candidate.text != "w@0"

    @semantic_cached(embed=emb, threshold=0.9, verifier=verifier)
    async def ask(question: str) -> str:
        return question

    await ask("w@0")
    with explain():
        await ask("w@24")  # 0.91 from w@0: rejected, so computed and stored
    with explain() as info:
        assert await ask("w@10") == "w@24"  # w@0 is nearer (0.985) but rejected; w@24 (0.97) is accepted
    assert info.last is not None
    assert info.last.level == "semantic"
    assert info.last.rejected == 1


async def test_a_verifier_that_raises_rejects_and_is_counted() -> None:
    emb = AngleEmbedder()

    async def verifier(text: str, candidate: Candidate) -> bool:
        raise RuntimeError("judge unavailable")

    @semantic_cached(embed=emb, threshold=0.9, verifier=verifier)
    async def ask(question: str) -> str:
        return question

    await ask("e@0")
    assert await ask("e@5") == "e@5"
    assert ask.cache_info().verifier_errors == 1


@pytest.mark.parametrize("verdict", ["NO", "false", [False], np.array([False, False]), 1, None],
                         ids=["judge-reply", "str", "list", "array", "int", "none"])
async def test_a_verdict_that_is_not_a_bool_rejects_and_is_counted(verdict: Any) -> None:
    """An LLM judge's "NO" is truthy and a 2-element array has no truth: neither may serve, nor fail the call."""
    emb = AngleEmbedder()

    def verifier(text: str, candidate: Candidate) -> Any:
        return verdict

    @semantic_cached(embed=emb, threshold=0.9, verifier=verifier)
    async def ask(question: str) -> str:
        return question

    await ask("e@0")
    assert await ask("e@5") == "e@5"  # computed: the candidate e@0 was not accepted
    assert ask.cache_info().verifier_errors == 1


@pytest.mark.parametrize("verdict", [True, np.True_])
async def test_python_and_numpy_true_accept(verdict: Any) -> None:
    @semantic_cached(embed=AngleEmbedder(), threshold=0.9, verifier=lambda text, candidate: verdict)
    async def ask(question: str) -> str:
        return question

    await ask("e@0")
    assert await ask("e@5") == "e@0"
    assert ask.cache_info().verifier_errors == 0


# -- embeddings: cached and batched -----------------------------------------------------------------------------


async def test_embeddings_are_cached_per_text() -> None:
    emb = CountingEmbedder(HashingEmbedder(64))

    @semantic_cached(embed=emb, threshold=0.99)
    async def ask(question: str, model: str) -> str:
        return question + model

    await ask("what is rust", "m1")
    await ask("what is rust", "m2")  # another partition: the embedding is reused, not recomputed
    assert emb.texts == ["what is rust"]


async def test_concurrent_calls_are_embedded_in_one_batch() -> None:
    emb = CountingEmbedder(HashingEmbedder(64))
    batches: list[int] = []
    inner = emb.__call__

    def counting(texts: list[str]) -> object:
        batches.append(len(texts))
        return inner(texts)

    emb.__call__ = counting  # type: ignore[method-assign]

    class Wrapper:
        name = emb.name
        ndim = 64
        default_threshold = 0.99

        def __call__(self, texts: list[str]) -> object:
            return counting(texts)

    @semantic_cached(embed=Wrapper())
    async def ask(question: str) -> str:
        return question

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(ask, f"distinct question number {i} about {'xyz' * i}")
    assert sum(batches) == 8
    assert max(batches) > 1


async def test_identical_concurrent_calls_run_the_function_once() -> None:
    calls = 0
    started = anyio.Event()

    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep(0.01)
        return calls

    results: list[int] = []

    async def one() -> None:
        results.append(await ask("same question"))

    with explain() as info:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
    assert calls == 1
    assert results == [1] * 5
    # the four that joined the running call say so: they were not answered by a stored entry
    assert sorted((lookup.level, lookup.tier) for lookup in info) == [("computed", None)] + [("exact", "in-flight")] * 4


async def test_a_call_that_joins_the_identical_running_call_is_reported_as_that_call_was_answered() -> None:
    angles = AngleEmbedder()
    down = False

    async def emb(texts: list[str]) -> Any:
        await anyio.sleep(0.05)  # so the identical calls meet while the first is running
        if down:
            raise RuntimeError("embedder down")
        return angles(texts)

    @semantic_cached(embed=emb, threshold=0.9, cache_embeddings=False)
    async def ask(question: str) -> str:
        return f"answer {question}"

    await ask("j@0")

    async def together(question: str) -> cachelayers.Explanation:
        with explain() as info:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(ask, question)
        return info

    info = await together("j@5")  # a semantic hit of j@0, and two callers who joined it
    assert sorted((lookup.level, lookup.tier or "", lookup.matched_text) for lookup in info) == [
        ("semantic", "", "j@0"), ("semantic", "in-flight", "j@0"), ("semantic", "in-flight", "j@0")]
    assert ask.cache_info().semantic_hits == 3
    down = True
    info = await together("j@40")  # the embedder fails: the running call is uncached, and so are its joiners
    assert [lookup.level for lookup in info] == ["uncached"] * 3
    assert all(lookup.reason is not None and "embedder down" in lookup.reason for lookup in info)
    info_ = ask.cache_info()
    assert (info_.uncached, info_.exact_hits, info_.entries) == (3, 0, 1)


async def test_identical_concurrent_calls_that_fail_run_the_function_once_and_all_fail() -> None:
    calls = 0

    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.05)
        raise LookupError(f"no answer, call {calls}")

    errors: list[LookupError] = []

    async def one() -> None:
        try:
            await ask("same failing question")
        except LookupError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert calls == 1  # the waiters share the failure rather than retrying one after another
    assert [str(exc) for exc in errors] == ["no answer, call 1"] * 50
    assert len({id(exc) for exc in errors}) == 50  # a copy each: one traceback does not gather every waiter
    assert max(len(traceback.extract_tb(exc.__traceback__)) for exc in errors) < 25
    with pytest.raises(LookupError, match="call 2"):  # a failure is not cached: the next call runs again
        await ask("same failing question")


async def test_a_cancelled_call_hands_the_computation_to_a_waiter() -> None:
    calls: list[str] = []
    first_started = anyio.Event()

    @semantic_cached(threshold=0.9)
    async def ask(question: str) -> str:
        calls.append(question)
        if len(calls) == 1:
            first_started.set()
            await anyio.sleep(10)
        return "answer"

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def leader() -> None:
            with scope:
                await ask("slow question")

        tg.start_soon(leader)
        await first_started.wait()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as waiters:
                waiters.start_soon(ask, "slow question")
                await anyio.sleep(0.01)
                scope.cancel()
    assert calls == ["slow question", "slow question"]
    assert ask.cache_info().entries == 1


async def test_async_embedders_are_awaited() -> None:
    inner = HashingEmbedder(64)

    class AsyncEmbedder:
        name = "async-hashing"
        default_threshold = 0.9

        async def __call__(self, texts: list[str]) -> np.ndarray:
            await anyio.lowlevel.checkpoint()
            return inner(texts)

    @semantic_cached(embed=AsyncEmbedder())
    async def ask(question: str) -> str:
        return question

    await ask("hello there")
    with explain() as info:
        assert await ask("Hello there!") == "hello there"
    assert info.last is not None
    assert info.last.level == "semantic"


# -- composition -----------------------------------------------------------------------------------------------


async def test_composes_with_multilevel_cached_exact_first() -> None:
    emb = AngleEmbedder()
    calls: list[str] = []

    @multilevel_cached
    @semantic_cached(embed=emb, threshold=0.9)
    async def ask(question: str) -> str:
        calls.append(question)
        return question

    assert await ask("c@0") == "c@0"
    with explain() as info:
        assert await ask("c@0") == "c@0"  # the exact tier answered: the semantic layer was not reached
    # (Since issue 14 explain() also reports exact calls: the one lookup is the exact layer's memory hit.)
    assert [(lookup.level, lookup.tier) for lookup in info] == [("exact", "memory")]
    with explain() as info:
        assert await ask("c@10") == "c@0"
    assert info.last is not None
    assert info.last.level == "semantic"
    assert calls == ["c@0"]


async def test_cache_clear_removes_everything() -> None:
    emb = AngleEmbedder()

    @semantic_cached(embed=emb, threshold=0.9)
    async def ask(question: str) -> str:
        return question

    await ask("x@0")
    await ask.cache_clear()
    assert await ask("x@5") == "x@5"
    info = ask.cache_info()
    assert info.entries == 1
    assert info.misses == 2
    assert cachelayers.stats()[f"semantic:{ask.cache.identity}"]["misses"] == 2


@pytest.mark.parametrize("url", ["faiss:///tmp/x", "memory://?dtype=f8", "usearch://", "memory://?save_every=3",
                                 "redis://localhost:6379/0?sync_interval=soon", "usearch:///tmp/x?save_every=0"])
def test_a_bad_vector_index_is_a_config_error_when_configured(url: str) -> None:
    with pytest.raises(ConfigError, match="vector_index"):
        cachelayers.configure(vector_index=url)
