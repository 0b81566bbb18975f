"""The OpenAI guide's example (examples/openai_stack.py) against a local OpenAI-compatible HTTP server, through
the real ``openai`` SDK: exact -> semantic -> rate limit with ``actual=`` from usage, batched embeddings, and the
server's 429 with ``Retry-After`` driving the limiter's pause, retries and adaptive cut."""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

import cachelayers
from cachelayers import RateLimitExceeded, explain, rate_limited
from cachelayers.engines.limiter import RateLimiter
from tests.openai_server import OpenAIServer, embedding, running_openai_server

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "openai_stack.py"
GUIDE = ROOT / "docs" / "guides" / "openai.md"
CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"
_loads = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    """The SDK's client runs on asyncio here."""
    return "asyncio"


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    """A fresh local OpenAI-compatible server on a loopback port."""
    with running_openai_server() as state:
        yield state


@pytest.fixture
async def stack(server: OpenAIServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ModuleType]:
    """examples/openai_stack.py, loaded as a module of its own (fresh caches and limits) against ``server``."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    spec = importlib.util.spec_from_file_location(f"openai_stack_{next(_loads)}", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    await module.client.close()


def limited_of(stack: ModuleType) -> Any:
    """The rate-limited function under the example's exact and semantic layers."""
    return stack.answer.__wrapped__.__wrapped__


@pytest.mark.anyio
async def test_exact_then_semantic_then_the_provider(stack: ModuleType, server: OpenAIServer) -> None:
    """A repeat is an exact hit (no request at all), a paraphrase a semantic hit (one embedding request, no
    completion), another model a new completion; every answer is the SDK's own ``ChatCompletion``."""
    first = await stack.answer("What is a vector index?")
    assert isinstance(first, ChatCompletion)
    assert first.choices[0].message.content == "Answer to: what is a vector index"
    assert len(server.received(CHAT)) == 1
    embeddings = len(server.received(EMBED))

    with explain() as lookups:
        again = await stack.answer("What is a vector index?")
    assert again == first
    assert isinstance(again, ChatCompletion)
    # answered by the exact layer's memory tier: the semantic layer was not even asked
    assert [(lookup.decorator, lookup.tier) for lookup in lookups] == [("multilevel_cached", "memory")]
    assert (len(server.received(CHAT)), len(server.received(EMBED))) == (1, embeddings)

    with explain() as lookups:
        paraphrase = await stack.answer("what is a vector index")
    assert lookups.last is not None
    assert lookups.last.level == "semantic"
    assert paraphrase.choices[0].message.content == first.choices[0].message.content
    assert (len(server.received(CHAT)), len(server.received(EMBED))) == (1, embeddings + 1)

    other_model = await stack.answer("What is a vector index?", model="gpt-4o")
    assert other_model.model == "gpt-4o"
    assert len(server.received(CHAT)) == 2  # the model is part of the partition: never shared
    assert stack.answer.cache_info().hits == 1


@pytest.mark.anyio
async def test_actual_tokens_from_usage_replace_the_estimate(stack: ModuleType, server: OpenAIServer) -> None:
    """``actual=`` charges the usage the server reported; the rest of the up-front estimate is given back."""
    limiter: RateLimiter = limited_of(stack).rate_limit.limiter
    question = "How do I cache embeddings?"
    response = await stack.answer(question)
    assert response.usage is not None
    estimate = stack.estimated_tokens(question)
    assert response.usage.total_tokens < estimate
    assert limiter.info().refunds == estimate - response.usage.total_tokens


@pytest.mark.anyio
async def test_429_with_retry_after_ms_is_retried_and_halves_the_rate(stack: ModuleType,
                                                                       server: OpenAIServer) -> None:
    """The server's 429 reaches the limiter as the SDK's ``RateLimitError`` (``max_retries=0``): the key is
    paused for ``retry-after-ms``, the call retried and answered, and the adaptive limit cut in half."""
    limited = limited_of(stack)
    limiter: RateLimiter = limited.rate_limit.limiter
    server.fail_next(1, retry_after_ms=30)
    response = await stack.answer("Why is my index slow?")
    assert response.choices[0].message.content == "Answer to: why is my index slow"
    assert len(server.received(CHAT)) == 2  # the 429, then the retry
    info = limiter.info()
    assert (info.rate_limit_errors, info.retries) == (1, 1)
    assert info.pauses >= 1
    assert limiter.effective_limit("llm-rpm", "gpt-4o-mini") == 250  # adaptive: 500/minute halved
    assert limiter.effective_limit("llm-rpm", "gpt-4o") == 500  # per key


