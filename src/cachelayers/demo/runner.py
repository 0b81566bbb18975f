"""`run_demo`: replay the request stream through the pipeline and measure every call."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import anyio

from cachelayers.demo.pipeline import Stage, default_stages
from cachelayers.demo.providers import CACHED, COMPUTED, SHARED, CallRecord, current_call
from cachelayers.demo.report import DemoReport, StageReport
from cachelayers.demo.workload import DemoConfig, Request, build_requests
from cachelayers.errors import redact_urls
from cachelayers.settings import get_settings

__all__ = ["run_demo"]


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (0-100), ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class _StageStats:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.latencies: dict[str, list[float]] = {}
        self.cost_saved: dict[str, float] = {}
        self.time_saved = 0.0

    def add(self, outcome: str, seconds: float, cost: float, provider_seconds: float) -> None:
        self.latencies.setdefault(outcome, []).append(seconds)
        if outcome != COMPUTED:
            self.cost_saved[outcome] = self.cost_saved.get(outcome, 0.0) + cost
            self.time_saved += max(0.0, provider_seconds - seconds)

    def report(self) -> StageReport:
        """What happened at this stage, for the report."""
        stage = self.stage
        return StageReport(
            name=stage.name,
            provider=stage.provider.name,
            calls=sum(len(v) for v in self.latencies.values()),
            outcomes={outcome: len(v) for outcome, v in sorted(self.latencies.items())},
            latency={outcome: _summary(v) for outcome, v in sorted(self.latencies.items())},
            provider_calls=stage.provider.calls,
            cost_spent=stage.provider.cost,
            cost_saved=dict(sorted(self.cost_saved.items())),
            time_saved=self.time_saved,
            cache_info=stage.function.cache_info()._asdict(),
            details=stage.details(),
        )


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": _percentile(values, 50), "p95": _percentile(values, 95),
            "mean": statistics.fmean(values) if values else None}


async def run_demo(config: DemoConfig, *, stages: Sequence[Stage] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> DemoReport:
    """Replay the request stream of ``config`` through ``stages`` and measure every call.

    Args:
        config: The workload.
        stages: The pipeline; `default_stages` when omitted.
        progress: Called after each request with the number of requests done and of those answered
            entirely from the caches.

    Returns:
        The report.
    """
    pipeline = list(stages) if stages is not None else default_stages(config)
    requests = build_requests(config)
    if config.fresh:
        for stage in pipeline:
            await stage.clear()
    stats = [_StageStats(stage) for stage in pipeline]
    request_latency: dict[str, list[float]] = {CACHED: [], COMPUTED: []}
    done = 0
    from_cache = 0
    feed: Iterator[Request] = iter(requests)
    started_calls = 0
    # Per stage: flight key -> (sequence number of the call that computed it, calls started when its provider
    # call finished). A call that did not compute and started inside that window found the computation in
    # flight and waited for it: the cache neither had the value (it is stored when the provider call ends)
    # nor let it call the provider. Any other call that did not compute was answered by a cache tier.
    computing: list[dict[Hashable, tuple[int, int]]] = [{} for _ in pipeline]

    def sequence() -> int:
        return started_calls

    async def serve(request: Request) -> None:
        nonlocal done, from_cache, started_calls
        context: dict[str, Any] = {}
        started = time.perf_counter()
        reached_provider = False
        for stage, stage_stats, computed in zip(pipeline, stats, computing, strict=True):
            args = stage.arguments(request, context)
            flight_key = stage.flight_key(args)
            started_calls += 1
            number = started_calls
            record = CallRecord(sequence)
            token = current_call.set(record)
            call_started = time.perf_counter()
            try:
                result = await stage(args)
            finally:
                elapsed = time.perf_counter() - call_started
                current_call.reset(token)
            outcome = record.outcome
            if outcome == COMPUTED:
                computed[flight_key] = (number, record.finished_at)
            elif outcome is None:
                first, last = computed.get(flight_key, (0, 0))
                outcome = SHARED if first < number <= last else CACHED
            reached_provider = reached_provider or outcome == COMPUTED
            # A result carries what its computation cost and took, like the usage block of an API response.
            stage_stats.add(outcome, elapsed, float(result["cost"]), float(result["latency"]))
            context[stage.name] = result
        request_latency[COMPUTED if reached_provider else CACHED].append(time.perf_counter() - started)
        done += 1
        from_cache += not reached_provider
        if progress is not None:
            progress(done, from_cache)

    async def worker() -> None:
        for request in feed:
            await serve(request)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(min(config.concurrency, config.requests)):
            tg.start_soon(worker)
    wall = time.perf_counter() - started
    return DemoReport(
        config=config,
        tiers={name: redact_urls(url) for name, url in get_settings().tier_urls.items()},
        wall_seconds=wall,
        stages=[s.report() for s in stats],
        request_latency={k: _summary(v) for k, v in request_latency.items()},
        requests_by_outcome={k: len(v) for k, v in request_latency.items()},
    )


