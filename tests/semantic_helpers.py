"""Helpers shared by the semantic cache tests: controllable embedders and a sample of real near-duplicates."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DATA_DIR", "AngleEmbedder", "CountingEmbedder", "WordsEmbedder", "near_duplicate_texts"]

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared evaluation data (``../shared/data`` beside the repository), present in CI and development."""


class AngleEmbedder:
    """Embeds ``"<topic>@<degrees>"`` as a unit vector at that angle from the topic's axis, in 16 dimensions.

    Two texts of one topic at angles a and b have cosine similarity cos(a - b); texts of different topics are
    orthogonal (up to 8 topics; the 9th shares the first one's plane). Lets tests pick similarities exactly.
    """

    ndim = 16
    default_threshold = None
    blocking = False

    def __init__(self) -> None:
        self.name = f"angle-{id(self):x}"
        self.calls: list[list[str]] = []
        self._topics: dict[str, int] = {}

    def vector(self, text: str) -> np.ndarray:
        topic, _, degrees = text.partition("@")
        axis = self._topics.setdefault(topic, len(self._topics) % 8)
        angle = math.radians(float(degrees or 0))
        out = np.zeros(self.ndim, dtype=np.float32)
        out[2 * axis] = math.cos(angle)
        out[2 * axis + 1] = math.sin(angle)
        return out

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([self.vector(t) for t in texts])


class WordsEmbedder:
    """Texts with the same words (case and punctuation apart) get the same vector; others a near one."""

    ndim = 8
    name = "words"

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            words = " ".join(re.findall(r"[a-z0-9']+", text.casefold()))
            seed = int.from_bytes(hashlib.blake2b(words.encode(), digest_size=4).digest(), "big")
            row = np.ones(self.ndim) + 0.05 * np.random.default_rng(seed).standard_normal(self.ndim)
            rows.append(row / np.linalg.norm(row))
        return np.asarray(rows, dtype=np.float32)


class CountingEmbedder:
    """Wraps another embedder, counting texts; can be told to return broken output."""

    def __init__(self, inner: object, *, broken: str | None = None) -> None:
        self.inner = inner
        self.name = f"counting-{id(self):x}"
        self.ndim: int | None = getattr(inner, "ndim", None)
        self.default_threshold = 0.5
        self.broken = broken
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> object:
        self.texts.extend(texts)
        good = np.asarray(self.inner(texts), dtype=np.float32)  # type: ignore[operator]
        if self.broken == "nan":
            good[0, 0] = np.nan
        elif self.broken == "inf":
            good[0, 0] = np.inf
        elif self.broken == "dimension":
            return good[:, :-1]
        elif self.broken == "rows":
            return good[:-1]
        elif self.broken == "zeros":
            return np.zeros_like(good)
        elif self.broken == "raise":
            raise RuntimeError("embedding service unavailable")
        elif self.broken == "ragged":
            return [[1.0, 2.0], [1.0]]
        return good


def _synthetic(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
             "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform"]
    out = []
    for _ in range(count):
        sentence = [rng.choice(words) for _ in range(8)]
        variant = list(sentence)
        variant[rng.randrange(8)] = rng.choice(words)
        out.append((" ".join(sentence), " ".join(variant)))
    return out


def near_duplicate_texts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` pairs of real near-duplicate questions (QQP duplicates, then GPTCache's paraphrases).

    Read from ``../shared/data`` at test time; synthetic near-duplicates when the directory is absent.
    """
    pairs: list[tuple[str, str]] = []
    qqp = DATA_DIR / "qqp-dev.jsonl.gz"
    if qqp.exists():
        with gzip.open(qqp, "rt", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if row["duplicate"] and row["a"].strip() and row["a"] != row["b"]:
                    pairs.append((row["a"], row["b"]))
    mock = DATA_DIR / "gptcache-mock-pairs.json"
    if mock.exists():
        pairs.extend((row["origin"], row["similar"]) for row in json.loads(mock.read_text(encoding="utf-8")))
    if not pairs:
        return _synthetic(count, seed)
    seen: set[str] = set()
    unique = []
    for a, b in pairs:
        if a not in seen:
            seen.add(a)
            unique.append((a, b))
    random.Random(seed).shuffle(unique)
    if len(unique) < count:
        unique.extend(_synthetic(count - len(unique), seed))
    return unique[:count]


def sample(items: Sequence[str], k: int, seed: int) -> list[str]:
    """A deterministic sample."""
    return random.Random(seed).sample(list(items), k)
