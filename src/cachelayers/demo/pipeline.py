"""The demo's pipeline: embed, search, complete, each a `Stage` in front of a simulated provider.

Every stage is an ``async def`` decorated with `multilevel_cached`. The pipeline exercises all four
decorators: the embedding provider is reached through `batched` (concurrent misses share one request), the
LLM provider through `rate_limited` inside the caches (hits never wait), and `semantic_cached` sits between
the exact cache and the LLM, answering re-cased and re-punctuated repeats of questions (its answers are
reported under an outcome of their own).
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Final

import numpy as np

from cachelayers.decorators import CachedFunction, batched, multilevel_cached, rate_limited, semantic_cached
from cachelayers.demo.providers import EXACT, SEMANTIC, SimulatedProvider, computing, current_call
from cachelayers.demo.workload import DemoConfig, Request
from cachelayers.engines.limiter import RateLimiter
from cachelayers.engines.semantic import explain

__all__ = ["EMBED_DIM", "EMBED_MODEL", "CompleteStage", "EmbedStage", "SearchStage", "Stage", "default_stages",
           "embedding_cost", "embedding_latency", "text_tokens", "unit_vector"]

EMBED_MODEL: Final = "text-embedding-3-small"
EMBED_DIM: Final = 256
# Prices in dollars per million tokens, in the range of hosted models in 2024-2025.
_PRICES: Final = {
    EMBED_MODEL: (0.02, 0.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
}
_SEARCH_PRICE: Final = 4e-6  # dollars per query of a hosted vector database
_LLM_SPEED: Final = {"gpt-4o-mini": 0.08, "gpt-4o": 0.14}  # milliseconds per generated token
_MAX_TOKENS: Final = 400  # completion budget of every LLM call, charged to the token limit up front
# Limits of the simulated LLM API per model, at latency scale 1 (a faster simulation gets proportionally more).
_LLM_RPS: Final = 60
_LLM_TPS: Final = 90_000


def _unit(*parts: str | bytes) -> float:
    """A stable pseudo-random number in [0, 1) derived from ``parts`` (simulated latencies and lengths)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big") / 2**64


def text_tokens(text: str) -> int:
    """Tokens of ``text`` as the simulated providers count them (about four characters a token)."""
    return max(1, math.ceil(len(text) / 4))


def embedding_cost(text: str, model: str = EMBED_MODEL) -> float:
    """Dollars the embedding provider charges for ``text``."""
    return text_tokens(text) * _PRICES[model][0] / 1e6


def embedding_latency(texts: list[str]) -> float:
    """Seconds (before scaling) the embedding provider takes for one request of ``texts``."""
    return 0.008 + 0.004 * _unit("embed", texts[0]) + 0.0003 * len(texts)


class Stage(abc.ABC):
    """One step of the pipeline: a cached function in front of a provider.

    Subclasses set ``name`` and say which arguments a request passes to the function.

    Args:
        provider: The provider the function calls on a miss.
        function: The decorated ``async def``. It returns a dict with ``"cost"`` (dollars) and ``"latency"``
            (seconds the provider took), which a cached copy keeps: what a hit saved.
    """

    name: str

    def __init__(self, provider: SimulatedProvider, function: CachedFunction[..., dict[str, Any]],
                 uncached: Callable[..., Awaitable[dict[str, Any]]] | None = None) -> None:
        self.provider = provider
        # Set on the instance: a class-level CachedFunction would bind like a method.
        self.function = function
        # The same computation with no cache in front (to price the stream without caching).
        self.uncached: Callable[..., Awaitable[dict[str, Any]]] = uncached or function.__wrapped__

    @abc.abstractmethod
    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        """The arguments of this stage's call for ``request``, given the results of earlier stages."""

    @abc.abstractmethod
    def flight_key(self, args: tuple[Any, ...]) -> Hashable:
        """Identity of a call with ``args``: equal for calls the cache answers with one entry."""

    async def __call__(self, args: tuple[Any, ...]) -> dict[str, Any]:
        """Run the cached function."""
        return await self.function(*args)

    @abc.abstractmethod
    def correct(self, args: tuple[Any, ...], result: dict[str, Any]) -> bool:
        """Whether ``result`` is what the provider computes for ``args`` (a corrupt or foreign value is not)."""

    def details(self) -> dict[str, Any]:
        """What this stage's other layers (batcher, rate limiter) counted during the run."""
        return {}

    async def clear(self) -> None:
        """Remove this stage's entries from every tier."""
        await self.function.cache_clear()


