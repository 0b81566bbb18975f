"""The product's targets, each with the demo's figure for it and whether the run met it.

The targets (issue 14): a hit rate above 60 % on repeated workloads, a p95 latency under 2 s, more than 30 %
of the cost saved, embedding batches more than 80 % full, no corrupt value ever served, and no wrong answer
from the semantic layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

__all__ = ["BATCH_FILL_TARGET", "COST_SAVED_TARGET", "HIT_RATE_TARGET", "P95_TARGET", "Checks", "Target",
           "evaluate", "targets_dict"]

HIT_RATE_TARGET: Final = 0.60
P95_TARGET: Final = 2.0
COST_SAVED_TARGET: Final = 0.30
BATCH_FILL_TARGET: Final = 0.80


@dataclasses.dataclass(frozen=True)
class Checks:
    """What the demo verified of every value it was served.

    Attributes:
        checked: Values compared with what the provider computes for them (every stage call, every chunk).
        corrupt: Of those, values that differed: a foreign, stale-format or garbled entry served.
        answers: LLM answers served.
        semantic_answers: Of those, answers the semantic layer gave (from a similar earlier question).
        wrong_answers: Answers served for another question than the one asked (the workload knows which
            paraphrase belongs to which question); only the semantic layer can give one.
    """

    checked: int = 0
    corrupt: int = 0
    answers: int = 0
    semantic_answers: int = 0
    wrong_answers: int = 0


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of the product and the run's figure for it.

    Attributes:
        name: What is measured.
        goal: The target, e.g. ``"> 60 %"``.
        figure: The run's figure, as shown.
        value: The figure as a number (``None`` when the run could not measure it).
        passed: Whether the figure meets the goal; ``None`` when not measured in this run.
        note: How the figure was measured.
    """

    name: str
    goal: str
    figure: str
    value: float | None
    passed: bool | None
    note: str = ""

    @property
    def status(self) -> str:
        """``"PASS"``, ``"FAIL"`` or ``"n/a"``."""
        return "n/a" if self.passed is None else "PASS" if self.passed else "FAIL"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def evaluate(*, calls: int, avoided: int, p95: float | None, cost_spent: float, cost_saved: float,
             batch_fill: float | None, checks: Checks, latency_scale: float) -> list[Target]:
    """The targets and the run's figures.

    Args:
        calls: Stage calls of the request stream (every request passes every stage).
        avoided: Of those, calls answered without the provider (a cache tier, a call in flight, the semantic
            layer).
        p95: 95th percentile of the end-to-end latency of every request, in seconds.
        cost_spent: Dollars the providers charged for the request stream.
        cost_saved: Dollars the avoided calls would have cost.
        batch_fill: How full the ingestion stage's embedding requests were (``None``: it sent none).
        checks: What the demo verified of the values served.
        latency_scale: The factor on the simulated latencies (the p95 target is judged at 1.0 only).

    Returns:
        The targets, in the order of the issue.
    """
    hit_rate = avoided / calls if calls else None
    without = cost_spent + cost_saved
    saved = cost_saved / without if without else None
    real_time = latency_scale == 1.0
    return [
        Target("hit rate, repeated workload", f"> {HIT_RATE_TARGET:.0%}", _percent(hit_rate), hit_rate,
               None if hit_rate is None else hit_rate > HIT_RATE_TARGET,
               f"{avoided:,} of {calls:,} stage calls answered without a provider"),
        Target("p95 latency", f"< {P95_TARGET:g} s", "-" if p95 is None else f"{p95 * 1e3:,.1f} ms", p95,
               None if p95 is None or not real_time else p95 < P95_TARGET,
               "per request, end to end" + ("" if real_time else "; judged at --latency-scale 1 only")),
        Target("cost saved", f"> {COST_SAVED_TARGET:.0%}", _percent(saved), saved,
               None if saved is None else saved > COST_SAVED_TARGET, "of the bill without a cache"),
        Target("embedding batch fill", f"> {BATCH_FILL_TARGET:.0%}", _percent(batch_fill), batch_fill,
               None if batch_fill is None else batch_fill > BATCH_FILL_TARGET,
               "ingestion's requests" if batch_fill is not None else "no chunk embedded (all cached, or none)"),
        Target("corrupt values", "0", f"{checks.corrupt:,}", float(checks.corrupt), checks.corrupt == 0,
               f"of {checks.checked:,} served values checked"),
        Target("semantic wrong answers", "0", f"{checks.wrong_answers:,}", float(checks.wrong_answers),
               checks.wrong_answers == 0,
               f"of {checks.semantic_answers:,} semantic answers ({checks.answers:,} answers in all)"),
    ]


def targets_dict(targets: list[Target]) -> list[Mapping[str, object]]:
    """The targets as plain data (for ``--json``)."""
    return [dataclasses.asdict(t) | {"status": t.status} for t in targets]
