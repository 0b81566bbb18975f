"""The demo's report: what happened at each stage and overall, as tables or JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cachelayers.demo.ingest import IngestReport
from cachelayers.demo.providers import CACHED, COMPUTED, EXACT, SEMANTIC, SHARED
from cachelayers.demo.targets import Checks, Target, targets_dict
from cachelayers.demo.workload import DemoConfig

__all__ = ["DemoReport", "StageReport", "render_report", "report_json"]


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What happened at one stage.

    Attributes:
        name: The stage.
        provider: The provider behind it.
        calls: Calls of the stage (one per request).
        outcomes: Calls by outcome: ``computed`` (reached the provider), ``cached``, ``shared``, and for the
            LLM ``semantic`` (a similar question's answer) and ``exact`` (the semantic layer had this text).
        latency: ``{outcome: {"p50": s, "p95": s, "mean": s}}``, measured around each call.
        provider_calls: Calls the provider served (it counts them itself).
        cost_spent: Dollars the provider charged.
        cost_saved: Dollars of the calls that did not reach the provider, by outcome.
        time_saved: Seconds the avoided calls took when they were computed, less the time they took now.
        cache_info: The cached function's own `cache_info()` as a dict, to compare with.
        details: What the stage's other layers counted: batches and fill for the embedding batcher,
            admissions and waits for the LLM's rate limiter, the semantic layer's counters.
    """

    name: str
    provider: str
    calls: int
    outcomes: dict[str, int]
    latency: dict[str, dict[str, float | None]]
    provider_calls: int
    cost_spent: float
    cost_saved: dict[str, float]
    time_saved: float
    cache_info: dict[str, Any]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def avoided(self) -> int:
        """Calls that did not reach the provider."""
        return self.calls - self.outcomes.get(COMPUTED, 0)


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """The result of `run_demo`.

    Attributes:
        config: What was replayed.
        tiers: The tiers in force, ``name -> URL``.
        wall_seconds: Duration of the replay.
        stages: One report per stage, in pipeline order.
        request_latency: End-to-end latency of requests answered entirely from the caches (``cached``), of
            those that reached at least one provider (``computed``) and of all (``all``):
            ``{"p50": s, "p95": s}``.
        requests_by_outcome: Requests answered entirely without a provider call, and the others.
        ingestion: What the ingestion stage did before the requests (``None``: no ingestion).
        earlier_run_hits: Calls answered by entries that no call of this run stored (chunks ingested before,
            first calls of a key found in a tier): more than 0 when the run started warm.
        checks: What was verified of every value served.
        targets: The product's targets with this run's figures.
    """

    config: DemoConfig
    tiers: dict[str, str]
    wall_seconds: float
    stages: list[StageReport]
    request_latency: dict[str, dict[str, float | None]]
    requests_by_outcome: dict[str, int]
    ingestion: IngestReport | None = None
    earlier_run_hits: int = 0
    checks: Checks = dataclasses.field(default_factory=Checks)
    targets: list[Target] = dataclasses.field(default_factory=list)

    @property
    def started_warm(self) -> bool:
        """Whether entries of an earlier run answered calls (a second run on the same cache directory)."""
        return self.earlier_run_hits > 0

    @property
    def provider_calls(self) -> int:
        """Calls that reached a provider, over all stages."""
        return sum(s.outcomes.get(COMPUTED, 0) for s in self.stages)

    @property
    def avoided_calls(self) -> int:
        """Calls answered without a provider, over all stages."""
        return sum(s.avoided for s in self.stages)

    @property
    def cost_spent(self) -> float:
        """Dollars charged by the providers."""
        return sum(s.cost_spent for s in self.stages)

    @property
    def cost_saved(self) -> float:
        """Dollars the avoided calls would have cost."""
        return sum(sum(s.cost_saved.values()) for s in self.stages)

    @property
    def time_saved(self) -> float:
        """Provider seconds avoided, less the time the avoided calls took."""
        return sum(s.time_saved for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (for ``--json``)."""
        return {
            "config": dataclasses.asdict(self.config),
            "tiers": self.tiers,
            "wall_seconds": self.wall_seconds,
            "requests": self.config.requests,
            "requests_by_outcome": self.requests_by_outcome,
            "request_latency": self.request_latency,
            "provider_calls": self.provider_calls,
            "avoided_calls": self.avoided_calls,
            "cost_spent": self.cost_spent,
            "cost_saved": self.cost_saved,
            "time_saved": self.time_saved,
            "stages": [dataclasses.asdict(s) | {"avoided": s.avoided} for s in self.stages],
            "ingestion": (dataclasses.asdict(self.ingestion) | {"cached": self.ingestion.cached}
                          if self.ingestion is not None else None),
            "started_warm": self.started_warm,
            "earlier_run_hits": self.earlier_run_hits,
            "checks": dataclasses.asdict(self.checks),
            "targets": targets_dict(self.targets),
        }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _dollars(amount: float) -> str:
    return f"${amount:,.4f}" if amount < 100 else f"${amount:,.2f}"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render_report(report: DemoReport, console: Any) -> None:
    """Print ``report`` as tables on a rich ``console``."""
    from rich.table import Table

    config = report.config
    stage_names = " → ".join(s.name for s in report.stages)
    console.print(
        f"\n[bold]cachelayers demo[/]: {config.requests:,} requests through {stage_names}, "
        f"concurrency {config.concurrency}, seed {config.seed}, "
        f"tiers: {', '.join(f'{name} ({url})' for name, url in report.tiers.items())}"
    )
    if report.started_warm:
        console.print(f"[bold yellow]started warm[/]: {report.earlier_run_hits:,} calls were answered by entries "
                      f"an earlier run stored (same cache directory); run with --fresh to start cold")
    else:
        console.print("started cold: no entry of an earlier run was found")
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for header in ("stage", "calls", "cached", "shared", "semantic", "computed", "hit rate", "cached p50 / p95",
                   "computed p50 / p95", "spent", "saved"):
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    for s in report.stages:
        cached, computed = s.latency.get(CACHED, {}), s.latency.get(COMPUTED, {})
        table.add_row(
            s.name, f"{s.calls:,}", f"{s.outcomes.get(CACHED, 0):,}", f"{s.outcomes.get(SHARED, 0):,}",
            f"{s.outcomes.get(SEMANTIC, 0) + s.outcomes.get(EXACT, 0):,}", f"{s.outcomes.get(COMPUTED, 0):,}",
            _percent(s.avoided, s.calls),
            f"{_duration(cached.get('p50'))} / {_duration(cached.get('p95'))}",
            f"{_duration(computed.get('p50'))} / {_duration(computed.get('p95'))}",
            _dollars(s.cost_spent), _dollars(sum(s.cost_saved.values())),
        )
    console.print(table)
    calls = report.provider_calls + report.avoided_calls
    without = report.cost_spent + report.cost_saved
    shared = sum(s.outcomes.get(SHARED, 0) for s in report.stages)
    fast, slow = report.request_latency[CACHED], report.request_latency[COMPUTED]
    tiers: dict[str, int] = {}
    for s in report.stages:
        for tier, hits in s.cache_info["hits_by_tier"].items():
            tiers[tier] = tiers.get(tier, 0) + hits
    by_tier = ", ".join(f"{tier} {hits:,}" for tier, hits in tiers.items()) or "none"
    layers = []
    for s in report.stages:
        d = s.details
        if "batches" in d:
            line = (f"{s.name} batching: {d['items']:,} provider items in {d['batches']:,} batches "
                    f"(mean size {d['mean_batch_size']:.2f} of {d['max_batch_size']}, "
                    f"fill {100 * d['fill_ratio']:.0f}%)")
            if d["items"] and report.wall_seconds > 0:
                rate = d["items"] / report.wall_seconds
                line += (f"; misses came at {rate:,.0f}/s, {rate * d['max_wait_s']:.1f} per "
                         f"{d['max_wait_s'] * 1e3:g} ms window: batches fill when misses come in bursts")
            layers.append(line)
        if "admitted" in d:
            layers.append(f"{s.name} rate limit: {d['admitted']:,} admitted, {d['immediate']:,} at once, "
                          f"{d['waited']:,} waited for room")
        if s.outcomes.get(SEMANTIC) is not None or "semantic_cache" in d:
            exact = s.outcomes.get(CACHED, 0) + s.outcomes.get(SHARED, 0) + s.outcomes.get(EXACT, 0)
            layers.append(f"{s.name} answers by level: exact {exact:,}, semantic {s.outcomes.get(SEMANTIC, 0):,}, "
                          f"computed {s.outcomes.get(COMPUTED, 0):,}")
    console.print(
        f"requests: {config.requests:,} in {report.wall_seconds:.1f} s; "
        f"{report.requests_by_outcome[CACHED]:,} answered entirely from the cache "
        f"(p50 {_duration(fast['p50'])}, p95 {_duration(fast['p95'])}), "
        f"{report.requests_by_outcome[COMPUTED]:,} reached a provider "
        f"(p50 {_duration(slow['p50'])}, p95 {_duration(slow['p95'])})\n"
        f"provider calls: [bold]{report.provider_calls:,} made, {report.avoided_calls:,} avoided[/] "
        f"({_percent(report.avoided_calls, calls)} of {calls:,}); "
        f"{shared:,} of them joined an identical call in flight (single-flight)\n"
        f"hits by tier (which tier answered): {by_tier}\n"
        + "".join(f"{line}\n" for line in layers) +
        f"cost: [bold]{_dollars(report.cost_spent)} spent, {_dollars(report.cost_saved)} saved[/] "
        f"({_percent(report.cost_saved, without)} of {_dollars(without)} without the cache)\n"
        f"time: [bold]{report.time_saved:,.1f} s[/] of provider time avoided"
    )
    _render_ingestion(report.ingestion, console)
    _render_targets(report.targets, console)


def _render_ingestion(ingestion: IngestReport | None, console: Any) -> None:
    if ingestion is None:
        return
    fill = "-" if ingestion.fill_ratio is None else f"{100 * ingestion.fill_ratio:.0f}%"
    console.print(
        f"ingestion: {ingestion.chunks:,} chunks, {ingestion.concurrency} in flight, in "
        f"{ingestion.wall_seconds:.1f} s; {ingestion.computed:,} embedded in {ingestion.batches:,} requests "
        f"(fill {fill} of {ingestion.max_batch_size}), {ingestion.cached:,} cached; "
        f"{_dollars(ingestion.cost_spent)} spent")


def _render_targets(targets: list[Target], console: Any) -> None:
    if not targets:
        return
    from rich.table import Table

    table = Table(title="targets", title_justify="left", show_edge=False, pad_edge=False, box=None,
                  header_style="bold")
    for header in ("target", "goal", "figure", "status", "measured as"):
        table.add_column(header, justify="left" if header in ("target", "measured as") else "right",
                         no_wrap=header != "measured as")
    styles = {"PASS": "[green]PASS[/]", "FAIL": "[bold red]FAIL[/]", "n/a": "[dim]n/a[/]"}
    for t in targets:
        table.add_row(t.name, t.goal, t.figure, styles[t.status], t.note)
    console.print(table)


def report_json(report: DemoReport) -> str:
    """The report as JSON."""
    return json.dumps(report.to_dict(), indent=2)
