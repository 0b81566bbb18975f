"""Semantic cache quality on real data: GPTCache's replay and precision/recall on the QQP dev pairs.

Reads ``../shared/data`` (see its README) at run time; nothing is copied into the repository.

(a) **Replay** (GPTCache's own benchmark): cache the answer of every ``origin`` of
    ``gptcache-mock-pairs.json``, then ask every ``similar``. Each question is looked up through
    cachelayers' own store (usearch, one partition): a *true hit* is answered by its own origin, a *false
    hit* by another origin (a wrong answer served), a *miss* computes.
(b) **Threshold quality** on ``qqp-dev.jsonl.gz``: precision and recall of "similarity >= threshold" against
    the human label, and the threshold `cachelayers.calibrate` picks for the target precision by its rule
    (the lowest threshold from which precision stays >= target, ignoring thresholds that accept fewer than 50
    pairs). That threshold is chosen on QQP dev only — never on the replay numbers — and is the documented
    default of each embedder; a held-out half of the pairs checks that it carries over.

    python benchmarks/eval_semantic.py --embedders default minilm --plot-dir docs/assets
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from _util import make_parser, render_table, to_json
from cachelayers.backends.vectors import IndexOptions
from cachelayers.calibrate import Calibration, load_pairs
from cachelayers.codec import Codec
from cachelayers.embedders import embed, embedder_name, resolve_embedder
from cachelayers.engines.semantic import SemanticStats as _Stats
from cachelayers.engines.semantic import SemanticStore
from cachelayers.metrics import StateLog

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPLAY_THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.98)


async def embed_all(embedder: Any, texts: list[str], cache_dir: Path | None) -> dict[str, np.ndarray]:
    """Vectors of ``texts``, read from / saved to an ``.npy`` cache in ``cache_dir`` when given."""
    name = embedder_name(embedder)
    digest = hashlib.blake2b("\n".join([name, *texts]).encode(), digest_size=12).hexdigest()
    path = cache_dir / f"{digest}.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        matrix = np.load(path)
    else:
        chunks = [await embed(embedder, texts[i:i + 256]) for i in range(0, len(texts), 256)]
        matrix = np.concatenate(chunks)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, matrix)
    return dict(zip(texts, matrix, strict=True))


async def replay(vectors: dict[str, np.ndarray], pairs: list[dict[str, str]]) -> list[tuple[str, float]]:
    """For each ``similar``: the origin text of its nearest cached entry and the similarity."""
    store = SemanticStore(max_entries=10**9, options=IndexOptions(), clock=lambda: 0.0,
                          stats=_Stats(), log=StateLog(), codec=Codec())
    first = next(iter(vectors.values()))
    await store.open("eval", int(first.shape[0]))
    partition = b"\x00" * 16
    for row in pairs:
        await store.insert(partition, row["origin"], vectors[row["origin"]], row["origin"], None)
    out = []
    for row in pairs:
        found = store.find_similar(partition, vectors[row["similar"]], 1)
        out.append((found[0][0].text, found[0][1]) if found else ("", -1.0))
    return out


def replay_table(pairs: list[dict[str, str]], results: list[tuple[str, float]],
                 thresholds: list[float]) -> list[dict[str, float]]:
    rows = []
    total = len(pairs)
    for t in thresholds:
        true_hits = sum(1 for row, (text, sim) in zip(pairs, results, strict=True)
                        if sim >= t and text == row["origin"])
        false_hits = sum(1 for row, (text, sim) in zip(pairs, results, strict=True)
                         if sim >= t and text != row["origin"])
        rows.append({"threshold": t, "true_hit": true_hits / total, "false_hit": false_hits / total,
                     "miss": (total - true_hits - false_hits) / total})
    return rows


async def evaluate(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    embedder = resolve_embedder(spec)
    qqp = load_pairs(args.data / "qqp-dev.jsonl.gz")
    mock = json.loads((args.data / "gptcache-mock-pairs.json").read_text(encoding="utf-8"))
    texts = sorted({t for p in qqp for t in (p.a, p.b)} | {r[k] for r in mock for k in ("origin", "similar")})
    vectors = await embed_all(embedder, texts, args.cache_dir)
    a = np.stack([vectors[p.a] for p in qqp]).astype(np.float64)
    b = np.stack([vectors[p.b] for p in qqp]).astype(np.float64)
    calibration = Calibration(np.einsum("ij,ij->i", a, b), np.array([p.duplicate for p in qqp]),
                              embedder=embedder_name(embedder))
    chosen = calibration.threshold_for(args.target_precision)
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        calibration.plot(args.plot_dir / f"calibration-{spec}.png", target_precision=args.target_precision,
                         title=f"{calibration.embedder} on the QQP dev pairs ({len(calibration)} pairs)")
    results = await replay(vectors, mock)
    thresholds = sorted(set(REPLAY_THRESHOLDS) | ({chosen.threshold} if chosen else set()))
    return {"embedder": calibration.embedder, "spec": spec, "calibration": calibration, "chosen": chosen,
            "replay": replay_table(mock, results, thresholds)}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--embedders", nargs="+", default=["default", "minilm"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--target-precision", type=float, default=0.9)
    parser.add_argument("--plot-dir", type=Path, default=None, help="write calibration-<embedder>.png here")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache embeddings here (.npy)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (args.data / "qqp-dev.jsonl.gz").exists():
        print(f"no evaluation data in {args.data}", file=sys.stderr)
        return 2
    reports = [anyio.run(evaluate, spec, args) for spec in args.embedders]
    if args.json:
        print(to_json([{"embedder": r["embedder"], "chosen": r["chosen"]._asdict() if r["chosen"] else None,
                        "curve": [p._asdict() for p in r["calibration"].points], "replay": r["replay"]}
                       for r in reports], digits=None))
        return 0
    for r in reports:
        cal: Calibration = r["calibration"]
        chosen = r["chosen"]
        print(f"\n## {r['embedder']}\n")
        print(f"(b) QQP dev: {len(cal)} pairs, {int(cal.labels.sum())} duplicates")
        print(cal.table(every=0.05, highlight=chosen.threshold if chosen else None))
        if chosen is None:
            print(f"no threshold keeps precision >= {args.target_precision:g}")
        else:
            print(f"calibrated threshold for precision >= {args.target_precision:g}: {chosen.threshold:.2f} "
                  f"(precision {chosen.precision:.3f}, recall {chosen.recall:.3f})")
        print(f"\n(a) GPTCache replay: {len(r['replay'])} thresholds, 1000 origins cached, 1000 paraphrases asked")
        rows = [[f"{row['threshold']:.2f}", f"{row['true_hit']:.1%}", f"{row['false_hit']:.1%}", f"{row['miss']:.1%}",
                 "<- calibrated" if chosen is not None and abs(row["threshold"] - chosen.threshold) < 1e-9 else ""]
                for row in r["replay"]]
        print(render_table(["threshold", "true hit", "false hit", "miss", ""], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
