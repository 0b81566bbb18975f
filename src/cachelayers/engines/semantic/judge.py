"""The stages a candidate above the threshold goes through before it is served: the parts two long texts differ
in (`cachelayers.engines.semantic.differences`), else the verifier."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from cachelayers.engines.parallel import Outcome, gather_bounded
from cachelayers.engines.semantic.differences import differing_parts, parts_are_alike
from cachelayers.engines.semantic.info import LogNames, SemanticStats
from cachelayers.engines.semantic.lookups import Candidate, Verifier
from cachelayers.engines.semantic.options import SIMILARITY_TOLERANCE
from cachelayers.errors import EmbeddingError
from cachelayers.metrics import StateLog

__all__ = ["Judge"]


class Judge:
    """Decides whether a candidate may answer a call, counting what it refuses in the function's stats.

    Args:
        threshold: The function's threshold (the differing parts of two long texts must reach it too).
        verifier: The function's verifier, if any.
        embed_text: The function's embedding path (cached, batched).
        stats: The function's counters.
        log: The function's failure log.
        names: What the function's log calls its parts.
        failed: How the function reports a failure of its embedder (logged; raised in strict mode).
    """

    __slots__ = ("_embed_text", "_failed", "_log", "_stats", "_verifier", "_what", "threshold")

    def __init__(self, threshold: float, verifier: Verifier | None,
                 embed_text: Callable[[str], Coroutine[Any, Any, np.ndarray]], stats: SemanticStats, log: StateLog,
                 names: LogNames,
                 failed: Callable[[EmbeddingError], None]) -> None:
        self.threshold = threshold
        self._verifier = verifier
        self._embed_text = embed_text
        self._stats = stats
        self._log = log
        self._what = names.verifier
        self._failed = failed

    async def accepts(self, text: str, other: str, value: Any, similarity: float) -> bool:
        """Whether the entry of text ``other`` (holding ``value``, at ``similarity``) may answer ``text``."""
        parts = differing_parts(text, other)  # long texts that share most words: judged by what differs
        if parts is not None:
            verdict = parts_are_alike(*parts)
            if verdict is None:  # the differing words must ask alike on their own
                verdict = await self._parts_agree(parts, value)
                if verdict:
                    return True  # the verifier, if any, judged the parts
            if not verdict:
                self._stats.difference_rejections += 1
                return False
        # case or punctuation apart the same texts, or short ones: the verifier, if any, sees them whole
        return self._verifier is None or await self._verify(text, other, value, similarity)

    async def _parts_agree(self, parts: tuple[str, str], value: Any) -> bool:
        # together, so that the embedding batcher sends both texts in one embedder call
        outcomes: list[Outcome[np.ndarray]] = await gather_bounded([self._embed_text(part) for part in parts])
        for outcome in outcomes:
            if isinstance(outcome.error, EmbeddingError):
                self._stats.embed_errors += 1
                self._failed(outcome.error)
                return False
            if outcome.error is not None:
                raise outcome.error
        mine, theirs = (outcome.value for outcome in outcomes)
        assert mine is not None
        assert theirs is not None
        similarity = min(1.0, float(np.dot(mine, theirs)))
        if similarity < self.threshold - SIMILARITY_TOLERANCE:
            return False
        return self._verifier is None or await self._verify(parts[0], parts[1], value, similarity)

    async def _verify(self, text: str, other: str, value: Any, similarity: float) -> bool:
        assert self._verifier is not None
        try:
            verdict = self._verifier(text, Candidate(other, value, similarity))
            accepted: object = await verdict if inspect.isawaitable(verdict) else verdict
            if type(accepted) is not bool and not isinstance(accepted, np.bool_):
                # "NO" from an LLM judge is truthy, an array has no single truth: only a bool is a verdict
                raise TypeError(f"the verifier returned {type(accepted).__name__} {accepted!r:.60}, "
                                "not True or False")
        except Exception as exc:  # a broken verifier rejects: serving unverified answers is the worse failure
            self._stats.verifier_errors += 1
            self._log.failure(self._what, exc)
            return False
        self._log.recovered(self._what)
        if not accepted:
            self._stats.verifier_rejections += 1
        return bool(accepted)
