"""`run_demo`: replay the request stream through the pipeline and measure every call."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import anyio

from cachelayers.demo.ingest import IngestReport, IngestStage, chunk_texts
from cachelayers.demo.pipeline import Stage, default_stages
from cachelayers.demo.providers import CACHED, COMPUTED, SEMANTIC, SHARED, CallRecord, current_call
from cachelayers.demo.report import DemoReport, StageReport
from cachelayers.demo.targets import Checks, evaluate
from cachelayers.demo.workload import DemoConfig, Request, build_requests, canonical_question
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


class _Verifier:
    """Checks every value served against what the provider computes, and every answer against the question."""

    def __init__(self) -> None:
        self.checked = self.corrupt = self.answers = self.semantic = self.wrong = 0

    def check(self, stage: Stage, request: Request, args: tuple[Any, ...], result: dict[str, Any],
              outcome: str) -> None:
        self.checked += 1
        self.corrupt += not stage.correct(args, result)
        if "question" in result:  # an LLM answer: for the question asked, or a wording of it?
            self.answers += 1
            self.semantic += outcome == SEMANTIC
            self.wrong += canonical_question(str(result["question"])) != canonical_question(request.canonical)

    def checks(self, ingestion: IngestReport | None) -> Checks:
        extra = (ingestion.chunks, ingestion.wrong) if ingestion is not None else (0, 0)
        return Checks(checked=self.checked + extra[0], corrupt=self.corrupt + extra[1], answers=self.answers,
                      semantic_answers=self.semantic, wrong_answers=self.wrong)


class _Replay:
    """One replay of the request stream through the pipeline: serves requests, measures and checks each call."""

    def __init__(self, pipeline: list[Stage], progress: Callable[[int, int], None] | None) -> None:
        self.pipeline = pipeline
        self.progress = progress
        self.stats = [_StageStats(stage) for stage in pipeline]
        self.request_latency: dict[str, list[float]] = {CACHED: [], COMPUTED: []}
        self.verifier = _Verifier()
        self.served: list[tuple[Stage, Request, tuple[Any, ...], dict[str, Any], str]] = []
        self.done = self.from_cache = self.earlier_run = self.started_calls = 0
        # Per stage: flight key -> (sequence number of the call that computed it, calls started when its
        # provider call finished). A call that did not compute and started inside that window found the
        # computation in flight and waited for it: the cache neither had the value (it is stored when the
        # provider call ends) nor let it call the provider. Any other call that did not compute was answered
        # by a cache tier.
        self.computing: list[dict[Hashable, tuple[int, int]]] = [{} for _ in pipeline]
        # Per stage: the flight keys of the calls started so far. The first call of a key that a cache tier
        # answers found an entry no call of this run stored: one from an earlier run (the run started warm).
        self.seen: list[set[Hashable]] = [set() for _ in pipeline]

    def sequence(self) -> int:
        return self.started_calls

    async def serve(self, request: Request) -> None:
        """Pass ``request`` through every stage."""
        context: dict[str, Any] = {}
        started = time.perf_counter()
        reached_provider = False
        for stage, stage_stats, computed, keys in zip(self.pipeline, self.stats, self.computing, self.seen,
                                                      strict=True):
            args = stage.arguments(request, context)
            flight_key = stage.flight_key(args)
            first_of_key = flight_key not in keys
            keys.add(flight_key)
            self.started_calls += 1
            number = self.started_calls
            record = CallRecord(self.sequence)
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
                self.earlier_run += outcome == CACHED and first_of_key
            reached_provider = reached_provider or outcome == COMPUTED
            self.served.append((stage, request, args, result, outcome))  # checked after the replay: off the clock
            # A result carries what its computation cost and took, like the usage block of an API response.
            stage_stats.add(outcome, elapsed, float(result["cost"]), float(result["latency"]))
            context[stage.name] = result
        self.request_latency[COMPUTED if reached_provider else CACHED].append(time.perf_counter() - started)
        self.done += 1
        self.from_cache += not reached_provider
        if self.progress is not None:
            self.progress(self.done, self.from_cache)


async def run_demo(config: DemoConfig, *, stages: Sequence[Stage] | None = None,
                   ingest: IngestStage | None = None,
                   progress: Callable[[int, int], None] | None = None) -> DemoReport:
    """Ingest the document set, then replay the request stream of ``config`` through ``stages``, measuring
    and checking every call.

    Args:
        config: The workload.
        stages: The pipeline; `default_stages` when omitted.
        ingest: The ingestion stage; a new `IngestStage` when omitted (it embeds ``config.ingest_chunks``).
        progress: Called after each request with the number of requests done and of those answered
            entirely from the caches.

    Returns:
        The report.
    """
    pipeline = list(stages) if stages is not None else default_stages(config)
    ingestion_stage = ingest if ingest is not None else IngestStage(config.latency_scale)
    if config.fresh:
        for stage in pipeline:
            await stage.clear()
        await ingestion_stage.clear()
    ingestion = (await ingestion_stage.run(chunk_texts(config), config.ingest_concurrency)
                 if config.ingest_chunks else None)
    replay = _Replay(pipeline, progress)
    feed: Iterator[Request] = iter(build_requests(config))

    async def worker() -> None:
        for request in feed:
            await replay.serve(request)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(min(config.concurrency, config.requests)):
            tg.start_soon(worker)
    wall = time.perf_counter() - started
    for served in replay.served:
        replay.verifier.check(*served)
    stage_reports = [s.report() for s in replay.stats]
    latency = replay.request_latency
    every_request = _summary(latency[CACHED] + latency[COMPUTED])
    checks = replay.verifier.checks(ingestion)
    targets = evaluate(calls=sum(s.calls for s in stage_reports), avoided=sum(s.avoided for s in stage_reports),
                       p95=every_request["p95"], cost_spent=sum(s.cost_spent for s in stage_reports),
                       cost_saved=sum(sum(s.cost_saved.values()) for s in stage_reports),
                       batch_fill=ingestion.fill_ratio if ingestion is not None else None, checks=checks,
                       latency_scale=config.latency_scale)
    return DemoReport(
        config=config, tiers={name: redact_urls(url) for name, url in get_settings().tier_urls.items()},
        wall_seconds=wall, stages=stage_reports,
        request_latency={**{k: _summary(v) for k, v in latency.items()}, "all": every_request},
        requests_by_outcome={k: len(v) for k, v in latency.items()}, ingestion=ingestion,
        earlier_run_hits=replay.earlier_run + (ingestion.cached if ingestion is not None else 0),
        checks=checks, targets=targets,
    )
