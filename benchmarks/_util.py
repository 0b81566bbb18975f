"""Shared helpers of the benchmarks: interleaved rounds, robust summaries, a plain table, the environment.

The machines these run on are noisy (shared cores, frequency scaling), so every benchmark measures its
contenders *interleaved* in several rounds (a fresh random order each round) and reports the best and the
median round. Ratios are taken within a round (contender / floor of the same round) before the median, so a
slow stretch of the machine affects both sides of a ratio alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = ["Series", "environment", "measure_calls", "package_versions", "render_table", "to_json"]


@dataclass
class Series:
    """The per-round samples (ns per call) of one contender in one scenario."""

    samples: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        """The fastest round: the least disturbed by the machine."""
        return min(self.samples)

    @property
    def median(self) -> float:
        """The median round."""
        return statistics.median(self.samples)

    def ratios(self, floor: Series) -> list[float]:
        """This series divided by ``floor``, round by round."""
        return [mine / base for mine, base in zip(self.samples, floor.samples, strict=True)]

    def median_ratio(self, floor: Series) -> float:
        """The median of the per-round ratios to ``floor``."""
        return statistics.median(self.ratios(floor))


async def measure_calls(fn: Callable[[int], Awaitable[object]], keys: Sequence[int], repeat: int) -> float:
    """Await ``fn(k)`` for every key, ``repeat`` times; return nanoseconds per call.

    The garbage collector is off while timing (as `timeit` does), so a collection triggered by one
    contender's garbage is not charged to another; it runs between measurements instead.
    """
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(repeat):
            for k in keys:
                await fn(k)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / (repeat * len(keys))


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Format rows as a plain-text table: the first column left-aligned, the others right-aligned."""
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                strict=True)))

    out = [line(all_rows[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in all_rows[1:])
    return "\n".join(out)


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the named distributions (``"-"`` when not installed)."""
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def environment(packages: Iterable[str] = ()) -> dict[str, Any]:
    """What a reader needs to interpret the numbers: Python, platform, CPUs, package versions."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": package_versions(packages),
    }


def environment_line(env: Mapping[str, Any]) -> str:
    """One line of an `environment` for the head of a report."""
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items())
    return f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs; {packages}"


def target_line(check: str, ok: bool, measured: Any) -> str:
    """One line of a report's acceptance targets: PASS or FAIL, the check, what was measured."""
    shown = f"{measured:,.2f}" if isinstance(measured, float) else str(measured)
    return f"  {'PASS' if ok else 'FAIL'}  {check} (measured {shown})"


def to_json(document: Mapping[str, Any]) -> str:
    """Serialise a benchmark result, floats rounded to three decimals."""

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(document), indent=2)
