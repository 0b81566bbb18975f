"""``cachelayers demo``: a simulated AI pipeline replayed through the caches, with a progress bar and a report.

The workload is a question-answering service: each request embeds the user's question, searches a vector
database with the embedding, and asks an LLM to answer from the documents found. The modules: `workload`
(the request stream), `providers` (simulated remote APIs), `pipeline` (the stages, through all four
decorators), `runner` (`run_demo`) and `report` (the tables and JSON).
"""

from cachelayers.demo.pipeline import CompleteStage, EmbedStage, SearchStage, Stage, default_stages
from cachelayers.demo.providers import CACHED, COMPUTED, EXACT, SEMANTIC, SHARED, SimulatedProvider
from cachelayers.demo.report import DemoReport, StageReport, render_report, report_json
from cachelayers.demo.runner import run_demo
from cachelayers.demo.workload import DemoConfig, Request, build_requests

__all__ = ["CACHED", "COMPUTED", "EXACT", "SEMANTIC", "SHARED", "CompleteStage", "DemoConfig", "DemoReport",
           "EmbedStage", "Request", "SearchStage", "SimulatedProvider", "Stage", "StageReport", "build_requests",
           "default_stages", "render_report", "report_json", "run_demo"]
