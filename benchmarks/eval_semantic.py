"""Semantic cache quality on real data, through the public decorator: GPTCache's replay and the QQP pairs.

Reads ``../shared/data`` (see its README) at run time; nothing is copied into the repository.

(a) **Replay** (GPTCache's ``mock_data.json``: 1,000 ``origin`` questions, each with a paraphrase
    ``similar``), asked of ``@semantic_cached(embed=...)`` whose function returns the id of the question's
    origin. Two protocols:

    - *realistic*: every origin goes through the function first (a cache warms by being used: an origin that
      looks like an earlier one is answered with that one's value, and counted in ``origins wrong``), then
      every paraphrase;
    - *pre-loaded*: the origins are loaded with ``await fn.prefill([(origin, id), ...])``, then every
      paraphrase (GPTCache's own protocol).

    A paraphrase answered with its own origin's id is a *true hit*, with another id a *false hit* (a wrong
    answer served), and computed a *miss* (a missed paraphrase is stored, like any computed call). Each
    protocol runs on all pairs and on two halves split by origin (``tune``/``held``): approaches are tuned
    on ``tune`` only, and ``held`` shows whether they carry over.
(b) **Threshold quality** on ``qqp-dev.jsonl.gz``: precision and recall of "similarity >= threshold" on two
    halves of the pairs (split by a hash of the pair): the threshold is chosen on ``tune`` by
    `cachelayers.calibrate`'s rule for the target precision and its precision is reported on ``held``.

Options beyond the default configuration: ``--threshold``, ``--margin``, ``--verifier P`` (a `PairVerifier`),
``--agreement MAX_ERROR`` (an `AnswerAgreement` per replay, its draws seeded by ``--seed``); ``--bounds``
prints what a rule that sees only the two texts can reach on the replay, and stops.

    python benchmarks/eval_semantic.py --embedders minilm default --cache-dir /tmp/eval-vectors
    python benchmarks/eval_semantic.py --embedders minilm --no-qqp --threshold 0.80 --margin 0.05 --agreement 0.02
    python benchmarks/eval_semantic.py --embedders minilm --no-qqp --bounds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from _util import make_parser, render_table, to_json
from cachelayers import AnswerAgreement, Candidate, explain, semantic_cached
from cachelayers.calibrate import Calibration, Pair, load_pairs
from cachelayers.embedders import PairVerifier, embed, embedder_name, resolve_embedder
from cachelayers.errors import ConfigError
from cachelayers.validation import positive_int, probability, similarity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Precomputed:
    """An embedder answering from precomputed vectors (else from ``inner``), with ``inner``'s attributes.

    Same name, dimension and defaults as ``inner``, so the cache behaves as with ``inner``; only the model's
    time is saved (the hit latency it reports is then the cache's own).
    """

    def __init__(self, inner: Any, vectors: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.vectors = vectors
        self.blocking = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.vectors]
        if missing:
            rows = np.asarray(self.inner(missing), dtype=np.float32)
            self.vectors.update(zip(missing, rows, strict=True))
        return np.stack([self.vectors[t] for t in texts])


class Concatenated:
    """Several embedders as one: their unit vectors side by side, so a similarity is the mean of theirs."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.name = "+".join(embedder_name(p) for p in parts)
        self.blocking = False

    async def __call__(self, texts: list[str]) -> np.ndarray:
        return np.hstack([await embed(p, texts) for p in self.parts])


async def embed_all(embedder: Any, texts: list[str], cache_dir: Path | None) -> dict[str, np.ndarray]:
    """Vectors of ``texts``; with ``cache_dir``, kept per embedder in an ``.npz`` that grows with new texts."""
    if isinstance(embedder, Concatenated):
        parts = [await embed_all(p, texts, cache_dir) for p in embedder.parts]
        return {t: np.hstack([part[t] for part in parts]) / np.sqrt(len(parts)) for t in texts}
    name = embedder_name(embedder)
    known: dict[str, np.ndarray] = {}
    path = cache_dir / (hashlib.blake2b(name.encode(), digest_size=8).hexdigest() + ".npz") if cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as stored:
            known = dict(zip(stored["texts"].tolist(), stored["vectors"], strict=True))
    missing = [t for t in texts if t not in known]
    for i in range(0, len(missing), 256):
        chunk = missing[i:i + 256]
        known.update(zip(chunk, await embed(embedder, chunk), strict=True))
    if path is not None and missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        ordered = sorted(known)
        np.savez(path, texts=np.array(ordered), vectors=np.stack([known[t] for t in ordered]))
    return {t: known[t] for t in texts}


def half_of(text: str) -> str:
    """``"tune"`` or ``"held"``, by a hash of the text (stable across runs and machines)."""
    return "tune" if hashlib.blake2b(text.encode(), digest_size=1).digest()[0] % 2 == 0 else "held"


async def replay(embedder: Any, pairs: list[dict[str, str]], protocol: str,
                 options: dict[str, Any]) -> dict[str, float | None]:
    """Run one protocol through a fresh ``@semantic_cached`` function; return the rates (in %).

    ``None`` for what cannot be measured: every rate of a split without pairs (a half of a short ``--limit``),
    the latency when nothing was a semantic hit.
    """
    if not pairs:
        return {"true": None, "false": None, "miss": None, "origins_wrong": None, "hit_p50_us": None, "pairs": 0}
    group: dict[str, int] = {}
    for row in pairs:
        group.setdefault(row["origin"], len(group))
    truth = dict(group)
    for row in pairs:
        truth.setdefault(row["similar"], group[row["origin"]])

    options = dict(options)
    agreement = options.pop("agreement", None)
    if agreement is not None:  # one policy per function, each run from the same seed
        options["agreement"] = AnswerAgreement(**agreement)

    @semantic_cached(embed=embedder, name=f"eval-{uuid.uuid4().hex}", cache_embeddings=False, **options)
    async def answer(question: str) -> int:
        return truth[question]

    origins = list(group)
    wrong_origins = 0
    if protocol == "realistic":
        for origin in origins:
            if await answer(origin) != group[origin]:
                wrong_origins += 1
    else:
        await answer.prefill([(origin, group[origin]) for origin in origins])
    true_hits = false_hits = 0
    hit_times: list[float] = []
    for row in pairs:
        with explain() as info:
            started = time.perf_counter()
            got = await answer(row["similar"])
            took = time.perf_counter() - started
        level = info.last.level if info.last is not None else "uncached"
        if level in ("exact", "semantic"):
            if got == group[row["origin"]]:
                true_hits += 1
            else:
                false_hits += 1
            if level == "semantic":
                hit_times.append(took)
    n = len(pairs)
    return {"true": 100 * true_hits / n, "false": 100 * false_hits / n,
            "miss": 100 * (n - true_hits - false_hits) / n, "origins_wrong": 100 * wrong_origins / len(origins),
            "hit_p50_us": 1e6 * statistics.median(hit_times) if hit_times else None,
            "pairs": n}


def qqp_check(vectors: dict[str, np.ndarray], qqp: list[Pair], target: float, name: str) -> dict[str, Any]:
    """Choose the threshold on one half of the pairs, report its precision on the other."""
    halves: dict[str, list[Pair]] = {"tune": [], "held": []}
    for pair in qqp:
        halves[half_of(pair.a + "\x00" + pair.b)].append(pair)
    out: dict[str, Any] = {}
    for half, rows in halves.items():  # a half may be empty (a tiny --qqp-limit)
        similarities = np.array([np.dot(vectors[p.a].astype(np.float64), vectors[p.b].astype(np.float64))
                                 for p in rows], dtype=np.float64)
        out[half] = Calibration(similarities, np.array([p.duplicate for p in rows], dtype=bool), embedder=name)
    out["chosen"] = out["tune"].threshold_for(target)
    return out


async def verified_precision(vectors: dict[str, np.ndarray], qqp: list[Pair], threshold: float,
                       verifier: Any) -> dict[str, tuple[float, float, int]]:
    """Precision, recall and pairs accepted per half when a pair needs the threshold and ``verifier``'s yes."""
    out: dict[str, tuple[float, float, int]] = {}
    for half in ("tune", "held"):
        rows = [p for p in qqp if half_of(p.a + "\x00" + p.b) == half]
        accepted = hits = 0
        for p in rows:
            similarity = float(np.dot(vectors[p.a], vectors[p.b]))
            if similarity >= threshold and await verifier(p.a, Candidate(p.b, None, similarity)):
                accepted += 1
                hits += p.duplicate
        out[half] = (hits / max(accepted, 1), hits / max(sum(p.duplicate for p in rows), 1), accepted)
    return out


def text_only_bounds(vectors: dict[str, np.ndarray], pairs: list[dict[str, str]]) -> dict[str, float]:
    """What the replay allows a rule that sees only the two texts (their embeddings): see the guide."""
    origins = list(dict.fromkeys(row["origin"] for row in pairs))
    first: dict[str, str] = {}
    for row in pairs:
        first.setdefault(row["origin"], row["similar"])
    o = np.stack([vectors[t] for t in origins])
    q = np.stack([vectors[first[t]] for t in origins])
    o /= np.linalg.norm(o, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    own = np.einsum("ij,ij->i", q, o)
    p10 = float(np.quantile(own, 0.10))
    between = o @ o.T
    earlier = np.array([between[i, :i].max() if i else -1.0 for i in range(len(origins))])
    return {"nearest_origin_right": 100 * float(np.mean((q @ o.T).argmax(axis=1) == np.arange(len(origins)))),
            "paraphrase_p10": p10, "paraphrase_p50": float(np.median(own)),
            "origins_with_earlier_twin_at_p10": 100 * float(np.mean(earlier >= p10))}


def point_at(calibration: Calibration, threshold: float) -> Any:
    return min(calibration.points, key=lambda p: abs(p.threshold - threshold))


async def evaluate(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    model: Any = Concatenated([resolve_embedder(part) for part in spec.split("+")]) if "+" in spec else \
        resolve_embedder(spec)
    mock = json.loads((args.data / "gptcache-mock-pairs.json").read_text(encoding="utf-8"))
    if args.limit is not None:
        mock = mock[:args.limit]
    qqp = load_pairs(args.data / "qqp-dev.jsonl.gz") if args.qqp else []
    if args.qqp_limit is not None:
        random.Random(13).shuffle(qqp)  # a sample of the whole file, the same in every run
        qqp = qqp[:args.qqp_limit]
    texts = sorted({r[k] for r in mock for k in ("origin", "similar")} | {t for p in qqp for t in (p.a, p.b)})
    vectors = await embed_all(model, texts, args.cache_dir)
    embedder = Precomputed(model, vectors)
    options: dict[str, Any] = {} if args.threshold is None else {"threshold": args.threshold}
    if args.margin is not None:
        options["margin"] = args.margin
    if args.verifier is not None:
        options["verifier"] = PairVerifier(args.verifier)
    if args.agreement is not None:
        options["agreement"] = {"max_error": args.agreement, "window": args.agreement_window,
                                "min_rate": args.agreement_min_rate, "seed": args.seed}
    rows = []
    if args.bounds:
        return {"embedder": embedder_name(model), "bounds": text_only_bounds(vectors, mock)}
    for protocol in ("realistic", "pre-loaded"):
        for split in ("all", "tune", "held"):
            pairs = mock if split == "all" else [r for r in mock if half_of(r["origin"]) == split]
            rows.append({"protocol": protocol, "split": split, **await replay(embedder, pairs, protocol, options)})
    report: dict[str, Any] = {"embedder": embedder_name(model), "spec": spec, "replay": rows,
                              "options": {k: str(v) for k, v in options.items() if k != "threshold"},
                              "threshold": args.threshold if args.threshold is not None else
                              getattr(model, "default_threshold", None)}
    if qqp:
        report["qqp"] = qqp_check(vectors, qqp, args.target_precision, embedder_name(model))
        verifier = options.get("verifier", getattr(model, "default_verifier", None) if not options else None)
        if verifier is not None and report["threshold"] is not None:
            report["qqp"]["verified"] = await verified_precision(vectors, qqp, report["threshold"], verifier)
    return report


def cell(value: float | None, unit: str, digits: int = 1) -> str:
    """``value`` with its unit, or a dash when it could not be measured (no pairs, no hits)."""
    return "-" if value is None else f"{value:.{digits}f} {unit}"


def print_report(r: dict[str, Any], target: float) -> None:
    if "bounds" in r:
        b = r["bounds"]
        print(f"\n## {r['embedder']}: what a rule of texts alone can reach on the replay\n")
        print(f"pre-loaded, the nearest origin is the right one for {b['nearest_origin_right']:.1f} % of the "
              f"paraphrases")
        print(f"a paraphrase's similarity to its origin: 10th percentile {b['paraphrase_p10']:.3f}, median "
              f"{b['paraphrase_p50']:.3f}")
        print(f"origins with an earlier, distinct origin at least as similar as that 10th percentile: "
              f"{b['origins_with_earlier_twin_at_p10']:.1f} % (realistic: answered by their twin at a threshold "
              f"that serves 90 % of paraphrases)")
        return
    extra = "".join(f", {k} {v}" for k, v in r["options"].items())
    print(f"\n## {r['embedder']} (threshold {r['threshold']}{extra})\n")
    print("(a) GPTCache replay through @semantic_cached")
    print(render_table(["protocol", "pairs", "true hit", "false hit", "miss", "origins wrong", "semantic hit p50"],
                       [[row["protocol"] + ("" if row["split"] == "all" else f" ({row['split']} half)"),
                         str(row["pairs"]), cell(row["true"], "%"), cell(row["false"], "%"), cell(row["miss"], "%"),
                         cell(row["origins_wrong"], "%") if row["protocol"] == "realistic" else "-",
                         cell(row["hit_p50_us"], "µs", 0)] for row in r["replay"]]))
    qqp = r.get("qqp")
    if qqp is None:
        return
    chosen = qqp["chosen"]
    print(f"\n(b) QQP dev pairs: tune half {len(qqp['tune'])} pairs, held half {len(qqp['held'])} pairs")
    if chosen is None:
        print(f"no threshold keeps precision >= {target:g} on the tune half (with at least 50 pairs accepted)")
    else:
        held = point_at(qqp["held"], chosen.threshold)
        print(f"threshold for precision >= {target:g} on the tune half: {chosen.threshold:.2f} "
              f"(precision {chosen.precision:.3f}, recall {chosen.recall:.3f}); on the held half: precision "
              f"{held.precision if held.precision is not None else float('nan'):.3f}, recall {held.recall:.3f}")
    for half, (precision, recall, accepted) in qqp.get("verified", {}).items():
        print(f"at the operating threshold {r['threshold']:.2f} with the verifier, {half} half: precision "
              f"{precision:.3f}, recall {recall:.3f} ({accepted} pairs accepted)")
    if r["threshold"] is not None:
        for half in ("tune", "held"):
            p = point_at(qqp[half], r["threshold"])
            print(f"at the operating threshold {r['threshold']:.2f}, {half} half: precision "
                  f"{p.precision if p.precision is not None else float('nan'):.3f}, recall {p.recall:.3f} "
                  f"({p.true_positives + p.false_positives} pairs accepted)")


def checked(check: Callable[[Any, str], Any], convert: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then ``check`` it with a `cachelayers.validation` helper.

    A value the helper refuses is a usage error naming the flag (exit 2, no traceback), as text that does not
    convert is.
    """

    def parse(text: str) -> Any:
        try:
            return check(convert(text), "")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{exc.reason}, got {text}") from None

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse's "invalid float value: 'x'"
    return parse


def target_precision(value: float, field: str) -> float:
    """A precision to reach, in (0, 1], as `Calibration.threshold_for` requires."""
    try:
        target = probability(value, field)
    except ConfigError:
        target = 0.0
    if target == 0.0:
        raise ConfigError(field, value, "expected a precision in (0, 1]")
    return target


# The flag of each `AnswerAgreement` argument, for its errors.
AGREEMENT_FLAGS = {"max_error": "--agreement", "window": "--agreement-window", "min_rate": "--agreement-min-rate",
                   "seed": "--seed"}


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as a usage error naming the flag, what the parser alone cannot check; before any work starts."""
    if args.agreement is not None:
        try:
            AnswerAgreement(args.agreement, window=args.agreement_window, min_rate=args.agreement_min_rate,
                            seed=args.seed)
        except ConfigError as exc:
            parser.error(f"argument {AGREEMENT_FLAGS.get(exc.field, exc.field)}: {exc.reason}, got {exc.value}")
    if args.cache_dir is not None:
        if args.cache_dir.exists() and not args.cache_dir.is_dir():
            parser.error(f"argument --cache-dir: {str(args.cache_dir)!r} is not a directory")
        try:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"argument --cache-dir: cannot create {str(args.cache_dir)!r}: {exc.strerror or exc}")
        if not os.access(args.cache_dir, os.W_OK | os.X_OK):
            parser.error(f"argument --cache-dir: {str(args.cache_dir)!r} is not writable")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--embedders", nargs="+", default=["minilm", "default"])
    parser.add_argument("--threshold", type=checked(similarity), default=None, help="override the embedder's default")
    parser.add_argument("--margin", type=checked(similarity), default=None,
                        help="override the embedder's default margin")
    parser.add_argument("--verifier", type=checked(probability), default=None, metavar="P",
                        help="add a PairVerifier accepting at probability >= P")
    parser.add_argument("--agreement", type=float, default=None, metavar="MAX_ERROR",
                        help="add an AnswerAgreement with this max_error")
    parser.add_argument("--agreement-window", type=checked(positive_int, int), default=None)
    parser.add_argument("--agreement-min-rate", type=checked(probability), default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="seed of the agreement's draws")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=checked(positive_int, int), default=None,
                        help="use only the first N replay pairs")
    parser.add_argument("--qqp", action=argparse.BooleanOptionalAction, default=True, help="run (b) too")
    parser.add_argument("--qqp-limit", type=checked(positive_int, int), default=None,
                        help="use a fixed random sample of N QQP pairs")
    parser.add_argument("--target-precision", type=checked(target_precision), default=0.9)
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache embeddings here (.npy)")
    parser.add_argument("--bounds", action="store_true",
                        help="print what a rule of texts alone can reach on the replay, and stop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if not (args.data / "gptcache-mock-pairs.json").exists():
        print(f"no evaluation data in {args.data}", file=sys.stderr)
        return 2
    reports = [anyio.run(evaluate, spec, args) for spec in args.embedders]
    if args.json:
        print(to_json([{k: v for k, v in r.items() if k != "qqp"} for r in reports], digits=None))
        return 0
    for r in reports:
        print_report(r, args.target_precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
