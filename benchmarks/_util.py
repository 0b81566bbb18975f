"""Shared helpers of the benchmarks: interleaved rounds, timing, robust summaries, and the report scaffolding.

The machines these run on are noisy (shared cores, frequency scaling), so every benchmark measures its
contenders *interleaved* in several rounds (a fresh random order each round) and reports the best and the
median round. Ratios are taken within a round (contender / floor of the same round) before the median, so a
slow stretch of the machine affects both sides of a ratio alike. The reports share their scaffolding: the
environment line, table rows against a floor, PROBLEMS and PASS/FAIL lines, ``--json``/``--check``, and a
throwaway ``redis-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

__all__ = ["RedisServer", "Series", "add_common_arguments", "emit", "environment", "environment_line",
           "exit_status", "floor_row", "gc_paused", "interleaved", "make_parser", "measure_calls", "missed",
           "package_versions", "percentile", "problem_lines", "ratio_cells", "render_table", "report_head",
           "scenario", "shuffled", "target_line", "target_lines", "time_async", "time_async_indexed", "time_sync",
           "to_json"]

T = TypeVar("T")


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
    with gc_paused():
        start = time.perf_counter_ns()
        for _ in range(repeat):
            for k in keys:
                await fn(k)
        elapsed = time.perf_counter_ns() - start
    return elapsed / (repeat * len(keys))


async def time_async(op: Callable[[], Awaitable[object]], repeat: int) -> float:
    """Nanoseconds per ``await op()``, over ``repeat`` calls, the garbage collector off."""
    with gc_paused():
        start = time.perf_counter_ns()
        for _ in range(repeat):
            await op()
        return (time.perf_counter_ns() - start) / repeat


async def time_async_indexed(fn: Callable[[int], Awaitable[object]], count: int) -> float:
    """Nanoseconds per ``await fn(i)`` for i in range(count), the garbage collector off."""
    with gc_paused():
        start = time.perf_counter_ns()
        for i in range(count):
            await fn(i)
        return (time.perf_counter_ns() - start) / count


def time_sync(fn: Callable[[int], object], count: int) -> float:
    """Nanoseconds per call of ``fn(i)`` for i in range(count), the garbage collector off."""
    with gc_paused():
        start = time.perf_counter_ns()
        for i in range(count):
            fn(i)
        return (time.perf_counter_ns() - start) / count


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the garbage collector off while timing (as `timeit` does).

    A collection triggered by one contender's garbage is then not charged to another; it runs between
    measurements instead.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def shuffled(contenders: Sequence[T], rng: random.Random) -> list[T]:
    """The contenders in a fresh random order."""
    return rng.sample(list(contenders), len(contenders))


def interleaved(contenders: Sequence[T], rounds: int, rng: random.Random) -> Iterator[list[T]]:
    """One fresh random order of the contenders per round: measure each in that order, round after round."""
    for _ in range(rounds):
        yield shuffled(contenders, rng)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values`` (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Format rows as a plain-text table: the first column left-aligned, the others right-aligned."""
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                strict=True))).rstrip()

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


def target_lines(title: str, targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The acceptance block of a report: a blank line, ``title``, one PASS/FAIL line per check.

    Each outcome has ``ok`` and either ``value`` (what was measured) or ``best`` and ``median`` (the best and
    the median round).
    """
    lines = ["", title]
    for check, outcome in targets.items():
        if "value" in outcome:
            lines.append(target_line(check, outcome["ok"], outcome["value"]))
        else:
            lines.append(f"  {'PASS' if outcome['ok'] else 'FAIL'}  {check} "
                         f"(best {outcome['best']:.3g}, median {outcome['median']:.3g})")
    return lines


def missed(targets: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any target was missed."""
    return any(not outcome["ok"] for outcome in targets.values())


def exit_status(check: bool, *missed: bool) -> int:
    """The exit status of a benchmark: 1 with ``--check`` when anything was missed, else 0."""
    return 1 if check and any(missed) else 0


def report_head(document: Mapping[str, Any], *lines: str) -> list[str]:
    """The head of a report: the benchmark's title, the environment line, then ``lines``."""
    return [document["benchmark"], environment_line(document["environment"]), *lines]


def problem_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The block listing each contender's problems (none: no lines), which make its figures not comparable."""
    problems = [f"  {name}: {p}" for name, r in results.items() for p in r["problems"]]
    return ["", "PROBLEMS (these figures are not comparable):", *problems] if problems else []


def scenario(series: Series, floor: Series) -> dict[str, Any]:
    """One contender's figures in one scenario, for the JSON document: best, median, ratio to the floor."""
    return {"best_ns": series.best, "median_ns": series.median, "ratio_to_floor": series.median_ratio(floor),
            "samples_ns": series.samples}


def ratio_cells(figures: Mapping[str, float]) -> list[str]:
    """Table cells of a `scenario`: ns best, ns median, x floor."""
    return [f"{figures['best_ns']:,.0f}", f"{figures['median_ns']:,.0f}", f"{figures['ratio_to_floor']:.2f}"]


def floor_row(name: str, series: Series, floor: Series, *, unit: float = 1000.0, digits: int = 2,
              ratio_suffix: str = "", paired: bool = True) -> list[str]:
    """A table row against a floor: best, median (ns / ``unit``), x floor, and the difference to the floor.

    Args:
        name: The first cell.
        series: The contender's rounds, in ns.
        floor: The floor's rounds, in ns.
        unit: Divisor of the ns figures (1000: microseconds).
        digits: Decimals of the figures.
        ratio_suffix: Appended to the ratio (e.g. ``"x"``).
        paired: The difference is the median of the per-round differences; else the difference of the medians.
    """
    if paired:
        diff = statistics.median(mine - base for mine, base in zip(series.samples, floor.samples, strict=True))
    else:
        diff = series.median - floor.median
    return [name, f"{series.best / unit:.{digits}f}", f"{series.median / unit:.{digits}f}",
            f"{series.median_ratio(floor):.2f}{ratio_suffix}", f"{diff / unit:+.{digits}f}"]


def to_json(document: Any, digits: int | None = 3) -> str:
    """Serialise a benchmark result, floats rounded to ``digits`` decimals (``None``: as they are)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, digits) if digits is not None else value
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(document), indent=2)


def emit(document: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print ``document`` as JSON (``--json``) or as its human-readable report."""
    print(to_json(document) if as_json else render(document))


# -- command line -------------------------------------------------------------------------------------------


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a benchmark's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n", 1)[0] if doc else None)


def add_common_arguments(parser: argparse.ArgumentParser, *, rounds: int | None = None, seed: bool = False,
                         json_help: str = "print the result as JSON",
                         check_help: str = "exit 1 when an acceptance target is missed") -> None:
    """The options every benchmark shares: ``--rounds`` (when given a default), ``--seed``, ``--json``, ``--check``."""
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    if seed:
        parser.add_argument("--seed", type=int, default=1, help="seed of the contender order (default 1)")
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--check", action="store_true", help=check_help)


# -- a redis-server of our own --------------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence, for the length of a benchmark."""

    def __init__(self, prefix: str = "bench-redis-") -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def installed() -> bool:
        """Whether a ``redis-server`` binary is on the path."""
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        """The server's URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``; `SystemExit` if it cannot."""
        if not self.installed():
            raise SystemExit("redis-server is not installed (scripts/ensure-redis installs it)")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
