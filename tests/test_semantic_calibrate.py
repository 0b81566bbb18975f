"""Calibration: precision/recall per threshold, the threshold for a target precision, the plot, the command."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayers import cli, semantic_cached
from cachelayers.calibrate import Calibration, Pair, calibrate, load_pairs
from cachelayers.errors import ConfigError
from tests.semantic_helpers import DATA_DIR, AngleEmbedder

pytestmark = pytest.mark.anyio

# (angle between a and b in degrees, duplicate): similarity = cos(angle)
FIXTURE = [(0, True), (5, True), (10, True), (15, False), (20, True), (25, False), (30, True), (45, False),
           (60, False), (80, False)]


def fixture_pairs() -> list[Pair]:
    return [Pair(f"t{i}@0", f"t{i}@{angle}", duplicate) for i, (angle, duplicate) in enumerate(FIXTURE)]


def write_jsonl(path: Path, pairs: list[Pair]) -> Path:
    lines = "".join(json.dumps({"a": p.a, "b": p.b, "duplicate": p.duplicate}) + "\n" for p in pairs)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


async def test_precision_and_recall_per_threshold_on_a_small_fixture() -> None:
    result = await calibrate(fixture_pairs(), AngleEmbedder(), thresholds=[0.5, 0.9, 0.95, 0.99])
    by_threshold = {p.threshold: p for p in result.points}
    # cos: 0°=1, 5°=.996, 10°=.985, 15°=.966, 20°=.940, 25°=.906, 30°=.866, 45°=.707, 60°=.5, 80°=.17
    assert by_threshold[0.99][1:] == (1.0, 2 / 5, 2, 0, 3)
    assert by_threshold[0.95][1:] == (3 / 4, 3 / 5, 3, 1, 2)
    assert by_threshold[0.9][1:] == (4 / 6, 4 / 5, 4, 2, 1)
    assert by_threshold[0.5][1:] == (5 / 9, 1.0, 5, 4, 0)
    assert result.embedder.startswith("angle-")
    assert len(result) == 10


def test_the_threshold_for_a_precision_is_where_precision_stays_above_it() -> None:
    # precision by threshold: 0.6 -> 0.77, 0.7 -> 0.9 (a lucky bump), 0.8 -> 0.8 (a dip), 0.9 -> 0.96, 1.0 -> 1
    sims = np.array([0.65] * 10 + [0.75] * 30 + [0.85] * 5 + [0.95] * 20 + [1.0] * 5)
    labels = np.array([False] * 10 + [True] * 30 + [False] * 5 + [True] * 19 + [False] + [True] * 5)
    result = Calibration(sims, labels, thresholds=[0.6, 0.7, 0.8, 0.9, 1.0])
    precision = {p.threshold: p.precision for p in result.points}
    assert precision == pytest.approx({0.6: 54 / 70, 0.7: 0.9, 0.8: 0.8, 0.9: 0.96, 1.0: 1.0})
    chosen = result.threshold_for(0.9, min_support=1)
    assert chosen is not None
    assert chosen.threshold == 0.9  # not 0.7: precision dips below 0.9 at 0.8
    assert result.threshold_for(0.99, min_support=1) is not None
    assert result.threshold_for(0.99, min_support=1).threshold == 1.0  # type: ignore[union-attr]
    assert result.threshold_for(0.99, min_support=10) is None  # only 5 pairs reach 1.0: too few to trust
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="target_precision"):
            result.threshold_for(bad)


def test_table_marks_the_chosen_threshold_and_unsupported_rows() -> None:
    sims = np.array([0.9, 0.95, 0.99, 1.0])
    labels = np.array([False, True, True, True])
    result = Calibration(sims, labels, thresholds=[0.9, 0.95, 1.0])
    table = result.table(every=0.05, highlight=0.95, min_support=2)
    assert "<-" in table.splitlines()[2]
    assert "too few pairs" in table.splitlines()[-1]


def test_load_pairs_reads_jsonl_and_gzip_and_names_bad_lines(tmp_path: Path) -> None:
    pairs = fixture_pairs()
    assert load_pairs(write_jsonl(tmp_path / "p.jsonl", pairs)) == pairs
    assert load_pairs(write_jsonl(tmp_path / "p.jsonl.gz", pairs), limit=3) == pairs[:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "duplicate": true}\n{"a": "x", "b": 2, "duplicate": true}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_pairs(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        load_pairs(bad)


async def test_calibrating_without_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="no labelled pairs"):
        await calibrate([])


async def test_the_plot_is_a_png(tmp_path: Path) -> None:
    result = await calibrate(fixture_pairs(), AngleEmbedder())
    path = result.plot(tmp_path / "curve.png", target_precision=0.75)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_the_calibrate_command_prints_the_table_and_threshold_and_writes_the_plot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = DATA_DIR / "qqp-dev.jsonl.gz"
    pairs_file = source if source.exists() else write_jsonl(tmp_path / "p.jsonl", fixture_pairs())
    # The 10-pair fixture (used where ../shared/data is absent) is too small for a support floor of 5.
    min_support = "5" if source.exists() else "1"
    plot = tmp_path / "out.png"
    code = cli.main(["calibrate", str(pairs_file), "--limit", "400", "--target-precision", "0.6",
                     "--embedder", "default", "--plot", str(plot), "--min-support", min_support])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "threshold for precision >= 0.6:" in out
    assert "precision" in out.splitlines()[1]
    assert "recall" in out.splitlines()[1]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_the_calibrate_command_reports_an_unreachable_precision_and_bad_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs_file = write_jsonl(tmp_path / "p.jsonl", [Pair("a b c", "a b c", False)] * 60)
    assert cli.main(["calibrate", str(pairs_file), "--target-precision", "0.9"]) == 1
    assert "no threshold reaches precision 0.9" in capsys.readouterr().out
    assert cli.main(["calibrate", str(tmp_path / "missing.jsonl")]) == 2
    assert "error" in capsys.readouterr().out


# -- replay: the false hits a pre-loaded cache would serve per threshold ------------------------------------


REPLAY = [("a@0", "a@5"), ("a@40", "a@15"), ("b@0", "b@30"), ("c@0", "c@1")]
# a@5: own origin at cos 5 = 0.996 (a@40 at cos 35 = 0.819); a@15: a@0 (cos 15 = 0.966) is nearer than its own
# a@40 (cos 25 = 0.906), by 0.0597; b@30: own origin at cos 30 = 0.866; c@1: own at 0.9998


async def test_replay_rates_count_true_and_false_hits_and_misses_per_threshold() -> None:
    from cachelayers.calibrate import replay_rates

    points = {p.threshold: p for p in await replay_rates(REPLAY, AngleEmbedder(), thresholds=[0.8, 0.9, 0.97])}
    assert points[0.8][1:] == pytest.approx((0.75, 0.25, 0.0))
    assert points[0.9][1:] == pytest.approx((0.5, 0.25, 0.25))
    assert points[0.97][1:] == pytest.approx((0.5, 0.0, 0.5))
    with_margin = {p.threshold: p for p in await replay_rates(REPLAY, AngleEmbedder(), thresholds=[0.8],
                                                               margin=0.06)}
    assert with_margin[0.8][1:] == pytest.approx((0.75, 0.0, 0.25))  # the ambiguous a@15 is not served


async def test_replay_rates_apply_the_verifier_as_the_decorator_does() -> None:
    """Best first, the first candidate the verifier accepts answers if it reaches the threshold: rejecting
    a@0 for a@15 lets its own origin a@40 (0.906) answer it, at 0.8 and 0.9 but not at 0.97."""
    from cachelayers.calibrate import replay_rates
    from cachelayers.engines.semantic.lookups import Candidate

    seen: list[tuple[str, Candidate]] = []

    async def verifier(text: str, candidate: Candidate) -> bool:
        seen.append((text, candidate))
        return not (text == "a@15" and candidate.text == "a@0")

    points = {p.threshold: p for p in await replay_rates(REPLAY, AngleEmbedder(), thresholds=[0.8, 0.9, 0.97],
                                                          verifier=verifier)}
    assert points[0.8][1:] == pytest.approx((1.0, 0.0, 0.0))
    assert points[0.9][1:] == pytest.approx((0.75, 0.0, 0.25))
    assert points[0.97][1:] == pytest.approx((0.5, 0.0, 0.5))
    asked = [(text, c.text, c.value) for text, c in seen]
    assert asked == [("a@5", "a@0", "a@0"), ("a@15", "a@0", "a@0"), ("a@15", "a@40", "a@40"),
                     ("b@30", "b@0", "b@0"), ("c@1", "c@0", "c@0")]
    assert seen[2][1].similarity == pytest.approx(np.cos(np.radians(25)))
    # With the margin, a@15 is ambiguous: no candidate is offered to the verifier, nothing answers it.
    seen.clear()
    with_margin = await replay_rates(REPLAY, AngleEmbedder(), thresholds=[0.8], margin=0.06, verifier=verifier)
    assert with_margin[0][1:] == pytest.approx((0.75, 0.0, 0.25))
    assert "a@15" not in [text for text, _ in seen]


def test_the_calibrate_command_replays_with_the_embedders_default_verifier(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``calibrate --replay`` answers as ``@semantic_cached(embed=...)`` does: with the embedder's
    ``default_verifier``, unless ``--no-verifier``."""
    import cachelayers.calibrate as calibrate_module
    from cachelayers.embedders import PairVerifier

    class Verified(AngleEmbedder):
        default_margin = 0.0
        default_verifier = PairVerifier(1.0)  # accepts nothing: every answer is a miss

    monkeypatch.setattr(calibrate_module, "resolve_embedder", lambda name: Verified())
    replay = tmp_path / "mock.json"
    replay.write_text(json.dumps([{"origin": "a@0", "similar": "a@5"}, {"origin": "b@0", "similar": "b@1"}]))
    assert cli.main(["calibrate", "--replay", str(replay), "--every", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "verifier PairVerifier(min_probability=1.0)" in out
    assert "     0.50      0.0%       0.0%  100.0%\n" in out
    assert cli.main(["calibrate", "--replay", str(replay), "--every", "0.5", "--no-verifier"]) == 0
    out = capsys.readouterr().out
    assert "verifier None" in out
    assert "     0.50    100.0%       0.0%    0.0%\n" in out


async def test_replay_rates_reject_bad_margins_and_empty_pairs() -> None:
    from cachelayers.calibrate import replay_rates

    with pytest.raises(ConfigError, match="margin"):
        await replay_rates(REPLAY, AngleEmbedder(), margin=1.5)
    with pytest.raises(ValueError, match="no replay pairs"):
        await replay_rates([], AngleEmbedder())


def test_the_calibrate_command_prints_replay_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replay = tmp_path / "mock.json"
    replay.write_text(json.dumps([{"origin": "How do I reset my password?", "similar": "how do i reset my password"},
                                  {"origin": "Where is the invoice?", "similar": "Which colour is the sky?"}]))
    assert cli.main(["calibrate", "--replay", str(replay), "--every", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "2 replay pairs, 2 origins pre-loaded" in out
    assert "true hit" in out
    assert "false hit" in out
    assert "     1.00     50.0%       0.0%   50.0%\n" in out  # one true hit, one miss, no false hit
    assert "<- default" in out  # the built-in embedder's 0.98


@pytest.mark.parametrize(("arguments", "message"), [
    ([], "give labelled PAIRS, --replay REPLAY.json, or both"),
    (["--replay", "{replay}", "--margin", "2"], "--margin must be in [0, 1], got 2"),
    (["--replay", "{replay}", "--target-precision", "0"], "--target-precision must be in (0, 1], got 0"),
    (["--replay", "{replay}", "--limit", "0"], "--limit must be a positive number of pairs, got 0"),
    (["--replay", "{replay}", "--every", "0"], "--every must be in (0, 1], got 0"),
    (["--replay", "{replay}", "--plot", "x.png"], "--plot draws the labelled pairs' curve: give PAIRS too"),
    (["--replay", "{bad}"], "[1]: expected {\"origin\": str, \"similar\": str}"),
    (["--replay", "{missing}"], "No such file"),
    (["{pairs}", "--plot", "{nowhere}"], "is in a directory that does not exist"),
    (["{pairs}", "--plot", "{here}"], "is a directory"),
    (["{pairs}", "--plot", "{curve}"], "ending in .png, .svg, .pdf"),  # matplotlib wrote curve.png, not curve
    (["{pairs}", "--plot", "{text}"], "ending in .png, .svg, .pdf"),  # a traceback of matplotlib's ValueError
])
def test_the_calibrate_command_names_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   arguments: list[str], message: str) -> None:
    replay = tmp_path / "mock.json"
    replay.write_text(json.dumps([{"origin": "a", "similar": "b"}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"origin": "a", "similar": "b"}, {"origin": "a"}]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"a": "x", "b": "y", "duplicate": True}) + "\n")
    paths = {"replay": str(replay), "bad": str(bad), "missing": str(tmp_path / "missing.json"), "pairs": str(pairs),
             "nowhere": str(tmp_path / "no" / "such" / "dir" / "curve.png"), "here": str(tmp_path),
             "curve": str(tmp_path / "curve"), "text": str(tmp_path / "curve.txt")}
    assert cli.main(["calibrate", *[a.format(**paths) for a in arguments]]) == 2
    out = capsys.readouterr().out
    assert "cachelayers calibrate: error:" in out
    assert message in out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 40), st.booleans()), min_size=2, max_size=8,
                unique_by=lambda t: (t[0], t[1])),
       st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 40)), min_size=1, max_size=6),
       st.sampled_from([0.0, 0.03, 0.1]))
