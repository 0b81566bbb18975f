"""Train the pair verifier (a logistic regression over cheap features of two texts) on QQP dev pairs.

Uses only the ``tune`` half of a fixed sample of ``qqp-dev.jsonl.gz`` (the same halves as
``eval_semantic.py``'s QQP check), never the replay. Prints the weights to paste into
``cachelayers.embedders.PAIR_VERIFIER_WEIGHTS`` and the fit on both QQP halves.

    python benchmarks/train_verifier.py --qqp-limit 4000 --cache-dir /tmp/eval-vectors
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import anyio
import numpy as np

from _util import make_parser
from cachelayers.calibrate import load_pairs
from cachelayers.embedders import PAIR_FEATURES, PairVerifier, pair_features, resolve_embedder
from eval_semantic import DATA, embed_all, half_of


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 400) -> np.ndarray:
    """Logistic regression by Newton's method on standardised-free features; returns bias + weights."""
    xb = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-xb @ w))
        grad = xb.T @ (p - y) / len(y) + l2 * np.r_[0, w[1:]]
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


async def run(args: argparse.Namespace) -> int:
    model = resolve_embedder(args.embedder)
    pairs = load_pairs(args.data / "qqp-dev.jsonl.gz")
    random.Random(13).shuffle(pairs)
    pairs = pairs[:args.qqp_limit]
    vectors = await embed_all(model, sorted({t for p in pairs for t in (p.a, p.b)}), args.cache_dir)
    halves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for half in ("tune", "held"):
        rows = [p for p in pairs if half_of(p.a + "\x00" + p.b) == half]
        sims = [float(np.dot(vectors[p.a], vectors[p.b])) for p in rows]
        x = np.array([pair_features(p.a, p.b, s) for p, s in zip(rows, sims, strict=True)])
        halves[half] = x, np.array([p.duplicate for p in rows], dtype=float)
    w = fit(*halves["tune"])
    print("PAIR_VERIFIER_WEIGHTS = (" + ", ".join(f"{v:.4f}" for v in w) + ")")
    print("features:", ("bias", *PAIR_FEATURES))
    for half, (x, y) in halves.items():
        p = 1 / (1 + np.exp(-(np.hstack([np.ones((len(x), 1)), x]) @ w)))
        cos = x[:, 0]
        for name, score in (("verifier", p), ("cosine", cos)):
            order = np.argsort(-score)
            tp = np.cumsum(y[order])
            prec = tp / np.arange(1, len(y) + 1)
            recall = tp / y.sum()
            at = [recall[np.nonzero(prec >= t)[0][-1]] if (prec >= t).any() else 0.0 for t in (0.85, 0.9, 0.95)]
            print(f"{half} half ({len(y)} pairs), {name}: recall at precision 0.85/0.90/0.95 = "
                  + " / ".join(f"{r:.3f}" for r in at))
    verifier = PairVerifier(args.min_probability)
    for half in ("tune", "held"):
        rows = [p for p in pairs if half_of(p.a + "\x00" + p.b) == half]
        sims = [float(np.dot(vectors[p.a], vectors[p.b])) for p in rows]
        y = np.array([p.duplicate for p in rows])
        for name, accepted in (
                (f"cosine >= {args.threshold:g}", np.array([s >= args.threshold for s in sims])),
                (f"cosine >= {args.threshold:g} and shipped PairVerifier({args.min_probability:g})",
                 np.array([s >= args.threshold and verifier.probability(p.a, p.b, s) >= args.min_probability
                           for p, s in zip(rows, sims, strict=True)]))):
            hits = int((accepted & y).sum())
            print(f"{half} half, {name}: precision {hits / max(accepted.sum(), 1):.3f}, recall {hits / y.sum():.3f} "
                  f"({int(accepted.sum())} pairs accepted)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--qqp-limit", type=int, default=4000)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--threshold", type=float, default=0.85, help="report precision at this threshold...")
    parser.add_argument("--min-probability", type=float, default=0.7, help="...with the shipped verifier at this")
    return anyio.run(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
