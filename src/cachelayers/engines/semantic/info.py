"""What ``cache_info()`` of a semantically cached function tells, and the counters behind it."""

from __future__ import annotations

from typing import NamedTuple

from cachelayers.metrics import LatencyRing

__all__ = ["LogNames", "SemanticCacheInfo", "SemanticStats"]


class SemanticCacheInfo(NamedTuple):
    """What ``cache_info()`` of a semantically cached function tells.

    Latencies are in seconds, ``None`` until measured.
    """

    exact_hits: int
    semantic_hits: int
    misses: int
    uncached: int
    hit_rate: float
    entries: int
    partitions: int
    evictions: int
    expirations: int
    embed_errors: int
    index_errors: int
    verifier_rejections: int
    verifier_errors: int
    unstorable: int
    compactions: int
    cached_p50: float | None
    computed_p50: float | None
    corrupt: int = 0
    """Stored entries (rows, vectors, payloads) dropped because they failed their integrity check."""
    answer_checks: int = 0
    """Would-be semantic hits computed instead, to check them (``agreement=``); counted in ``misses`` too."""
    answer_disagreements: int = 0
    """Checks whose cached answer disagreed with the function's: wrong answers the checks kept from serving."""
    difference_rejections: int = 0
    """Candidates refused because the parts in which two long texts differ do not ask alike (see
    `cachelayers.engines.semantic.differences`)."""
    store_skipped: int = 0
    """Store operations not tried because the store kept failing (its circuit breaker was open); also counted
    in ``index_errors``."""


class SemanticStats:
    """The counters of one semantically cached function, bumped by its engine and its store."""

    __slots__ = ("answer_checks", "answer_disagreements", "cached_latency", "compactions", "computed_latency",
                 "corrupt", "difference_rejections", "embed_errors", "evictions", "exact_hits", "expirations",
                 "index_errors", "misses", "semantic_hits", "store_skipped", "uncached", "unstorable",
                 "verifier_errors", "verifier_rejections")

    def __init__(self) -> None:
        self.exact_hits = 0
        self.semantic_hits = 0
        self.misses = 0
        self.uncached = 0
        self.evictions = 0
        self.expirations = 0
        self.embed_errors = 0
        self.index_errors = 0
        self.verifier_rejections = 0
        self.verifier_errors = 0
        self.unstorable = 0
        self.compactions = 0
        self.corrupt = 0
        self.answer_checks = 0
        self.answer_disagreements = 0
        self.difference_rejections = 0
        self.store_skipped = 0
        self.cached_latency = LatencyRing()
        self.computed_latency = LatencyRing()



class LogNames:
    """The names under which a semantically cached function logs what fails (once) and recovers (once)."""

    __slots__ = ("agree", "embedder", "index", "split", "store", "verifier")

    def __init__(self, identity: str, embedder: str) -> None:
        self.agree = f"agree of {identity}"
        self.verifier = f"verifier of {identity}"
        self.split = f"partition/text functions of {identity}"
        self.store = f"semantic store of {identity}"
        self.index = f"semantic index of {identity}"
        self.embedder = f"embedder {embedder}"
