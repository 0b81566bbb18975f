"""``cachelayers demo``: a simulated AI pipeline replayed through the caches, with a progress bar and a report.

The workload is a question-answering service: each request embeds the user's question, searches a vector
database with the embedding, and asks an LLM to answer from the documents found. Every step is a `Stage`:
an ``async def`` decorated with `multilevel_cached`, in front of a `SimulatedProvider` that sleeps like a
remote API and charges like one. Questions follow a Zipf popularity (a few are asked all the time, most
rarely) with a share of never-seen questions, several requests run concurrently (so identical calls in
flight show single-flight), and a seeded RNG makes every run replay the same stream.

The pipeline is a list of stages run in order for every request, each timed per call. It exercises all four
decorators: the embedding provider is reached through `batched` (concurrent misses share one request), the
LLM provider through `rate_limited` inside the caches (hits never wait), and `semantic_cached` sits between
the exact cache and the LLM, answering re-cased and re-punctuated repeats of questions (its answers are
reported under an outcome of their own).
"""

from __future__ import annotations

import abc
import bisect
import contextvars
import dataclasses
import hashlib
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Any, Final

import anyio
import numpy as np

from cachelayers.decorators import CachedFunction, batched, multilevel_cached, rate_limited, semantic_cached
from cachelayers.engines.limiter import RateLimiter
from cachelayers.engines.semantic import explain
from cachelayers.errors import ConfigError
from cachelayers.settings import get_settings

__all__ = ["CACHED", "COMPUTED", "EXACT", "SEMANTIC", "SHARED", "CompleteStage", "DemoConfig", "DemoReport",
           "EmbedStage", "Request", "SearchStage", "SimulatedProvider", "Stage", "StageReport", "build_requests",
           "default_stages", "render_report", "report_json", "run_demo"]

# Outcomes of one call of a stage. A stage that answers some other way (a semantic layer) adds its own.
COMPUTED: Final = "computed"  # this call ran the provider
CACHED: Final = "cached"  # answered from a cache tier
SHARED: Final = "shared"  # joined an identical call already in flight (single-flight)
SEMANTIC: Final = "semantic"  # answered by the semantic layer from a similar earlier question
EXACT: Final = "exact"  # answered by the semantic layer from an entry of this very text (outer cache missed)

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

_VERBS: Final = ("configure", "debug", "tune", "monitor", "scale", "secure", "migrate", "benchmark", "cache",
                 "test")
_TOPICS: Final = ("the vector index", "rate limits", "the embedding model", "prompt caching", "retries",
                  "the token budget", "batch sizes", "the context window", "the RAG pipeline", "Redis",
                  "streaming responses", "tool calls")
_SETTINGS: Final = ("in production", "for a chatbot", "on Kubernetes", "on a laptop", "for 10k users",
                    "in a notebook", "behind a load balancer", "with async workers", "for a batch job",
                    "in CI")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What `run_demo` replays.

    Attributes:
        requests: Number of requests.
        seed: Seed of the request stream; equal seeds replay equal streams.
        concurrency: Requests in flight at once.
        latency_scale: Factor on every simulated latency (tests shrink it; 1.0 feels like real APIs).
        catalog: Distinct popular questions.
        zipf_s: Exponent of the Zipf popularity of the catalog (higher: fewer questions get most traffic).
        new_fraction: Share of requests asking a question never seen before.
        variant_fraction: Share of catalog requests asking their question re-cased or re-punctuated (the
            semantic layer answers them).
        fresh: Remove the demo's entries from every tier before the run, so the numbers are reproducible.
    """

    requests: int = 2000
    seed: int = 7
    concurrency: int = 8
    latency_scale: float = 1.0
    catalog: int = 1200
    zipf_s: float = 1.1
    new_fraction: float = 0.1
    variant_fraction: float = 0.15
    fresh: bool = True

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "catalog"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be at least 1")
        if not self.latency_scale >= 0:
            raise ConfigError("latency_scale", self.latency_scale, "must be a number >= 0")
        if not 0.0 <= self.new_fraction <= 1.0:
            raise ConfigError("new_fraction", self.new_fraction, "must be between 0 and 1")
        if not 0.0 <= self.variant_fraction <= 1.0:
            raise ConfigError("variant_fraction", self.variant_fraction, "must be between 0 and 1")
        if not self.zipf_s > 0:
            raise ConfigError("zipf_s", self.zipf_s, "must be positive")


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One user request to the question-answering service."""

    index: int
    question: str
    collection: str
    model: str
    temperature: float