@pytest.mark.anyio
async def test_retry_after_seconds_pauses_every_caller_of_the_key(stack: ModuleType, server: OpenAIServer) -> None:
    """``Retry-After: 30`` on a call without retries: the SDK's error reaches the caller, and the next caller of
    the same key is refused at once with the server's wait instead of sending a request the server would
    refuse."""
    cachelayers.configure(limits={"test-rpm": "100/minute"})  # before the engine, which reads the settings
    limiter = RateLimiter(storage="memory://")

    @rate_limited("test-rpm", key=lambda model, **_: model, timeout=5, limiter=limiter, adaptive=True)
    async def complete(question: str, model: str = "gpt-4o-mini") -> ChatCompletion:
        client: openai.AsyncOpenAI = stack.client
        return await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}])

    server.fail_next(1, retry_after="30")
    with pytest.raises(openai.RateLimitError):
        await complete("first")
    with pytest.raises(RateLimitExceeded) as refused:  # timeout=5 cannot outlast a 30 s pause
        await complete("second")
    assert refused.value.retry_after is not None
    assert 20 < refused.value.retry_after <= 30
    assert len(server.received(CHAT)) == 1
    assert (await complete("other model", model="gpt-4o")).model == "gpt-4o"  # another key is not paused
    info = limiter.info()
    assert (info.rate_limit_errors, info.timeouts) == (1, 1)
    assert limiter.effective_limit("test-rpm", "gpt-4o-mini") == 50  # AIMD: halved


@pytest.mark.anyio
async def test_sdk_retries_hide_the_429_from_the_limiter(stack: ModuleType, server: OpenAIServer) -> None:
    """Why the example sets ``max_retries=0``: with the SDK's default retries the 429 is retried inside the SDK,
    and the limiter never learns of it (no pause for the other callers, no adaptive cut)."""
    limiter = RateLimiter(storage="memory://")
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test")  # max_retries=2, the default

    @rate_limited("100/minute", limiter=limiter, adaptive=True)
    async def complete(question: str) -> ChatCompletion:
        return await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": question}])

    server.fail_next(1, retry_after_ms=10)
    try:
        assert (await complete("hidden")).choices[0].message.content == "Answer to: hidden"
    finally:
        await sdk.close()
    assert len(server.received(CHAT)) == 2  # the server did refuse once
    assert (limiter.info().rate_limit_errors, limiter.info().pauses) == (0, 0)


@pytest.mark.anyio
async def test_batched_embeddings_share_one_request(stack: ModuleType, server: OpenAIServer) -> None:
    """Concurrent one-text calls go out as one ``/v1/embeddings`` request; cached texts are not sent again."""
    import anyio

    texts = [f"document number {i}" for i in range(40)]
    vectors: dict[str, list[float]] = {}

    async def one(text: str) -> None:
        vectors[text] = await stack.embedding(text)

    async with anyio.create_task_group() as tg:
        for text in texts:
            tg.start_soon(one, text)
    assert [len(body["input"]) for body in server.received(EMBED)] == [40]
    assert all(vectors[t] == pytest.approx(embedding(t)) for t in texts)  # each caller got its own row

    async with anyio.create_task_group() as tg:
        for text in [*texts[:10], "new one", "new two"]:
            tg.start_soon(one, text)
    assert [body["input"] for body in server.received(EMBED)][1:] == [["new one", "new two"]]
    info = stack.embed_batch.batch_info()
    assert (info.batches, info.items) == (2, 42)


@pytest.mark.anyio
async def test_the_example_runs_as_a_script(stack: ModuleType, server: OpenAIServer,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``python examples/openai_stack.py`` against a provider: what ``main()`` prints."""
    await stack.main()
    out = capsys.readouterr().out
    assert out.count("Answer to: what is a vector index") == 3
    assert len(server.received(CHAT)) == 1
    assert "100 BatchInfo(" in out
    assert sum(len(body["input"]) for body in server.received(EMBED)) == 102  # 100 documents, 2 question texts


def test_the_guide_shows_the_tested_example() -> None:
    """Every Python block of the guide that cannot run on its own is a verbatim part of the tested example."""
    guide = GUIDE.read_text()
    example = EXAMPLE.read_text()
    blocks = re.findall(r"<!-- no-run:[^>]*-->\n```python\n(.*?)```", guide, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        assert block in example, block


def test_a_client_parameter_is_left_out_of_the_key() -> None:
    """``openai.AsyncOpenAI`` (and the ``httpx2`` client under it) are request-scoped: a parameter annotated
    with it is left out of keys without ``ignore=``."""
    from cachelayers.keys import KeyBuilder

    async def complete(client: openai.AsyncOpenAI, question: str) -> str:
        return question

    builder = KeyBuilder(complete)
    assert builder.ignored == {"client"}
    one, two = openai.AsyncOpenAI(api_key="a"), openai.AsyncOpenAI(api_key="b")
    assert builder.local((one, "q"), {}) == builder.local((two, "q"), {})
