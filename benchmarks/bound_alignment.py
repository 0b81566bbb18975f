"""How far can a judge of two texts go on GPTCache's replay, given MiniLM's *token* vectors as well?

A bound, not an evaluation of the cache: it reads MiniLM's per-token vectors, which no `cachelayers` embedder
returns, and scores, for every paraphrase, its nearest origin by cosine (*pre-loaded*: right or wrong), and for
every origin its nearest *earlier* distinct origin (a *twin*: always a wrong answer, the realistic protocol's
*origins wrong*). Scores: cosine, the shipped `PairVerifier`'s probability, BERTScore-style alignment of the
two texts' tokens (mean of each token's best match: precision P, recall R, their mean F; the worst-matched
token, ``min``; the 10th percentile, ``q10``), and, as an upper bound, logistic regressions over all of them
fitted on the replay itself (an oracle: it has seen the answers it is scored on).

    python benchmarks/bound_alignment.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _util import make_parser
from cachelayers.embedders import PairVerifier, minilm, pair_features, same_words
from eval_semantic import DATA
from train_verifier import fit

SCORES = ("cosine", "verifier", "P", "R", "F", "min", "q10")


def load_model() -> Any:
    """The sentence-transformers model `minilm()` loads (the same weights, the same pooling)."""
    return minilm(device="cpu")._load()


def scores(text: str, other: str, cosine: float, tokens: dict[str, np.ndarray]) -> list[float]:
    """`SCORES` of a pair, then `pair_features`."""
    match = tokens[text] @ tokens[other].T
    p, r = match.max(axis=1), match.max(axis=0)
    aligned = [p.mean(), r.mean(), (p.mean() + r.mean()) / 2, min(p.min(), r.min()),
               min(np.quantile(p, 0.1), np.quantile(r, 0.1))]
    probability = PairVerifier().probability(text, other, cosine)
    return [cosine, probability, *map(float, aligned), *pair_features(text, other, cosine)]


def best_under(score: np.ndarray, right: np.ndarray, twins: np.ndarray, bound: float) -> tuple[float, float, float]:
    """The most true hits a bar on ``score`` gives with twins accepted and false hits both at most ``bound``."""
    found = (0.0, 0.0, 0.0)
    for bar in np.sort(np.unique(score))[::-1]:
        twin, false = float(np.mean(twins >= bar)), float(np.mean((score >= bar) & ~right))
        if twin > bound or false > bound:
            break
        found = (float(np.mean((score >= bar) & right)), false, twin)
    return found


def run(args: argparse.Namespace) -> int:
    pairs = json.loads((args.data / "gptcache-mock-pairs.json").read_text())
    origins = list(dict.fromkeys(p["origin"] for p in pairs))
    index = {o: i for i, o in enumerate(origins)}
    texts = sorted(set(origins) | {p["similar"] for p in pairs})
    model = load_model()
    pooled = dict(zip(texts, model.encode(texts, normalize_embeddings=True, batch_size=64), strict=True))
    tokens: dict[str, np.ndarray] = {}
    for text, t in zip(texts, model.encode(texts, output_value="token_embeddings", batch_size=64), strict=True):
        t = t.numpy()[1:-1]  # without [CLS] and [SEP]
        tokens[text] = t / np.linalg.norm(t, axis=1, keepdims=True)
    o = np.stack([pooled[t] for t in origins])
    para, right = [], []
    for p in pairs:
        similarity = o @ pooled[p["similar"]]
        nearest = int(np.argmax(similarity))
        para.append(scores(p["similar"], origins[nearest], float(similarity[nearest]), tokens))
        right.append(nearest == index[p["origin"]])
    twin = []
    for i, text in enumerate(origins[1:], start=1):
        similarity = o[:i] @ pooled[text]
        nearest = int(np.argmax(similarity))
        if not same_words(text, origins[nearest]):
            twin.append(scores(text, origins[nearest], float(similarity[nearest]), tokens))
    x, y, tw = np.array(para), np.array(right), np.array(twin)
    print(f"{len(x)} paraphrases, nearest origin right for {y.mean():.1%}; {len(tw)} origins with an earlier twin")
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {name: (x[:, i], tw[:, i]) for i, name in enumerate(SCORES)}
    for name, cols in (("oracle: pair_features", slice(len(SCORES), None)), ("oracle: all", slice(None))):
        w = fit(np.vstack([x[:, cols], tw[:, cols]]), np.r_[y, np.zeros(len(tw))], l2=1e-4)
        columns[name] = (w[0] + x[:, cols] @ w[1:], w[0] + tw[:, cols] @ w[1:])
    print("\nscore                   | " + " | ".join(f"at {t:.0%} true: false, twins" for t in args.targets)
          + f" | most true with false and twins <= {args.bound:.1%}")
    for name, (score, twins) in columns.items():
        cells = []
        for target in args.targets:
            bar = np.sort(score[y])[::-1][int(target * len(y)) - 1]
            cells.append(f"{np.mean((score >= bar) & ~y):.1%}, {np.mean(twins >= bar):.1%}")
        true, false, twin_share = best_under(score, y, twins, args.bound)
        print(f"{name:23s} | " + " | ".join(f"{c:>24s}" for c in cells)
              + f" | {true:.1%} true ({false:.1%} false, {twin_share:.1%} twins)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    parser.add_argument("--bound", type=float, default=0.015, help="bound on false hits and twins accepted")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
