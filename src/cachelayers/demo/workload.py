"""The demo's workload: a seeded stream of questions to a question-answering service.

Questions follow a Zipf popularity (a few are asked all the time, most rarely) with a share of never-seen
questions and of re-cased or re-punctuated repeats; a seeded RNG makes every run replay the same stream.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import re
from typing import Final

from cachelayers.errors import ConfigError

__all__ = ["DemoConfig", "Request", "build_requests", "canonical_question"]

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
        ingest_chunks: Document chunks embedded by the ingestion stage before the requests (0: none).
        ingest_concurrency: Chunks the ingestion stage has in flight at once, as a loader embedding a document
            set does (it gathers its chunks with bounded concurrency).
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
    ingest_chunks: int = 1200
    ingest_concurrency: int = 128

    def __post_init__(self) -> None:
        if self.ingest_chunks < 0:
            raise ConfigError("ingest_chunks", self.ingest_chunks, "must be 0 or more")
        for name in ("requests", "concurrency", "catalog", "ingest_concurrency"):
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
    """One user request to the question-answering service.

    ``canonical`` is the question asked as the workload first wrote it: ``question`` itself, or the catalog
    question that ``question`` re-cases or re-punctuates (the workload knows which paraphrase belongs to
    which question).
    """

    index: int
    question: str
    collection: str
    model: str
    temperature: float
    canonical: str = ""


def canonical_question(text: str) -> str:
    """The question a text of the workload asks: its words, lower-cased, without punctuation or spacing.

    A re-cased or re-punctuated variant has the words of its question, and two questions of the workload
    never have the same words; so two texts ask the same question exactly when this is equal.
    """
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


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
            topic, verb = rng.choice(_TOPICS), rng.choice(_VERBS)
            question = source = f"Why does {topic} fail when I {verb} it? (ticket {index})"
        else:
            rank = min(bisect.bisect_left(cumulative, rng.random() * total), config.catalog - 1)
            question = source = _question(order[rank])
            if rng.random() < config.variant_fraction:
                question = _variant(question, rng)
        collection = "support" if "fail" in question.lower() or "debug" in question.lower() else "docs"
        model = "gpt-4o" if rng.random() < 0.2 else "gpt-4o-mini"
        temperature = 0.7 if rng.random() < 0.1 else 0.0
        requests.append(Request(index, question, collection, model, temperature, source))
    return requests