def test_replay_rates_answer_as_the_prefilled_decorator_does(origins: list[tuple[str, int, bool]],
                                                             asked: list[tuple[str, int]], margin: float) -> None:
    """Each paraphrase, asked of a fresh decorated function pre-loaded with the replay's origins (some written
    twice, the copy with a trailing space: the same words), is answered by the origin the replay counts."""
    from cachelayers.calibrate import replay_rates

    stored = [f"{t}@{a}" for t, a, _ in origins] + [f"{t}@{a} " for t, a, twice in origins if twice]
    pairs = [(stored[i % len(stored)], f"{topic}@{angle}.5") for i, (topic, angle) in enumerate(asked)]
    pairs += [(text, f"{text.strip()}.25") for text in stored[len(pairs):]]  # every stored text is an origin

    async def run() -> None:
        embedder = AngleEmbedder()
        true_hits = false_hits = 0  # an origin and its copy tie exactly: either may answer, so count the copy's
        for origin, similar in pairs:
            @semantic_cached(embed=embedder, threshold=0.9, margin=margin, cache_embeddings=False)
            async def ask(question: str) -> str:
                return "computed"

            await ask.prefill([(o, o) for o in stored])
            answer = await ask(similar)
            true_hits += answer != "computed" and answer.strip() == origin.strip()
            false_hits += answer != "computed" and answer.strip() != origin.strip()
        point = (await replay_rates(pairs, embedder, thresholds=[0.9], margin=margin))[0]
        assert point.true_hit + point.false_hit == pytest.approx((true_hits + false_hits) / len(pairs))
        if all(not twice for *_, twice in origins):  # no ties: the same origins answer
            assert (point.true_hit, point.false_hit) == pytest.approx((true_hits / len(pairs),
                                                                       false_hits / len(pairs)))

    anyio.run(run)


@pytest.mark.parametrize("mode", ["pairs", "replay"])
def test_an_embedder_that_cannot_load_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              mode: str) -> None:
    """Without sentence-transformers it is the missing package, with it the model that is not there: either
    way one line naming the problem, not a traceback."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"a": "x", "b": "y", "duplicate": True}) + "\n")
    replay = tmp_path / "mock.json"
    replay.write_text(json.dumps([{"origin": "a", "similar": "b"}]))
    where = [str(pairs)] if mode == "pairs" else ["--replay", str(replay)]
    assert cli.main(["calibrate", *where, "--embedder", "st:/nonexistent"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("cachelayers calibrate: error:")
    assert "sentence-transformers" in out[0] or "st:/nonexistent failed" in out[0]
