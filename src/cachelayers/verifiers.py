"""Telling whether two texts ask the same thing, without a model: `same_words` and the learned `PairVerifier`.

`PairVerifier` is the verifier `cachelayers.embedders.minilm` carries: a logistic regression over cheap features
of the two texts (`pair_features`), numpy only, offline. The names are also exported by `cachelayers.embedders`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Final

from cachelayers.errors import ConfigError
from cachelayers.validation import probability

__all__ = ["PAIR_FEATURES", "PAIR_VERIFIER_WEIGHTS", "PairVerifier", "SameFacts", "facts_differ", "pair_features",
           "same_words"]


_WORD = re.compile(r"[a-z0-9_]+(?:[.'][a-z0-9_]+)*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NEGATIONS: Final = frozenset({"not", "no", "never", "without", "cannot", "can't", "don't", "doesn't", "isn't",
                               "aren't", "won't", "shouldn't", "didn't", "nor", "none"})
_STOPWORDS: Final = frozenset({
    "a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "was", "were", "be", "been", "being",
    "do", "does", "did", "can", "could", "should", "would", "will", "may", "might", "must", "i", "you", "he", "she",
    "it", "we", "they", "me", "my", "your", "our", "their", "its", "this", "that", "these", "those", "what",
    "which", "who", "whom", "how", "why", "when", "where", "there", "here", "with", "by", "from", "at", "as",
    "about", "into", "if", "then", "than", "so", "too", "very", "just", "any", "some", "all", "each", "get", "got",
    "use", "using", "used",
})

PAIR_FEATURES: Final = ("cosine", "token_jaccard", "char3_jaccard", "content_overlap", "unmatched_content",
                        "number_mismatch", "negation_mismatch", "length_ratio")
"""The features of `pair_features`, in order."""


def _char3(text: str) -> set[str]:
    padded = f" {' '.join(text.split())} "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_SAME_TOKEN: Final = re.compile(r"\.?\d+(?:[.,]\d+)*|\w+(?:[.'\u2019]\w+)*|[^\w\s]+")
_SENTENCE_MARKS: Final = frozenset(".,;:!?¿¡'\"`\u2018\u2019\u201c\u201d()[]«»…")


def _words(text: str) -> list[str]:
    """Numbers (``.5``, ``2.5``, ``1,000``), words and runs of marks; a run of sentence marks only is left out
    (``?``, ``"`` or ``)[`` go, ``!=``, ``-`` and ``$`` stay)."""
    normal = unicodedata.normalize("NFKC", text).casefold()
    return [t for t in _SAME_TOKEN.findall(normal) if not set(t) <= _SENTENCE_MARKS]


def same_words(text: str, other: str) -> bool:
    """Whether two texts are the same words in the same order, apart from case, spacing and the marks around
    words that do not change a question (``.,;:!?`` quotes, backticks, brackets): ``"How do I reset my
    password? "`` and ``"how do i reset my password"``. Words are Unicode (a run of CJK characters is one word);
    numbers keep their decimal point (``2.5`` is not ``25``, ``.5`` not ``5``), contractions their apostrophe,
    and every other run of marks counts as a word of its own (``-5`` is not ``5``, ``$100`` not ``€100``,
    ``a != b`` not ``a = b``).
    Texts without a word are never the same words."""
    a = _words(text)
    return any(t[-1].isalnum() or t[-1] == "_" for t in a) and a == _words(other)


_NUMERIC: Final = re.compile(r"\.?\d")
_THOUSANDS: Final = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NEGATIVE: Final = re.compile(r"(?:^|(?<=[\s(\[{:=,;/]))[-\u2212](\.?\d[\d,]*(?:\.\d+)*)")
"""A number written with a minus sign of its own (``-40``, ``(-5``), not a dash between two (``10-20``)."""


def _number(word: str) -> str:
    return word.replace(",", "") if _THOUSANDS.fullmatch(word) else word


def _facts(text: str) -> tuple[frozenset[str], bool]:
    """The numbers of ``text`` as written (``1,000`` is ``1000``; ``2.50`` is not ``2.5``, as ``3.10`` is not
    ``3.1``; ``-40`` is not ``40``) and whether it negates."""
    words = [w.replace("\u2019", "'") for w in _words(text)]
    numbers = {_number(w) for w in words if _NUMERIC.match(w)}
    numbers |= {"-" + _number(n) for n in _NEGATIVE.findall(unicodedata.normalize("NFKC", text))}
    return frozenset(numbers), any(w in _NEGATIONS for w in words)


def facts_differ(text: str, other: str) -> str | None:
    """Why ``text`` and ``other`` cannot ask the same thing however similar they read, or ``None``.

    Two texts differ in fact when their numbers differ as written (``5 mg`` / ``50 mg``, ``2.5`` / ``25``,
    ``3.10`` / ``3.1``, ``-40`` / ``40``; ``1,000`` and ``1000`` are one number) or when one negates (``not``, ``no``,
    ``never``, ``without``, ``can't``, ...) and the other does not. Embeddings of long texts that differ in
    one number are nearly identical.
    """
    numbers, negates = _facts(text)
    other_numbers, other_negates = _facts(other)
    if numbers != other_numbers:
        return "their numbers differ"
    if negates != other_negates:
        return "one negates and the other does not"
    return None


class SameFacts:
    """A verifier for `semantic_cached` that rejects a candidate whose numbers or negation differ from the
    call's (`facts_differ`): the default verifier of the built-in `HashingEmbedder`."""

    async def __call__(self, text: str, candidate: Any) -> bool:
        return facts_differ(text, candidate.text) is None

    def __repr__(self) -> str:
        return "SameFacts()"


def pair_features(text: str, other: str, similarity: float) -> tuple[float, ...]:
    """Cheap features of two texts for `PairVerifier`, named by `PAIR_FEATURES` (each in ``[0, 1]``).

    Args:
        text: The text of the call.
        other: The text of the cached candidate.
        similarity: Their embedding similarity.

    Returns:
        ``similarity``; Jaccard of their words and of their character 3-grams; the share of the smaller set
        of content words (stopwords removed) found in the other; the share of content words found in one text
        only; 1.0 when their numbers differ; 1.0 when one negates and the other does not; the ratio of their
        word counts (smaller over larger).
    """
    a, b = text.casefold(), other.casefold()
    wa, wb = _WORD.findall(a), _WORD.findall(b)
    sa, sb = set(wa), set(wb)
    ca, cb = sa - _STOPWORDS, sb - _STOPWORDS
    overlap = len(ca & cb) / min(len(ca), len(cb)) if ca and cb else float(ca == cb)
    unmatched = len(ca ^ cb) / len(ca | cb) if ca | cb else 0.0
    numbers = float(set(_NUMBER.findall(a)) != set(_NUMBER.findall(b)))
    negation = float(bool(sa & _NEGATIONS) != bool(sb & _NEGATIONS))
    ratio = min(len(wa), len(wb)) / max(len(wa), len(wb), 1)
    return (similarity, _jaccard(sa, sb), _jaccard(_char3(a), _char3(b)), overlap, unmatched, numbers, negation,
            ratio)


PAIR_VERIFIER_WEIGHTS: Final = (-6.8514, 7.4366, -0.2119, -0.8617, 1.1129, 0.5598, -0.2600, -0.3408, 0.1555)
"""Bias and weights of `PairVerifier` (`benchmarks/train_verifier.py`)."""

class PairVerifier:
    """A verifier for `semantic_cached`: a logistic regression over `pair_features`, numpy only, offline.

    It accepts a candidate when the modelled probability that the call and the candidate ask the same thing is
    at least ``min_probability``, and always when both are the same words (`same_words`: case, spacing and
    punctuation apart), which the model, fitted on pairs that differ, scores at 0.69; never when their numbers
    or their negation differ (`facts_differ`), which the model weighs too lightly. The default weights
    were fitted on labelled duplicate questions (QQP dev pairs, tune half; `benchmarks/train_verifier.py`),
    not on the replay the threshold is chosen on.

    Args:
        min_probability: The probability below which a candidate is rejected, in ``[0, 1]``.
        weights: Bias then one weight per feature of `PAIR_FEATURES`.

    Raises:
        ConfigError: ``min_probability`` is outside ``[0, 1]`` or ``weights`` has the wrong length.
    """

    def __init__(self, min_probability: float = 0.5, *,
                 weights: Sequence[float] | None = None) -> None:
        min_probability = probability(min_probability, "min_probability")
        chosen = tuple(PAIR_VERIFIER_WEIGHTS if weights is None else weights)
        if len(chosen) != len(PAIR_FEATURES) + 1 or not all(math.isfinite(w) for w in chosen):
            raise ConfigError("weights", weights, f"expected {len(PAIR_FEATURES) + 1} finite numbers")
        self.min_probability = float(min_probability)
        self.weights = chosen

    def probability(self, text: str, other: str, similarity: float) -> float:
        """The modelled probability that ``text`` and ``other`` (at ``similarity``) ask the same thing."""
        z = self.weights[0] + sum(w * f for w, f in zip(self.weights[1:], pair_features(text, other, similarity),
                                                        strict=True))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    async def __call__(self, text: str, candidate: Any) -> bool:
        if same_words(text, candidate.text):  # one question written twice: the model's features do not cover it
            return True
        if facts_differ(text, candidate.text) is not None:  # "5 mg" / "50 mg": no probability makes it the same
            return False
        return self.probability(text, candidate.text, float(candidate.similarity)) >= self.min_probability

    def __repr__(self) -> str:
        return f"PairVerifier(min_probability={self.min_probability})"
