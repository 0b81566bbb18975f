"""Bar charts of a benchmark's JSON output: ns per call of every contender, one panel per scenario.

Works on the output of ``bench_memory.py --json`` and ``bench_redis.py --json`` (results by contender, each
scenario with ``median_ns`` and ``best_ns``). The docs' benchmark page shows charts made this way::

    python benchmarks/bench_memory.py --json > memory.json
    python benchmarks/plot.py memory.json docs/img/bench-memory.png

Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCENARIOS = ("hit", "miss", "batched", "concurrent")


def plot(document: dict[str, Any], out: Path) -> None:
    """Draw one horizontal bar panel per scenario (log scale: peers differ by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, Any] = document["results"]
    scenarios = [s for s in SCENARIOS if any(s in r for r in results.values())]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 0.45 * len(results) + 1.6),
                             squeeze=False, sharey=True)
    names = list(results)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        medians = [results[n][scenario]["median_ns"] if scenario in results[n] else 0.0 for n in names]
        bests = [results[n][scenario]["best_ns"] if scenario in results[n] else 0.0 for n in names]
        colours = ["#1f77b4" if n.startswith("cachelayers") else "#9a9a9a" for n in names]
        ax.barh(names, medians, color=colours)
        ax.scatter(bests, names, marker="|", color="black", s=120, zorder=3, label="best round")
        ax.set_xscale("log")
        ax.set_title(f"{scenario} (median round, ns per call)")
        ax.invert_yaxis()
        for y, value in enumerate(medians):
            if value:
                ax.annotate(f"{value:,.0f}", (value, y), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    env = document["environment"]
    fig.suptitle(f"{document['benchmark']}\nPython {env['python']}, {env['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("json", type=Path, help="a benchmark's --json output")
    parser.add_argument("out", type=Path, help="the image to write (.png or .svg)")
    args = parser.parse_args(argv)
    plot(json.loads(args.json.read_text()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
