"""The demo reports each of the product's targets with its figure and pass/fail, checks every value it is
served (corrupt values, semantic answers to another question), ingests with a loader's concurrency so that
embedding requests are full, and says when it starts warm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import cachelayers
from cachelayers.demo import (
    DemoConfig,
    DemoReport,
    EmbedStage,
    SearchStage,
    build_requests,
    render_report,
    run_demo,
)
from cachelayers.demo.ingest import INGEST_BATCH, IngestStage, chunk_texts
from cachelayers.demo.pipeline import CompleteStage
from cachelayers.demo.workload import canonical_question
from cachelayers.errors import ConfigError

pytestmark = pytest.mark.anyio

TARGETS = ["hit rate, repeated workload", "p95 latency", "cost saved", "embedding batch fill", "corrupt values",
           "semantic wrong answers"]


@pytest.fixture
def anyio_backend() -> str:
    """The demo runs on asyncio, as ``cachelayers demo`` does."""
    return "asyncio"


def small(**changes: Any) -> DemoConfig:
    """A short, fast run: 240 requests at 1/20 of the simulated latencies, 256 chunks to ingest."""
    return DemoConfig(**{"requests": 240, "seed": 11, "concurrency": 6, "latency_scale": 0.05,
                         "ingest_chunks": 256, "ingest_concurrency": 128} | changes)


def rendered(report: DemoReport) -> str:
    console = Console(record=True, width=200)
    render_report(report, console)
    return console.export_text()


def by_name(report: DemoReport) -> dict[str, Any]:
    return {t.name: t for t in report.targets}


async def test_every_target_is_reported_with_its_figure_and_status() -> None:
    """A cold run: the six targets in order, each with a figure; the figures are the report's own numbers."""
    report = await run_demo(small())
    assert [t.name for t in report.targets] == TARGETS
    targets = by_name(report)
    calls = report.provider_calls + report.avoided_calls
    assert targets["hit rate, repeated workload"].value == pytest.approx(report.avoided_calls / calls)
    assert targets["cost saved"].value == pytest.approx(report.cost_saved / (report.cost_spent + report.cost_saved))
    assert targets["p95 latency"].value == report.request_latency["all"]["p95"]
    assert targets["p95 latency"].status == "n/a"  # judged at real latencies only
    assert report.ingestion is not None
    assert targets["embedding batch fill"].value == report.ingestion.fill_ratio
    assert targets["corrupt values"].status == "PASS"
    assert report.checks.checked == 3 * 240 + 256
    assert targets["semantic wrong answers"].status == "PASS"
    assert report.checks.semantic_answers == report.stages[2].outcomes.get("semantic", 0) > 0
    assert not report.started_warm
    assert report.earlier_run_hits == 0
    text = rendered(report)
    assert "started cold" in text
    for target in report.targets:
        assert target.name in text
    document = report.to_dict()
    assert [t["status"] for t in document["targets"]] == [t.status for t in report.targets]
    assert document["started_warm"] is False


async def test_ingestion_with_a_loaders_concurrency_fills_embedding_requests() -> None:
    """128 chunks in flight fill the requests (> 80 %, the target); one at a time, each request carries one."""
    concurrent = await IngestStage(0.05).run(chunk_texts(small()), 128)
    assert concurrent.fill_ratio is not None
    assert concurrent.fill_ratio > 0.8
    assert concurrent.items == concurrent.computed == 256
    assert concurrent.batches == 256 // INGEST_BATCH
    cachelayers.reset_settings()  # an empty cache: the same chunks are embedded again
    serial = await IngestStage(0.05).run(chunk_texts(small())[:40], 1)
    assert serial.batches == serial.items == 40
    assert serial.fill_ratio == pytest.approx(1 / INGEST_BATCH)
    assert concurrent.wrong == serial.wrong == 0


async def test_a_second_run_on_the_same_cache_directory_says_it_started_warm(tmp_path: Path) -> None:
    """The first run starts cold; the second, on the same disk tier with an empty memory tier (a new
    process), says it started warm and how many calls entries of the earlier run answered."""
    tiers = {"memory": "memory://", "disk": f"disk://{tmp_path}?max_bytes=64MiB"}
    cachelayers.configure(tiers=tiers)
    cold = await run_demo(small(fresh=False))
    assert not cold.started_warm
    cachelayers.reset_settings()
    cachelayers.configure(tiers=tiers)
    warm = await run_demo(small(fresh=False))
    assert cold.earlier_run_hits == 0
    assert warm.started_warm
    assert warm.ingestion is not None
    assert warm.ingestion.cached > 0
    # What the earlier run stored is read from disk once per key (then from memory): exactly the calls counted.
    # (Not simply every key of the first run: a disk write slower than the tier timeout is skipped, under load.)
    from_disk = sum(s.cache_info["hits_by_tier"].get("disk", 0) for s in warm.stages)
    assert from_disk > 0
    assert warm.earlier_run_hits == warm.ingestion.cached + from_disk
    assert "started warm: " in rendered(warm)
    assert warm.provider_calls < cold.provider_calls


async def test_a_corrupt_value_served_is_counted_and_fails_the_target() -> None:
    """The demo compares every value with what the provider computes: one tampered value is one FAIL."""

    class TamperedComplete(CompleteStage):
        tampered = 0

        async def __call__(self, args: tuple[Any, ...]) -> dict[str, Any]:
            result = await super().__call__(args)
            if not self.tampered:  # one answer garbled on its way to the caller
                self.tampered += 1
                return {**result, "text": result["text"][::-1]}
            return result

    config = small(ingest_chunks=0)
    stages = [EmbedStage(config.latency_scale), SearchStage(config.latency_scale),
              TamperedComplete(config.latency_scale)]
    report = await run_demo(config, stages=stages)
    assert report.checks.corrupt == 1
    assert by_name(report)["corrupt values"].status == "FAIL"
    assert by_name(report)["embedding batch fill"].status == "n/a"  # no ingestion in this run


async def test_semantic_answers_to_another_question_are_counted_as_wrong() -> None:
    """With a threshold that accepts anything, the semantic layer answers questions with other questions'
    answers: the workload knows which paraphrase belongs to which question, and the target fails."""
    config = small(ingest_chunks=0)
    stages = [EmbedStage(config.latency_scale), SearchStage(config.latency_scale),
              CompleteStage(config.latency_scale, threshold=0.0)]
    report = await run_demo(config, stages=stages)
    assert report.checks.wrong_answers > 0
    assert report.checks.corrupt == 0  # a wrong answer is still the LLM's answer to the question it answers
    assert by_name(report)["semantic wrong answers"].status == "FAIL"


def test_the_workload_knows_which_paraphrase_belongs_to_which_question() -> None:
    """Every request carries the question it asks as first written; a paraphrase has its words, and two
    different questions never do."""
    requests = build_requests(DemoConfig(requests=2000, seed=3))
    assert sum(r.question != r.canonical for r in requests) > 100  # re-cased or re-punctuated paraphrases
    assert all(canonical_question(r.question) == canonical_question(r.canonical) for r in requests)
    sources = {r.canonical for r in requests}
    assert len({canonical_question(q) for q in sources}) == len(sources)


def test_bad_ingestion_settings_are_refused() -> None:
    """A negative chunk count or no concurrency is a `ConfigError` naming the field."""
    with pytest.raises(ConfigError, match="ingest_chunks"):
        DemoConfig(ingest_chunks=-1)
    with pytest.raises(ConfigError, match="ingest_concurrency"):
        DemoConfig(ingest_concurrency=0)