def _stage_function(name: str, fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]]
                    ) -> CachedFunction[..., dict[str, Any]]:
    return multilevel_cached(ttl="1h", name=f"cachelayers.demo.{name}", version=1,
                             cost=lambda result: float(result["cost"]))(fn)


def unit_vector(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The embedding the simulated provider computes for ``text``: a pseudo-random unit vector seeded by it."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    v = np.random.default_rng(seed).standard_normal(EMBED_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


_EMBED_BATCH: Final = 16  # items per embedding request at most
_EMBED_WAIT: Final = 0.004  # seconds the first miss of a batch waits for company


class EmbedStage(Stage):
    """Embeds the question (a hosted embedding model: fast and cheap, but every request needs it)."""

    name = "embed"

    def __init__(self, latency_scale: float) -> None:
        provider = SimulatedProvider("embedding API", latency_scale=latency_scale)

        async def embed_batch(texts: list[str], model: str) -> list[dict[str, Any]]:
            costs = [embedding_cost(text, model) for text in texts]
            seconds = await provider.call(latency=embedding_latency(texts), cost=sum(costs), items=len(texts),
                                          mark=False)
            return [{"vector": unit_vector(text), "tokens": text_tokens(text), "cost": cost, "latency": seconds}
                    for text, cost in zip(texts, costs, strict=True)]

        # One provider request per batch: the misses of concurrent requests share it. (Applied by a call
        # rather than as ``@batched``: the docs' reader, griffe, cannot resolve that decorator here.)
        batcher = batched(max_size=_EMBED_BATCH, max_wait=_EMBED_WAIT, name="cachelayers.demo.embed_batch")(embed_batch)

        async def embed(text: str, model: str) -> dict[str, Any]:
            with computing():
                return await batcher(text, model)

        self.batcher = batcher
        super().__init__(provider, _stage_function("embed", embed))

    def details(self) -> dict[str, Any]:
        info = self.batcher.batch_info()
        return {"batches": info.batches, "items": info.items, "mean_batch_size": info.mean_size,
                "fill_ratio": info.fill_ratio, "max_batch_size": _EMBED_BATCH, "max_wait_s": _EMBED_WAIT}

    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        return (request.question, EMBED_MODEL)

    def correct(self, args: tuple[Any, ...], result: dict[str, Any]) -> bool:
        text, model = args
        return (bool(np.array_equal(result["vector"], unit_vector(text))) and result["tokens"] == text_tokens(text)
                and result["cost"] == embedding_cost(text, model))

    def flight_key(self, args: tuple[Any, ...]) -> Hashable:
        return args


def _documents(vector: np.ndarray[Any, Any], collection: str, k: int) -> list[str]:
    first = int(_unit("docs", vector.tobytes(), collection) * 5000)
    return [f"{collection}/{(first + 37 * i) % 5000:04d}.md" for i in range(k)]


_QUESTION: Final = "\nQuestion: "


def _prompt(question: str, documents: list[str]) -> str:
    context = "\n".join(f"<doc id={d}>{'lorem ipsum ' * 60}</doc>" for d in documents)
    return f"You are a helpful assistant. Answer from the documents only.\n{context}{_QUESTION}{question}"


def _answer(prompt: str, model: str) -> dict[str, Any]:
    """What the LLM answers to ``prompt``: the question it answers, its text, token counts and cost (all but
    the latency)."""
    tokens_in = text_tokens(prompt)
    tokens_out = 120 + int(280 * _unit("length", prompt, model))
    price_in, price_out = _PRICES[model]
    return {"question": prompt.rpartition(_QUESTION)[2], "text": f"[{model}] {tokens_out}-token answer",
            "tokens_in": tokens_in, "tokens_out": tokens_out,
            "cost": (tokens_in * price_in + tokens_out * price_out) / 1e6}


class SearchStage(Stage):
    """Finds the documents nearest to the question's embedding in a hosted vector database."""

    name = "search"

    def __init__(self, latency_scale: float) -> None:
        provider = SimulatedProvider("vector database", latency_scale=latency_scale)

        async def search(vector: np.ndarray[Any, Any], collection: str, k: int = 4) -> dict[str, Any]:
            seconds = await provider.call(latency=0.010 + 0.010 * _unit("search", vector.tobytes()),
                                          cost=_SEARCH_PRICE)
            return {"documents": _documents(vector, collection, k), "cost": _SEARCH_PRICE, "latency": seconds}

        super().__init__(provider, _stage_function("search", search))

    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        return (context["embed"]["vector"], request.collection)

    def correct(self, args: tuple[Any, ...], result: dict[str, Any]) -> bool:
        return bool(result["documents"] == _documents(args[0], args[1], 4) and result["cost"] == _SEARCH_PRICE)

    def flight_key(self, args: tuple[Any, ...]) -> Hashable:
        return (args[0].tobytes(), args[1], 4)


class CompleteStage(Stage):
    """Asks an LLM to answer from the documents found: slow and by far the most expensive step.

    Args:
        latency_scale: Factor on the LLM's latencies.
        threshold: The semantic layer's similarity threshold; its default when ``None``.
    """

    name = "complete"

    def __init__(self, latency_scale: float, *, threshold: float | None = None) -> None:
        provider = SimulatedProvider("LLM API", latency_scale=latency_scale)
        # A limiter of its own, so that its counters are this run's. Limits scale with the simulated latency:
        # a test running the demo 20 times faster gets 20 times the rate.
        speedup = 1 / latency_scale if latency_scale > 0 else 1e6
        self.limiter = RateLimiter(storage="memory://")

        @rate_limited(f"{round(_LLM_RPS * speedup)}/second", f"{round(_LLM_TPS * speedup)}/second",
                      cost=lambda prompt: text_tokens(prompt) + _MAX_TOKENS, key=lambda model: model,
                      limiter=self.limiter, name="cachelayers.demo.llm")
        async def llm(prompt: str, model: str) -> dict[str, Any]:
            answer = _answer(prompt, model)
            latency = (0.025 + answer["tokens_out"] * _LLM_SPEED[model] / 1000) * (0.8 + 0.4 * _unit("lat", prompt,
                                                                                                        model))
            seconds = await provider.call(latency=latency, cost=answer["cost"])
            return {**answer, "latency": seconds}

        async def complete(question: str, prompt: str, model: str, temperature: float,
                           collection: str) -> dict[str, Any]:
            return await llm(prompt, model)

        # Exact cache outside, semantic layer inside it: a repeat with equal arguments never embeds; an answer
        # may be shared by questions differing in case or punctuation, in the same collection, model and
        # temperature (the documents found follow from the question).
        semantic = semantic_cached(
            text="question", partition=lambda collection, model, temperature, **_: (collection, model, temperature),
            ttl="1h", name="cachelayers.demo.complete.semantic", threshold=threshold,
        )(complete)
        self.semantic = semantic
        super().__init__(provider, _stage_function("complete", semantic), uncached=complete)

    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        prompt = _prompt(request.question, context["search"]["documents"])
        return (request.question, prompt, request.model, request.temperature, request.collection)

    async def __call__(self, args: tuple[Any, ...]) -> dict[str, Any]:
        """Run the cached function; a record answered by the semantic layer is marked so."""
        with explain() as lookups:
            result = await self.function(*args)
        record = current_call.get()
        levels = lookups.levels()
        if record is not None and record.outcome is None and levels:
            record.outcome = SEMANTIC if levels.get("semantic") else EXACT if levels.get("exact") else None
        return result

    def correct(self, args: tuple[Any, ...], result: dict[str, Any]) -> bool:
        """Whether ``result`` is the LLM's answer to the question it says it answers, in this collection and
        model (a semantic answer answers another wording of the question, or, wrongly, another question)."""
        question = result.get("question")
        if not isinstance(question, str):
            return False
        prompt = _prompt(question, _documents(unit_vector(question), args[4], 4))
        return all(result.get(name) == value for name, value in _answer(prompt, args[2]).items())

    def details(self) -> dict[str, Any]:
        info = self.limiter.info()
        return {"admitted": info.admitted, "immediate": info.immediate, "waited": info.waited,
                "timeouts": info.timeouts, "semantic_cache": self.semantic.cache_info()._asdict()}

    def flight_key(self, args: tuple[Any, ...]) -> Hashable:
        return args

    async def clear(self) -> None:
        """Remove this stage's entries from every tier and from the semantic layer."""
        await super().clear()
        await self.semantic.cache_clear()


def default_stages(config: DemoConfig) -> list[Stage]:
    """The pipeline of the demo: embed, search, complete."""
    return [EmbedStage(config.latency_scale), SearchStage(config.latency_scale),
            CompleteStage(config.latency_scale)]

