"""Rate limiting across processes: each process's share of the admissions, and the fullest window, per strategy.

``--processes`` processes (4) of ``--tasks`` tasks (20) each call one function limited to ``--limit``
(``20/second``) on one redis-server for ``--seconds`` (3), ``--runs`` times (10) per strategy. Each grant is
recorded as the storage saw it: the server's time of the granting script (Redis ``TIME``) and the window (or
counter bucket) it was counted in; on code without the fair scripts, the client's clock around the storage
call (then only the moving window's fullest window is known). See ``tests/rate_limit_worker.py``.

The table: per strategy, the smallest and largest share any process got over the runs, the runs in which a
process got less than 15 % (starved), and the most admissions counted in one window against the limit.
The targets (issue 11): no run with a starved process, and no window over the limit.

Run ``python benchmarks/bench_fairness.py`` (``--json`` for machine-readable output, ``--check`` to exit 1
when a target is missed, ``--redis URL`` to use a running server).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _util import RedisServer, emit, environment, environment_line, exit_status, make_parser, render_table
from cachelayers.engines.limiter.limits import STRATEGIES, parse_limit

ROOT = Path(__file__).resolve().parent.parent
STARVED = 0.15
"""A process with less of the admissions than this is starved (as in ``tests/rate_limit_worker.py``)."""


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Every run of every strategy; the summary per strategy."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the multi-process harness lives with the tests
    from tests.rate_limit_worker import run_fairness

    amount = min(item.amount for item in parse_limit(args.limit).items)
    window = float(min(item.get_expiry() for item in parse_limit(args.limit).items))
    strategies: dict[str, Any] = {}
    for strategy in args.strategies:
        runs: list[dict[str, Any]] = []
        for index in range(args.runs):
            result = run_fairness(url, strategy, limit=args.limit, window=window, seconds=args.seconds,
                                  processes=args.processes, tasks=args.tasks, name=f"bench-{strategy}-{index}")
            runs.append({"counts": result.counts, "shares": result.shares, "max_in_window": result.max_in_window,
                         "source": result.source})
            print(f"  {strategy} run {index + 1}: {result.counts}, fullest window {result.max_in_window}",
                  file=sys.stderr, flush=True)
        fullest = [r["max_in_window"] for r in runs if r["max_in_window"] is not None]
        strategies[strategy] = {
            "runs": runs,
            "min_share": min(min(r["shares"]) for r in runs),
            "max_share": max(max(r["shares"]) for r in runs),
            "starved_runs": sum(1 for r in runs if min(r["shares"]) < STARVED),
            "max_in_window": max(fullest) if fullest else None,
            "limit": amount,
            "source": runs[0]["source"],
        }
    return strategies


def render(document: dict[str, Any]) -> str:
    """The report: environment, parameters, the table, the targets."""
    setup = document["setup"]
    rows = []
    for strategy, s in document["strategies"].items():
        fullest = "n/a" if s["max_in_window"] is None else str(s["max_in_window"])
        rows.append([strategy, f"{s['min_share']:.1%}", f"{s['max_share']:.1%}",
                     f"{s['starved_runs']}/{len(s['runs'])}", f"{fullest} / {s['limit']}", s["source"]])
    lines = [environment_line(document["environment"]),
             f"{setup['processes']} processes x {setup['tasks']} tasks, {setup['limit']}, {setup['seconds']:g} s "
             f"per run, {setup['runs']} runs per strategy; starved: a process below {STARVED:.0%}", "",
             render_table(["strategy", "min share", "max share", "runs starved", "max in a window / limit",
                           "times from"], rows)]
    lines.append("")
    for strategy, s in document["strategies"].items():
        ok_starved = s["starved_runs"] == 0
        ok_window = s["max_in_window"] is not None and s["max_in_window"] <= s["limit"]
        lines.append(f"  {'PASS' if ok_starved else 'FAIL'}  {strategy}: no run with a starved process "
                     f"(measured {s['starved_runs']})")
        lines.append(f"  {'PASS' if ok_window else 'FAIL'}  {strategy}: no window over the limit, counted at the "
                     f"granting call (measured {s['max_in_window']} / {s['limit']})")
    return "\n".join(lines)


def missed(document: dict[str, Any]) -> bool:
    """Whether a target was missed."""
    return any(s["starved_runs"] or s["max_in_window"] is None or s["max_in_window"] > s["limit"]
               for s in document["strategies"].values())


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--runs", type=int, default=10, help="runs per strategy (default 10)")
    parser.add_argument("--limit", default="20/second", help="the shared limit (default 20/second)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of a run (default 3)")
    parser.add_argument("--processes", type=int, default=4, help="processes per run (default 4)")
    parser.add_argument("--tasks", type=int, default=20, help="tasks per process (default 20)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--redis", help="URL of a running redis-server (default: start one)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    setup = {"runs": args.runs, "limit": args.limit, "seconds": args.seconds, "processes": args.processes,
             "tasks": args.tasks}
    if args.redis:
        strategies = run(args, args.redis)
    else:
        with RedisServer() as server:
            strategies = run(args, server.url)
    document = {"environment": environment(["limits", "redis"]), "setup": setup, "strategies": strategies}
    emit(document, args.json, render)
    return exit_status(args.check, missed(document))


if __name__ == "__main__":
    sys.exit(main())