def _question(n: int) -> str:
    verb = _VERBS[n % len(_VERBS)]
    topic = _TOPICS[(n // len(_VERBS)) % len(_TOPICS)]
    where = _SETTINGS[(n // (len(_VERBS) * len(_TOPICS))) % len(_SETTINGS)]
    cycle = n // (len(_VERBS) * len(_TOPICS) * len(_SETTINGS))
    return f"How do I {verb} {topic} {where}?" + (f" (variant {cycle})" if cycle else "")


def _variant(question: str, rng: random.Random) -> str:
    """``question`` as another user types it: other case, punctuation or spacing (the same words)."""
    kind = rng.randrange(4)
    if kind == 0:
        return question.lower()
    if kind == 1:
        return question.rstrip("?") + " ??"
    if kind == 2:
        return question.upper()
    return "  " + question.replace("?", "").replace(" ", "  ")


def build_requests(config: DemoConfig) -> list[Request]:
    """The request stream of ``config``: the same list for the same configuration.

    Catalog questions are drawn with Zipf popularity; a ``new_fraction`` of requests carry a question nobody
    asked before. Most traffic uses the small model at temperature 0.
    """
    rng = random.Random(config.seed)
    cumulative: list[float] = []
    total = 0.0
    for rank in range(1, config.catalog + 1):
        total += 1.0 / rank**config.zipf_s
        cumulative.append(total)
    # Popularity rank -> question, shuffled so the most asked questions are not all about one topic.
    order = list(range(config.catalog))
    rng.shuffle(order)
    requests: list[Request] = []
    for index in range(config.requests):
        if rng.random() < config.new_fraction:
            question = f"Why does {rng.choice(_TOPICS)} fail when I {rng.choice(_VERBS)} it? (ticket {index})"
        else:
            rank = min(bisect.bisect_left(cumulative, rng.random() * total), config.catalog - 1)
            question = _question(order[rank])
            if rng.random() < config.variant_fraction:
                question = _variant(question, rng)
        collection = "support" if "fail" in question.lower() or "debug" in question.lower() else "docs"
        model = "gpt-4o" if rng.random() < 0.2 else "gpt-4o-mini"
        temperature = 0.7 if rng.random() < 0.1 else 0.0
        requests.append(Request(index, question, collection, model, temperature))
    return requests


# -- simulated providers --------------------------------------------------------------------------------


class _CallRecord:
    """What happened in one stage call; the provider marks it when the call reached it.

    ``sequence`` reads the number of stage calls started so far; the provider notes it when it finishes.
    """

    __slots__ = ("finished_at", "outcome", "sequence")

    def __init__(self, sequence: Callable[[], int]) -> None:
        self.sequence = sequence
        self.outcome: str | None = None
        self.finished_at = 0


# The record of the stage call running in this task. A provider reached through the cache marks it; a
# context variable holding a mutable record keeps working if an engine runs the computation in a child task.
_current_call: contextvars.ContextVar[_CallRecord | None] = contextvars.ContextVar("cachelayers_demo_call",
                                                                                   default=None)


def _unit(*parts: str | bytes) -> float:
    """A stable pseudo-random number in [0, 1) derived from ``parts`` (simulated latencies and lengths)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big") / 2**64


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class SimulatedProvider:
    """A remote API stand-in: each call sleeps for its latency, is charged its cost, and is counted.

    Args:
        name: Shown in the report.
        latency_scale: Factor on every latency.
    """

    def __init__(self, name: str, *, latency_scale: float = 1.0) -> None:
        self.name = name
        self.latency_scale = latency_scale
        self.calls = 0
        self.items = 0
        self.cost = 0.0
        self.busy_seconds = 0.0

    async def call(self, *, latency: float, cost: float, items: int = 1, mark: bool = True) -> float:
        """Serve one call: mark the caller's record, sleep ``latency`` seconds (scaled), charge ``cost``.

        Args:
            latency: Simulated seconds the call takes before scaling.
            cost: Dollars the call costs.
            items: Items the call serves (a batch request serves several).
            mark: Mark the record of the stage call running in this context; a batch request runs in a
                context of its own, so its per-item callers mark theirs with `_computing` instead.

        Returns:
            The seconds the call took.
        """
        record = _current_call.get() if mark else None
        if record is not None:
            record.outcome = COMPUTED
        self.calls += 1
        self.items += items
        self.cost += cost
        started = time.perf_counter()
        try:
            await anyio.sleep(latency * self.latency_scale)
        finally:
            elapsed = time.perf_counter() - started
            self.busy_seconds += elapsed
            if record is not None:
                record.finished_at = record.sequence()
        return elapsed


class _computing:
    """Marks the stage call running in this context as computed, and when its computation finished."""

    record: _CallRecord | None = None

    def __enter__(self) -> None:
        self.record = _current_call.get()
        if self.record is not None:
            self.record.outcome = COMPUTED

    def __exit__(self, *exc: object) -> None:
        if self.record is not None:
            self.record.finished_at = self.record.sequence()


# -- stages -------------------------------------------------------------------------------------------


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

    def details(self) -> dict[str, Any]:
        """What this stage's other layers (batcher, rate limiter) counted during the run."""
        return {}

    async def clear(self) -> None:
        """Remove this stage's entries from every tier."""
        await self.function.cache_clear()


def _stage_function(name: str, fn: Callable[..., Awaitable[dict[str, Any]]]) -> CachedFunction[..., dict[str, Any]]:
    return multilevel_cached(ttl="1h", name=f"cachelayers.demo.{name}", version=1,
                             cost=lambda result: float(result["cost"]))(fn)


def _vector(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
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

        # One provider request per batch: the misses of concurrent requests share it.
        @batched(max_size=_EMBED_BATCH, max_wait=_EMBED_WAIT, name="cachelayers.demo.embed_batch")
        async def embed_batch(texts: list[str], model: str) -> list[dict[str, Any]]:
            costs = [_tokens(text) * _PRICES[model][0] / 1e6 for text in texts]
            latency = 0.008 + 0.004 * _unit("embed", texts[0]) + 0.0003 * len(texts)
            seconds = await provider.call(latency=latency, cost=sum(costs), items=len(texts), mark=False)
            return [{"vector": _vector(text), "tokens": _tokens(text), "cost": cost, "latency": seconds}
                    for text, cost in zip(texts, costs, strict=True)]

        async def embed(text: str, model: str) -> dict[str, Any]:
            with _computing():
                return await embed_batch(text, model)

        self.batcher = embed_batch
        super().__init__(provider, _stage_function("embed", embed))

    def details(self) -> dict[str, Any]:
        info = self.batcher.batch_info()
        return {"batches": info.batches, "items": info.items, "mean_batch_size": info.mean_size,
                "fill_ratio": info.fill_ratio, "max_batch_size": _EMBED_BATCH, "max_wait_s": _EMBED_WAIT}

    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        return (request.question, EMBED_MODEL)

    def flight_key(self, args: tuple[Any, ...]) -> Hashable:
        return args


class SearchStage(Stage):
    """Finds the documents nearest to the question's embedding in a hosted vector database."""

    name = "search"

    def __init__(self, latency_scale: float) -> None:
        provider = SimulatedProvider("vector database", latency_scale=latency_scale)

        async def search(vector: np.ndarray[Any, Any], collection: str, k: int = 4) -> dict[str, Any]:
            raw = vector.tobytes()
            seconds = await provider.call(latency=0.010 + 0.010 * _unit("search", raw), cost=_SEARCH_PRICE)
            first = int(_unit("docs", raw, collection) * 5000)
            return {"documents": [f"{collection}/{(first + 37 * i) % 5000:04d}.md" for i in range(k)],
                    "cost": _SEARCH_PRICE, "latency": seconds}

        super().__init__(provider, _stage_function("search", search))

    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        return (context["embed"]["vector"], request.collection)

    def flight_key(self, args: tuple[Any, ...]) -> Hashable:
        return (args[0].tobytes(), args[1], 4)


class CompleteStage(Stage):
    """Asks an LLM to answer from the documents found: slow and by far the most expensive step."""

    name = "complete"

    def __init__(self, latency_scale: float) -> None:
        provider = SimulatedProvider("LLM API", latency_scale=latency_scale)
        # A limiter of its own, so that its counters are this run's. Limits scale with the simulated latency:
        # a test running the demo 20 times faster gets 20 times the rate.
        speedup = 1 / latency_scale if latency_scale > 0 else 1e6
        self.limiter = RateLimiter(storage="memory://")

        @rate_limited(f"{round(_LLM_RPS * speedup)}/second", f"{round(_LLM_TPS * speedup)}/second",
                      cost=lambda prompt: _tokens(prompt) + _MAX_TOKENS, key=lambda model: model,
                      limiter=self.limiter, name="cachelayers.demo.llm")
        async def llm(prompt: str, model: str) -> dict[str, Any]:
            tokens_in = _tokens(prompt)
            tokens_out = 120 + int(280 * _unit("length", prompt, model))
            price_in, price_out = _PRICES[model]
            cost = (tokens_in * price_in + tokens_out * price_out) / 1e6
            latency = (0.025 + tokens_out * _LLM_SPEED[model] / 1000) * (0.8 + 0.4 * _unit("lat", prompt, model))
            seconds = await provider.call(latency=latency, cost=cost)
            return {"text": f"[{model}] {tokens_out}-token answer", "tokens_in": tokens_in, "tokens_out": tokens_out,
                    "cost": cost, "latency": seconds}

        async def complete(question: str, prompt: str, model: str, temperature: float,
                           collection: str) -> dict[str, Any]:
            return await llm(prompt, model)

        # Exact cache outside, semantic layer inside it: a repeat with equal arguments never embeds; an answer
        # may be shared by questions differing in case or punctuation, in the same collection, model and
        # temperature (the documents found follow from the question).
        semantic = semantic_cached(
            text="question", partition=lambda collection, model, temperature, **_: (collection, model, temperature),
            ttl="1h", name="cachelayers.demo.complete.semantic",
        )(complete)
        self.semantic = semantic
        super().__init__(provider, _stage_function("complete", semantic), uncached=complete)

    def arguments(self, request: Request, context: dict[str, Any]) -> tuple[Any, ...]:
        documents = "\n".join(f"<doc id={d}>{'lorem ipsum ' * 60}</doc>" for d in context["search"]["documents"])
        prompt = (f"You are a helpful assistant. Answer from the documents only.\n{documents}\n"
                  f"Question: {request.question}")
        return (request.question, prompt, request.model, request.temperature, request.collection)

    async def __call__(self, args: tuple[Any, ...]) -> dict[str, Any]:
        """Run the cached function; a record answered by the semantic layer is marked so."""
        with explain() as lookups:
            result = await self.function(*args)
        record = _current_call.get()
        levels = lookups.levels()
        if record is not None and record.outcome is None and levels:
            record.outcome = SEMANTIC if levels.get("semantic") else EXACT if levels.get("exact") else None
        return result

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


# -- measuring ----------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (0-100), ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class _StageStats:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.latencies: dict[str, list[float]] = {}
        self.cost_saved: dict[str, float] = {}
        self.time_saved = 0.0

    def add(self, outcome: str, seconds: float, cost: float, provider_seconds: float) -> None:
        self.latencies.setdefault(outcome, []).append(seconds)
        if outcome != COMPUTED:
            self.cost_saved[outcome] = self.cost_saved.get(outcome, 0.0) + cost
            self.time_saved += max(0.0, provider_seconds - seconds)


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What happened at one stage.

    Attributes:
        name: The stage.
        provider: The provider behind it.
        calls: Calls of the stage (one per request).
        outcomes: Calls by outcome: ``computed`` (reached the provider), ``cached``, ``shared``, and for the
            LLM ``semantic`` (a similar question's answer) and ``exact`` (the semantic layer had this text).
        latency: ``{outcome: {"p50": s, "p95": s, "mean": s}}``, measured around each call.
        provider_calls: Calls the provider served (it counts them itself).
        cost_spent: Dollars the provider charged.
        cost_saved: Dollars of the calls that did not reach the provider, by outcome.
        time_saved: Seconds the avoided calls took when they were computed, less the time they took now.
        cache_info: The cached function's own `cache_info()` as a dict, to compare with.
        details: What the stage's other layers counted: batches and fill for the embedding batcher,
            admissions and waits for the LLM's rate limiter, the semantic layer's counters.
    """

    name: str
    provider: str
    calls: int
    outcomes: dict[str, int]
    latency: dict[str, dict[str, float | None]]
    provider_calls: int
    cost_spent: float
    cost_saved: dict[str, float]
    time_saved: float
    cache_info: dict[str, Any]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def avoided(self) -> int:
        """Calls that did not reach the provider."""
        return self.calls - self.outcomes.get(COMPUTED, 0)


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """The result of `run_demo`.

    Attributes:
        config: What was replayed.
        tiers: The tiers in force, ``name -> URL``.
        wall_seconds: Duration of the replay.
        stages: One report per stage, in pipeline order.
        request_latency: End-to-end latency of requests answered entirely from the caches (``cached``) and
            of those that reached at least one provider (``computed``): ``{"p50": s, "p95": s}``.
        requests_by_outcome: Requests answered entirely without a provider call, and the others.
    """

    config: DemoConfig
    tiers: dict[str, str]
    wall_seconds: float
    stages: list[StageReport]
    request_latency: dict[str, dict[str, float | None]]
    requests_by_outcome: dict[str, int]

    @property
    def provider_calls(self) -> int:
        """Calls that reached a provider, over all stages."""
        return sum(s.outcomes.get(COMPUTED, 0) for s in self.stages)

    @property
    def avoided_calls(self) -> int:
        """Calls answered without a provider, over all stages."""
        return sum(s.avoided for s in self.stages)

    @property
    def cost_spent(self) -> float:
        """Dollars charged by the providers."""
        return sum(s.cost_spent for s in self.stages)

    @property
    def cost_saved(self) -> float:
        """Dollars the avoided calls would have cost."""
        return sum(sum(s.cost_saved.values()) for s in self.stages)

    @property
    def time_saved(self) -> float:
        """Provider seconds avoided, less the time the avoided calls took."""
        return sum(s.time_saved for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (for ``--json``)."""
        return {
            "config": dataclasses.asdict(self.config),
            "tiers": self.tiers,
            "wall_seconds": self.wall_seconds,
            "requests": self.config.requests,
            "requests_by_outcome": self.requests_by_outcome,
            "request_latency": self.request_latency,
            "provider_calls": self.provider_calls,
            "avoided_calls": self.avoided_calls,
            "cost_spent": self.cost_spent,
            "cost_saved": self.cost_saved,
            "time_saved": self.time_saved,
            "stages": [dataclasses.asdict(s) | {"avoided": s.avoided} for s in self.stages],
        }


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": _percentile(values, 50), "p95": _percentile(values, 95),
            "mean": statistics.fmean(values) if values else None}


async def run_demo(config: DemoConfig, *, stages: Sequence[Stage] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> DemoReport:
    """Replay the request stream of ``config`` through ``stages`` and measure every call.

    Args:
        config: The workload.
        stages: The pipeline; `default_stages` when omitted.
        progress: Called after each request with the number of requests done and of those answered
            entirely from the caches.

    Returns:
        The report.
    """
    pipeline = list(stages) if stages is not None else default_stages(config)
    requests = build_requests(config)
    if config.fresh:
        for stage in pipeline:
            await stage.clear()
    stats = [_StageStats(stage) for stage in pipeline]
    request_latency: dict[str, list[float]] = {CACHED: [], COMPUTED: []}
    done = 0
    from_cache = 0
    feed: Iterator[Request] = iter(requests)
    started_calls = 0
    # Per stage: flight key -> (sequence number of the call that computed it, calls started when its provider
    # call finished). A call that did not compute and started inside that window found the computation in
    # flight and waited for it: the cache neither had the value (it is stored when the provider call ends)
    # nor let it call the provider. Any other call that did not compute was answered by a cache tier.
    computing: list[dict[Hashable, tuple[int, int]]] = [{} for _ in pipeline]

    def sequence() -> int:
        return started_calls

    async def serve(request: Request) -> None:
        nonlocal done, from_cache, started_calls
        context: dict[str, Any] = {}
        started = time.perf_counter()
        reached_provider = False
        for stage, stage_stats, computed in zip(pipeline, stats, computing, strict=True):
            args = stage.arguments(request, context)
            flight_key = stage.flight_key(args)
            started_calls += 1
            number = started_calls
            record = _CallRecord(sequence)
            token = _current_call.set(record)
            call_started = time.perf_counter()
            try:
                result = await stage(args)
            finally:
                elapsed = time.perf_counter() - call_started
                _current_call.reset(token)
            outcome = record.outcome
            if outcome == COMPUTED:
                computed[flight_key] = (number, record.finished_at)
            elif outcome is None:
                first, last = computed.get(flight_key, (0, 0))
                outcome = SHARED if first < number <= last else CACHED
            reached_provider = reached_provider or outcome == COMPUTED
            # A result carries what its computation cost and took, like the usage block of an API response.
            stage_stats.add(outcome, elapsed, float(result["cost"]), float(result["latency"]))
            context[stage.name] = result
        request_latency[COMPUTED if reached_provider else CACHED].append(time.perf_counter() - started)
        done += 1
        from_cache += not reached_provider
        if progress is not None:
            progress(done, from_cache)

    async def worker() -> None:
        for request in feed:
            await serve(request)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(min(config.concurrency, config.requests)):
            tg.start_soon(worker)
    wall = time.perf_counter() - started

    reports = []
    for s in stats:
        reports.append(StageReport(
            name=s.stage.name,
            provider=s.stage.provider.name,
            calls=sum(len(v) for v in s.latencies.values()),
            outcomes={outcome: len(v) for outcome, v in sorted(s.latencies.items())},
            latency={outcome: _summary(v) for outcome, v in sorted(s.latencies.items())},
            provider_calls=s.stage.provider.calls,
            cost_spent=s.stage.provider.cost,
            cost_saved=dict(sorted(s.cost_saved.items())),
            time_saved=s.time_saved,
            cache_info=s.stage.function.cache_info()._asdict(),
            details=s.stage.details(),
        ))
    return DemoReport(
        config=config,
        tiers=get_settings().tier_urls,
        wall_seconds=wall,
        stages=reports,
        request_latency={k: _summary(v) for k, v in request_latency.items()},
        requests_by_outcome={k: len(v) for k, v in request_latency.items()},
    )


# -- presenting -----------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _dollars(amount: float) -> str:
    return f"${amount:,.4f}" if amount < 100 else f"${amount:,.2f}"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render_report(report: DemoReport, console: Any) -> None:
    """Print ``report`` as tables on a rich ``console``."""
    from rich.table import Table

    config = report.config
    stage_names = " → ".join(s.name for s in report.stages)
    console.print(
        f"\n[bold]cachelayers demo[/]: {config.requests:,} requests through {stage_names}, "
        f"concurrency {config.concurrency}, seed {config.seed}, "
        f"tiers: {', '.join(f'{name} ({url})' for name, url in report.tiers.items())}"
    )
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for header in ("stage", "calls", "cached", "shared", "semantic", "computed", "hit rate", "cached p50 / p95",
                   "computed p50 / p95", "spent", "saved"):
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    for s in report.stages:
        cached, computed = s.latency.get(CACHED, {}), s.latency.get(COMPUTED, {})
        table.add_row(
            s.name, f"{s.calls:,}", f"{s.outcomes.get(CACHED, 0):,}", f"{s.outcomes.get(SHARED, 0):,}",
            f"{s.outcomes.get(SEMANTIC, 0) + s.outcomes.get(EXACT, 0):,}", f"{s.outcomes.get(COMPUTED, 0):,}",
            _percent(s.avoided, s.calls),
            f"{_duration(cached.get('p50'))} / {_duration(cached.get('p95'))}",
            f"{_duration(computed.get('p50'))} / {_duration(computed.get('p95'))}",
            _dollars(s.cost_spent), _dollars(sum(s.cost_saved.values())),
        )
    console.print(table)
    calls = report.provider_calls + report.avoided_calls
    without = report.cost_spent + report.cost_saved
    shared = sum(s.outcomes.get(SHARED, 0) for s in report.stages)
    fast, slow = report.request_latency[CACHED], report.request_latency[COMPUTED]
    tiers: dict[str, int] = {}
    for s in report.stages:
        for tier, hits in s.cache_info["hits_by_tier"].items():
            tiers[tier] = tiers.get(tier, 0) + hits
    by_tier = ", ".join(f"{tier} {hits:,}" for tier, hits in tiers.items()) or "none"
    layers = []
    for s in report.stages:
        d = s.details
        if "batches" in d:
            line = (f"{s.name} batching: {d['items']:,} provider items in {d['batches']:,} batches "
                    f"(mean size {d['mean_batch_size']:.2f} of {d['max_batch_size']}, "
                    f"fill {100 * d['fill_ratio']:.0f}%)")
            if d["items"] and report.wall_seconds > 0:
                rate = d["items"] / report.wall_seconds
                line += (f"; misses came at {rate:,.0f}/s, {rate * d['max_wait_s']:.1f} per "
                         f"{d['max_wait_s'] * 1e3:g} ms window: batches fill when misses come in bursts")
            layers.append(line)
        if "admitted" in d:
            layers.append(f"{s.name} rate limit: {d['admitted']:,} admitted, {d['immediate']:,} at once, "
                          f"{d['waited']:,} waited for room")
        if s.outcomes.get(SEMANTIC) is not None or "semantic_cache" in d:
            exact = s.outcomes.get(CACHED, 0) + s.outcomes.get(SHARED, 0) + s.outcomes.get(EXACT, 0)
            layers.append(f"{s.name} answers by level: exact {exact:,}, semantic {s.outcomes.get(SEMANTIC, 0):,}, "
                          f"computed {s.outcomes.get(COMPUTED, 0):,}")
    console.print(
        f"requests: {config.requests:,} in {report.wall_seconds:.1f} s; "
        f"{report.requests_by_outcome[CACHED]:,} answered entirely from the cache "
        f"(p50 {_duration(fast['p50'])}, p95 {_duration(fast['p95'])}), "
        f"{report.requests_by_outcome[COMPUTED]:,} reached a provider "
        f"(p50 {_duration(slow['p50'])}, p95 {_duration(slow['p95'])})\n"
        f"provider calls: [bold]{report.provider_calls:,} made, {report.avoided_calls:,} avoided[/] "
        f"({_percent(report.avoided_calls, calls)} of {calls:,}); "
        f"{shared:,} of them joined an identical call in flight (single-flight)\n"
        f"hits by tier (which tier answered): {by_tier}\n"
        + "".join(f"{line}\n" for line in layers) +
        f"cost: [bold]{_dollars(report.cost_spent)} spent, {_dollars(report.cost_saved)} saved[/] "
        f"({_percent(report.cost_saved, without)} of {_dollars(without)} without the cache)\n"
        f"time: [bold]{report.time_saved:,.1f} s[/] of provider time avoided"
    )


def report_json(report: DemoReport) -> str:
    """The report as JSON."""
    return json.dumps(report.to_dict(), indent=2)
