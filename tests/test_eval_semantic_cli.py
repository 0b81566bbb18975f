"""``benchmarks/eval_semantic.py`` on the command line: a bad flag is a one-line usage error naming it (exit 2,
no traceback, nothing run), and a tiny replay runs through with dashes where nothing could be measured.

Each run is a subprocess on a replay of a few pairs written to the test's directory, with the built-in hashing
embedder (``--embedders default``): no model is loaded, no QQP data is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_semantic.py"

# Origins in both halves of the script's split; paraphrases sharing no word with them, so nothing is a hit.
PAIRS = [{"origin": f"How do I configure option {c} of the widget?", "similar": f"unrelated words number {i}"}
         for i, c in enumerate("abcdefgh")]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A directory holding a tiny ``gptcache-mock-pairs.json``."""
    (tmp_path / "gptcache-mock-pairs.json").write_text(json.dumps(PAIRS), encoding="utf-8")
    return tmp_path


def run(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--embedders", "default", "--no-qqp", "--data", str(data),
                           *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)


@pytest.mark.parametrize(("flag", "value", "extra"), [
    pytest.param(flag, value, extra, id=f"{flag}={value}") for flag, value, extra in [
        ("--threshold", "2", ()),
        ("--margin", "-1", ()),
        ("--verifier", "5", ()),
        ("--agreement", "0", ()),
        ("--agreement-window", "3", ("--agreement", "0.02")),  # too short for that max_error
        ("--target-precision", "3", ()),  # checked even without --qqp, before the replay
        ("--limit", "0", ()),
        ("--limit", "-5", ()),
        ("--qqp-limit", "0", ()),
    ]
])
def test_bad_flag_is_a_usage_error_naming_it(data: Path, flag: str, value: str, extra: tuple[str, ...]) -> None:
    done = run(data, *extra, flag, value)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # refused before any work
    assert done.stderr.splitlines()[-1].startswith(f"eval_semantic.py: error: argument {flag}: ")


def test_unwritable_cache_dir_is_a_usage_error(data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    for where in (blocker / "vectors", blocker):  # under a file; a file
        done = run(data, "--cache-dir", str(where))
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""
        assert done.stderr.splitlines()[-1].startswith("eval_semantic.py: error: argument --cache-dir: ")


def test_limit_leaving_a_half_empty_prints_dashes(data: Path) -> None:
    done = run(data, "--limit", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("realistic", "pre-loaded"))]
    assert len(rows) == 6
    empty = [row for row in rows if next(cell for cell in row if cell.isdigit()) == "0"]
    assert len(empty) == 2  # one half per protocol has no pair: its cells are dashes
    for row in empty:
        assert row[-5:] == ["-"] * 5


def test_no_semantic_hit_prints_a_dash_for_the_latency(data: Path) -> None:
    done = run(data)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("realistic", "pre-loaded"))]
    assert len(rows) == 6
    assert "nan" not in done.stdout
    assert all(row.endswith(" -") for row in rows)
