"""Choosing a similarity threshold from labelled pairs, instead of guessing one.

A semantic cache serves a stored answer when the similarity of two texts is at least the threshold, so each
labelled pair ``(a, b, duplicate)`` is one trial: a *false positive* (a non-duplicate pair at or above the
threshold) is a wrong answer served from cache; a *false negative* is a missed saving. `calibrate` embeds
the pairs, measures precision and recall at every threshold of a grid, and `Calibration.threshold_for`
picks the threshold for a target precision by a rule fixed in advance:

    the lowest threshold of the grid from which precision stays at or above the target: every threshold
    at or above it that accepts at least ``min_support`` pairs (50 by default) has precision >= target.

"Stays" matters: precision is not monotonic in the threshold, and the lowest threshold that touches the
target once can sit in a dip. Thresholds accepting fewer than ``min_support`` pairs are ignored: a
precision measured on a handful of pairs (often near-identical texts with a noisy label) says nothing.
The command ``cachelayers calibrate PAIRS.jsonl[.gz] --target-precision P``
prints the table, the chosen threshold and writes a plot; with ``--replay REPLAY.json`` (GPTCache's
``{origin, similar}`` pairs) it also prints the true and false hits a cache pre-loaded with the origins would
serve at each threshold (`replay_rates`).

Pairs are JSON lines ``{"a": str, "b": str, "duplicate": bool}`` (the format of the QQP pairs), optionally
gzip-compressed.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import anyio
import numpy as np

from cachelayers.embedders import embed, embedder_name, resolve_embedder
from cachelayers.engines.semantic.lookups import Candidate, Verifier, ambiguous
from cachelayers.engines.semantic.options import DEFAULT_MAX_CANDIDATES
from cachelayers.errors import ConfigError, EmbeddingError, MissingDependencyError
from cachelayers.validation import similarity as check_similarity

__all__ = ["Calibration", "Pair", "ReplayPoint", "ThresholdPoint", "add_calibrate_arguments", "calibrate",
           "check_calibrate_arguments", "load_pairs", "load_replay", "main", "replay_rates", "replay_table",
           "run_calibrate"]

DEFAULT_GRID = tuple(round(0.5 + i * 0.01, 2) for i in range(51))
"""Thresholds 0.50, 0.51, ..., 1.00."""


class Pair(NamedTuple):
    """Two texts and whether a person judged them to ask the same thing."""

    a: str
    b: str
    duplicate: bool


class ThresholdPoint(NamedTuple):
    """Precision and recall of "similarity >= threshold" on the labelled pairs."""

    threshold: float
    precision: float | None  # None when no pair reaches the threshold
    recall: float
    true_positives: int
    false_positives: int
    false_negatives: int


def load_pairs(path: str | Path, *, limit: int | None = None) -> list[Pair]:
    """Read labelled pairs from a ``.jsonl`` or ``.jsonl.gz`` file.

    Raises:
        OSError: The file cannot be read.
        ValueError: A line is not a JSON object with string ``a``, string ``b`` and boolean ``duplicate``;
            the message gives the line number.
    """
    target = Path(path)
    opener: Callable[..., Any] = gzip.open if target.suffix == ".gz" else open
    pairs: list[Pair] = []
    with opener(target, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{target}:{number}: not JSON: {exc}") from None
            if (not isinstance(row, dict) or not isinstance(row.get("a"), str) or not isinstance(row.get("b"), str)
                    or not isinstance(row.get("duplicate"), bool)):
                raise ValueError(f'{target}:{number}: expected {{"a": str, "b": str, "duplicate": bool}}')
            pairs.append(Pair(row["a"], row["b"], row["duplicate"]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


class Calibration:
    """Similarities of labelled pairs and the precision/recall curve they give.

    Attributes:
        similarities: Cosine similarity of each pair.
        labels: Whether each pair is a duplicate.
        points: One `ThresholdPoint` per threshold of the grid, ascending.
        embedder: Name of the embedder that produced the similarities.
    """

    def __init__(self, similarities: np.ndarray, labels: np.ndarray, *, thresholds: Sequence[float] = DEFAULT_GRID,
                 embedder: str = "") -> None:
        self.similarities = np.asarray(similarities, dtype=np.float64)
        self.labels = np.asarray(labels, dtype=bool)
        if self.similarities.shape != self.labels.shape or self.similarities.ndim != 1:
            raise ValueError("similarities and labels must be 1-D arrays of the same length")
        grid = sorted({float(t) for t in thresholds})
        if not grid or any(not 0.0 <= t <= 1.0 for t in grid):
            raise ConfigError("thresholds", thresholds, "expected thresholds in [0, 1]")
        self.embedder = embedder
        positives = int(self.labels.sum())
        self.points: list[ThresholdPoint] = []
        for t in grid:
            accepted = self.similarities >= t - 1e-9
            tp = int((accepted & self.labels).sum())
            fp = int((accepted & ~self.labels).sum())
            fn = positives - tp
            precision = tp / (tp + fp) if tp + fp else None
            recall = tp / positives if positives else 0.0
            self.points.append(ThresholdPoint(t, precision, recall, tp, fp, fn))

    def __len__(self) -> int:
        return len(self.labels)

    def threshold_for(self, precision: float, *, min_support: int = 50) -> ThresholdPoint | None:
        """The lowest grid threshold from which precision stays at or above ``precision``.

        Thresholds that accept fewer than ``min_support`` pairs are skipped (their precision is noise).
        ``None`` when even the highest supported threshold misses the target.

        Raises:
            ConfigError: ``precision`` is outside (0, 1].
        """
        if isinstance(precision, bool) or not isinstance(precision, int | float) or not 0 < precision <= 1:
            raise ConfigError("target_precision", precision, "expected a number in (0, 1]")
        chosen: ThresholdPoint | None = None
        for point in reversed(self.points):
            if point.precision is None or point.true_positives + point.false_positives < min_support:
                continue
            if point.precision + 1e-12 < precision:
                break
            chosen = point
        return chosen

    def table(self, *, every: float = 0.05, highlight: float | None = None, min_support: int = 50) -> str:
        """The curve as a text table, one row per ``every`` of threshold (plus ``highlight``).

        Rows accepting fewer than ``min_support`` pairs are marked ``*`` (ignored when choosing).
        """
        lines = [f"{'threshold':>9}  {'precision':>9}  {'recall':>6}  {'TP':>6}  {'FP':>6}  {'FN':>6}"]
        for point in self.points:
            on_grid = math.isclose((point.threshold / every) % 1, 0, abs_tol=1e-6) or math.isclose(
                (point.threshold / every) % 1, 1, abs_tol=1e-6)
            if not on_grid and (highlight is None or not math.isclose(point.threshold, highlight)):
                continue
            precision = "-" if point.precision is None else f"{point.precision:.3f}"
            mark = "  <-" if highlight is not None and math.isclose(point.threshold, highlight) else ""
            if point.true_positives + point.false_positives < min_support:
                mark += "  * too few pairs"
            lines.append(f"{point.threshold:>9.2f}  {precision:>9}  {point.recall:>6.3f}  {point.true_positives:>6}"
                         f"  {point.false_positives:>6}  {point.false_negatives:>6}{mark}")
        return "\n".join(lines)

    def plot(self, path: str | Path, *, target_precision: float | None = None, title: str | None = None,
             min_support: int = 50) -> Path:
        """Write a PNG of precision and recall against the threshold.

        Precision is drawn only where at least ``min_support`` pairs reach the threshold.

        Raises:
            MissingDependencyError: matplotlib is not installed (extra ``plot``).
        """
        try:
            import matplotlib
        except ImportError:
            raise MissingDependencyError("plot", str(path), "matplotlib", "plot") from None
        matplotlib.use("Agg", force=True)
        from matplotlib import pyplot as plt

        xs = [p.threshold for p in self.points]
        precision = [p.precision if p.precision is not None and p.true_positives + p.false_positives >= min_support
                     else float("nan") for p in self.points]
        recall = [p.recall for p in self.points]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ax.plot(xs, precision, label="precision (1 - share of served answers that are wrong)", color="#1f77b4")
        ax.plot(xs, recall, label="recall (share of duplicates answered from cache)", color="#ff7f0e")
        if target_precision is not None:
            ax.axhline(target_precision, color="#888888", linestyle=":", linewidth=1)
            chosen = self.threshold_for(target_precision, min_support=min_support)
            if chosen is not None:
                ax.axvline(chosen.threshold, color="#2ca02c", linestyle="--", linewidth=1,
                           label=f"threshold {chosen.threshold:.2f}: precision {chosen.precision:.2f}, "
                                 f"recall {chosen.recall:.2f}")
        ax.set_xlabel("similarity threshold")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(min(xs), max(xs))
        ax.grid(alpha=0.3)
        ax.set_title(title or f"{self.embedder}: {len(self)} labelled pairs", fontsize=10)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        target = Path(path)
        fig.savefig(target)
        plt.close(fig)
        return target


async def calibrate(pairs: Iterable[Pair | tuple[str, str, bool]], embedder: Callable[[list[str]], Any] | None = None,
                    *, thresholds: Sequence[float] = DEFAULT_GRID, batch_size: int = 256) -> Calibration:
    """Embed labelled pairs and measure precision and recall per threshold.

    Args:
        pairs: ``(a, b, duplicate)`` triples, e.g. from `load_pairs`.
        embedder: The embedder to calibrate (sync or async); the built-in `HashingEmbedder` when omitted.
        thresholds: The grid of thresholds, in [0, 1].
        batch_size: Texts per embedder call.

    Returns:
        A `Calibration`; ask it ``threshold_for(0.9)``, ``table()`` or ``plot(path)``.

    Raises:
        EmbeddingError: The embedder failed or returned malformed vectors.
        ValueError: There are no pairs.
    """
    model = resolve_embedder(embedder)
    rows = [Pair(*p) for p in pairs]
    if not rows:
        raise ValueError("no labelled pairs to calibrate on")
    texts = sorted({t for p in rows for t in (p.a, p.b)})
    position = {t: i for i, t in enumerate(texts)}
    chunks = [await embed(model, texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    vectors = np.concatenate(chunks)
    a = vectors[[position[p.a] for p in rows]]
    b = vectors[[position[p.b] for p in rows]]
    similarities = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    return Calibration(similarities, np.array([p.duplicate for p in rows]), thresholds=thresholds,
                       embedder=embedder_name(model))


# -- replay: the false hits a cache would serve --------------------------------------------------------------


class ReplayPoint(NamedTuple):
    """What a pre-loaded cache answers at one threshold: shares of true hits, false hits and misses."""

    threshold: float
    true_hit: float
    false_hit: float
    miss: float


def load_replay(path: str | Path) -> list[tuple[str, str]]:
    """Read replay pairs: a JSON list of ``{"origin": str, "similar": str}`` (GPTCache's ``mock_data.json``).

    Raises:
        OSError: The file cannot be read.
        ValueError: It is not such a list; the message gives the index of the first bad item.
    """
    target = Path(path)
    try:
        rows = json.loads(target.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{target}: not JSON: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f'{target}: expected a non-empty JSON list of {{"origin": str, "similar": str}}')
    out = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("origin"), str) or not isinstance(
                row.get("similar"), str):
            raise ValueError(f'{target}[{number}]: expected {{"origin": str, "similar": str}}')
        out.append((row["origin"], row["similar"]))
    return out


async def replay_rates(pairs: Sequence[tuple[str, str]], embedder: Callable[[list[str]], Any] | None = None, *,
                       thresholds: Sequence[float] = DEFAULT_GRID, margin: float = 0.0,
                       verifier: Verifier | None = None, max_candidates: int = DEFAULT_MAX_CANDIDATES,
                       batch_size: int = 256) -> list[ReplayPoint]:
    """The answers a cache pre-loaded with every ``origin`` gives to every ``similar``, per threshold.

    As `semantic_cached` answers: the ``max_candidates`` nearest origins (exact cosine similarity), none when
    the nearest exceeds the second nearest by less than ``margin`` (a runner-up with the nearest's words,
    `cachelayers.embedders.same_words`, is passed over for the next); then, best first, the first one the
    ``verifier`` accepts (every one without a verifier) answers when its similarity is at least the threshold.
    The verifier is given ``Candidate(origin, origin, similarity)``: the origin stands for its answer. An answer
    is a *true hit* when it comes from the similar's own origin, a *false hit* (a wrong answer served)
    otherwise, else a *miss*. This is GPTCache's pre-loaded protocol; ``benchmarks/eval_semantic.py`` also
    replays the realistic one (origins asked first, through the decorator).

    Raises:
        ConfigError: ``margin`` or a threshold is outside [0, 1].
        EmbeddingError: The embedder failed.
        ValueError: There are no pairs.
    """
    margin = check_similarity(margin, "margin")
    grid = sorted({check_similarity(t, "thresholds") for t in thresholds})
    if not pairs:
        raise ValueError("no replay pairs")
    model = resolve_embedder(embedder)
    origins = sorted({origin for origin, _ in pairs})
    texts = sorted(set(origins) | {similar for _, similar in pairs})
    chunks = [await embed(model, texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    position = {t: i for i, t in enumerate(texts)}
    vectors = np.concatenate(chunks).astype(np.float64)
    stored = vectors[[position[o] for o in origins]]
    asked = vectors[[position[s] for _, s in pairs]]
    sims = asked @ stored.T
    order = np.argsort(-sims, axis=1)[:, :max(2, max_candidates)]
    rows = np.arange(len(pairs))
    runner_up = sims[rows, order[:, 1]] if len(origins) > 1 else np.full(len(pairs), -1.0)
    clear = sims[rows, order[:, 0]] - runner_up >= margin - 1e-9
    for row in np.flatnonzero(~clear).tolist():  # the engine's rule (same-words runner-ups passed over)
        best = order[row, 0]
        clear[row] = not ambiguous(origins[best], float(sims[row, best]),
                                   ((origins[j], float(sims[row, j])) for j in order[row, 1:max_candidates]),
                                   margin - 1e-9)
    chosen = order[:, 0].copy()  # the candidate that answers, if its similarity reaches the threshold
    if verifier is not None:
        for i, (_, similar) in enumerate(pairs):
            chosen[i] = -1
            for j in order[i, :max_candidates] if clear[i] else ():
                candidate = Candidate(origins[j], origins[j], float(sims[i, j]))
                verdict = verifier(similar, candidate)
                if await verdict if inspect.isawaitable(verdict) else verdict:
                    chosen[i] = j
                    break
    answered = chosen >= 0
    best = np.where(answered, sims[rows, np.maximum(chosen, 0)], -np.inf)
    own = np.array([chosen[i] >= 0 and origins[chosen[i]] == origin for i, (origin, _) in enumerate(pairs)])
    out = []
    for t in grid:
        served = (best >= t - 1e-9) & clear
        true_hit = float((served & own).mean())
        false_hit = float((served & ~own).mean())
        out.append(ReplayPoint(t, true_hit, false_hit, 1.0 - true_hit - false_hit))
    return out


def replay_table(points: Sequence[ReplayPoint], *, every: float = 0.05, highlight: float | None = None) -> str:
    """The replay rates as a text table, one row per ``every`` of threshold (plus ``highlight``)."""
    lines = [f"{'threshold':>9}  {'true hit':>8}  {'false hit':>9}  {'miss':>6}"]
    for point in points:
        step = (point.threshold / every) % 1
        marked = highlight is not None and math.isclose(point.threshold, highlight)
        if not (math.isclose(step, 0, abs_tol=1e-6) or math.isclose(step, 1, abs_tol=1e-6) or marked):
            continue
        lines.append(f"{point.threshold:>9.2f}  {point.true_hit:>8.1%}  {point.false_hit:>9.1%}  {point.miss:>6.1%}"
                     + ("  <- default" if marked else ""))
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------------------


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``cachelayers calibrate`` to ``parser``."""
    parser.add_argument("pairs", type=Path, nargs="?", default=None,
                        help="labelled pairs, JSON lines {a, b, duplicate} (.jsonl or .jsonl.gz)")
    parser.add_argument("--replay", type=Path, default=None,
                        help="replay pairs, a JSON list of {origin, similar} (GPTCache's mock_data.json): print the "
                             "true/false hit rates a cache pre-loaded with the origins would give at each threshold")
    parser.add_argument("--margin", type=float, default=None,
                        help="ambiguity margin for --replay (the embedder's default_margin when omitted)")
    parser.add_argument("--no-verifier", action="store_true",
                        help="replay without the embedder's default_verifier (used by default, as the decorator does)")
    parser.add_argument("--target-precision", type=float, default=0.9,
                        help="precision to reach: 1 - the share of cache answers that may be wrong (default 0.9)")
    parser.add_argument("--embedder", default="default",
                        help="'default' (built-in hashing), 'minilm', 'model2vec:PATH' or 'st:NAME_OR_PATH'")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a plot of precision and recall here (.png, .svg or .pdf, by the extension)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    parser.add_argument("--every", type=float, default=0.05, help="print one row per this step of threshold")
    parser.add_argument("--min-support", type=int, default=50,
                        help="ignore thresholds accepting fewer pairs than this (their precision is noise)")


_PLOT_FORMATS: Final = (".png", ".svg", ".pdf")


def check_calibrate_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with parsed ``cachelayers calibrate`` arguments, as a message, or ``None``."""
    if args.pairs is None and args.replay is None:
        return "give labelled PAIRS, --replay REPLAY.json, or both"
    if args.plot is not None and args.pairs is None:
        return "--plot draws the labelled pairs' curve: give PAIRS too"
    if args.plot is not None and (Path(args.plot).is_dir() or not Path(args.plot).resolve().parent.is_dir()):
        where = "is a directory" if Path(args.plot).is_dir() else "is in a directory that does not exist"
        return f"--plot {str(args.plot)!r} {where}: give the path of a PNG file to write"
    if args.plot is not None and Path(args.plot).suffix.lower() not in _PLOT_FORMATS:
        return (f"--plot {str(args.plot)!r}: give a file name ending in {', '.join(_PLOT_FORMATS)} (the name's "
                "extension is the image's format)")
    if not 0 < args.target_precision <= 1:
        return f"--target-precision must be in (0, 1], got {args.target_precision:g}"
    if args.margin is not None and not 0 <= args.margin <= 1:
        return f"--margin must be in [0, 1], got {args.margin:g}"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be a positive number of pairs, got {args.limit}"
    if not 0 < args.every <= 1:
        return f"--every must be in (0, 1], got {args.every:g}"
    if args.min_support < 1:
        return f"--min-support must be at least 1, got {args.min_support}"
    return None


def run_calibrate(args: argparse.Namespace) -> int:
    """Run ``cachelayers calibrate`` with parsed ``args``; return the exit status."""
    problem = check_calibrate_arguments(args)
    if problem is not None:
        print(f"cachelayers calibrate: error: {problem}")
        return 2
    try:
        model = resolve_embedder(args.embedder)
        pairs = load_pairs(args.pairs, limit=args.limit) if args.pairs is not None else None
        replay = load_replay(args.replay) if args.replay is not None else None
        if replay is not None and args.limit is not None:
            replay = replay[:args.limit]
    except (OSError, ValueError, MissingDependencyError, ConfigError) as exc:
        print(f"cachelayers calibrate: error: {exc}")
        return 2
    status = 0
    if replay is not None:
        status = _print_replay(replay, model, args)
    if pairs is not None:
        status = max(status, _print_pairs(pairs, model, args))
    return status


def _print_replay(replay: list[tuple[str, str]], model: Callable[[list[str]], Any], args: argparse.Namespace) -> int:
    margin = args.margin if args.margin is not None else (getattr(model, "default_margin", None) or 0.0)
    default = getattr(model, "default_threshold", None)
    verifier = None if args.no_verifier else getattr(model, "default_verifier", None)
    try:
        points = anyio.run(lambda: replay_rates(replay, model, margin=margin, verifier=verifier))
    except (ValueError, ConfigError, EmbeddingError) as exc:
        print(f"cachelayers calibrate: error: {exc}")
        return 2
    print(f"{len(replay)} replay pairs, {len({o for o, _ in replay})} origins pre-loaded, embedder "
          f"{embedder_name(model)}, margin {margin:g}, verifier {verifier!r}: answers to the paraphrases per "
          "threshold")
    print(replay_table(points, every=args.every, highlight=default))
    return 0


def _print_pairs(pairs: list[Pair], model: Callable[[list[str]], Any], args: argparse.Namespace) -> int:
    try:
        result = anyio.run(lambda: calibrate(pairs, model))
    except (ValueError, ConfigError, EmbeddingError) as exc:
        print(f"cachelayers calibrate: error: {exc}")
        return 2
    chosen = result.threshold_for(args.target_precision, min_support=args.min_support)
    positives = int(result.labels.sum())
    print(f"{len(result)} pairs ({positives} duplicates), embedder {result.embedder}")
    print(result.table(every=args.every, highlight=chosen.threshold if chosen else None,
                       min_support=args.min_support))
    if chosen is None:
        print(f"no threshold reaches precision {args.target_precision:g} on these pairs")
    else:
        print(f"threshold for precision >= {args.target_precision:g}: {chosen.threshold:.2f} "
              f"(precision {chosen.precision:.3f}, recall {chosen.recall:.3f})")
    if args.plot is not None:
        try:
            written = result.plot(args.plot, target_precision=args.target_precision, min_support=args.min_support)
        except MissingDependencyError as exc:
            print(f"cachelayers calibrate: error: {exc}")
            return 2
        except OSError as exc:
            print(f"cachelayers calibrate: error: --plot {str(args.plot)!r}: cannot write it: {exc.strerror or exc}")
            return 2
        print(f"plot written to {written}")
    return 0 if chosen is not None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cachelayers.calibrate`` (the same as ``cachelayers calibrate``)."""
    parser = argparse.ArgumentParser(prog="cachelayers calibrate", description=__doc__.split("\n\n")[0])
    add_calibrate_arguments(parser)
    return run_calibrate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
