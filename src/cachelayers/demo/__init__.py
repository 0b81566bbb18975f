"""``cachelayers demo``: a simulated AI pipeline replayed through the caches, with a progress bar and a report.

The workload is a question-answering service: a document set is ingested (embedded) first, then each request
embeds the user's question, searches a vector database with the embedding, and asks an LLM to answer from
the documents found. The modules: `workload` (the request stream), `providers` (simulated remote APIs),
`pipeline` (the stages, through all four decorators), `ingest` (the ingestion stage), `runner` (`run_demo`:
measures and checks every call), `targets` (the product's targets) and `report` (the tables and JSON).
"""

from cachelayers.demo.ingest import IngestReport, IngestStage
from cachelayers.demo.pipeline import CompleteStage, EmbedStage, SearchStage, Stage, default_stages
from cachelayers.demo.providers import CACHED, COMPUTED, EXACT, SEMANTIC, SHARED, SimulatedProvider
from cachelayers.demo.report import DemoReport, StageReport, render_report, report_json
from cachelayers.demo.runner import run_demo
from cachelayers.demo.targets import Checks, Target
from cachelayers.demo.workload import DemoConfig, Request, build_requests

__all__ = ["CACHED", "COMPUTED", "EXACT", "SEMANTIC", "SHARED", "Checks", "CompleteStage", "DemoConfig", "DemoReport",
           "EmbedStage", "IngestReport", "IngestStage", "Request", "SearchStage", "SimulatedProvider", "Stage",
           "StageReport", "Target", "build_requests", "default_stages", "render_report", "report_json", "run_demo"]
