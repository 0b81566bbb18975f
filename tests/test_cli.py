"""The ``cachelayers`` command: the demo's report adds up, stats and invalidate reach every tier, and bad
usage or configuration exits with code 2 and a message naming the field, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any, ClassVar

import pytest

from cachelayers import Backend, StoreItem, register_backend
from cachelayers.backends import unregister_backend
from cachelayers.cli import main
from cachelayers.demo import (
    CACHED,
    COMPUTED,
    EXACT,
    SEMANTIC,
    SHARED,
    DemoConfig,
    build_requests,
    default_stages,
    run_demo,
)
from cachelayers.engines import TieredCache, namespace_tag
from cachelayers.settings import get_settings, reset_settings

# Small and fast: 240 requests, simulated latencies cut to 5 %.
DEMO_ARGS = ["demo", "--requests", "240", "--latency-scale", "0.05", "--concurrency", "6", "--seed", "11"]


@pytest.fixture(autouse=True)
def demo_cache_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The demo's default disk tier lives under $XDG_CACHE_HOME: here, a directory of this test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def demo_json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    status, out, err = run_cli(capsys, *DEMO_ARGS, "--quiet", "--json", *extra)
    assert status == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


def expected_provider_calls(config: DemoConfig) -> dict[str, int]:
    """Distinct calls per stage of the request stream: each misses the exact cache exactly once (for the LLM,
    the semantic layer answers some of these misses)."""
    requests = build_requests(config)
    return {
        "embed": len({r.question for r in requests}),
        "search": len({(r.question, r.collection) for r in requests}),
        "complete": len({(r.question, r.collection, r.model, r.temperature) for r in requests}),
    }


def same_words(question: str) -> str:
    """A question as the default embedder sees it: case, punctuation and spacing do not count."""
    return " ".join("".join(c for c in question.casefold() if c.isalnum() or c.isspace()).split())


# -- the demo -------------------------------------------------------------------------------------------


def test_demo_report_adds_up(capsys: pytest.CaptureFixture[str]) -> None:
    """Every request passes every stage once; each call is cached, shared or computed; the provider saw
    exactly the computed ones, once per distinct call; the library's own counters agree."""
    report = demo_json(capsys)
    requests = report["requests"]
    assert requests == 240
    expected = expected_provider_calls(DemoConfig(requests=240, seed=11))
    for stage in report["stages"]:
        outcomes = stage["outcomes"]
        computed = outcomes.get(COMPUTED, 0)
        semantic = outcomes.get(SEMANTIC, 0) + outcomes.get(EXACT, 0)  # misses of the exact cache answered anyway
        assert set(outcomes) <= ({CACHED, SHARED, COMPUTED, SEMANTIC, EXACT} if stage["name"] == "complete"
                                 else {CACHED, SHARED, COMPUTED})
        assert stage["calls"] == sum(outcomes.values()) == requests
        assert computed + semantic == expected[stage["name"]]
        if stage["name"] != "embed":  # the embedding provider is called once per batch (below)
            assert stage["provider_calls"] == computed
        assert stage["avoided"] == requests - computed > 0
        info = stage["cache_info"]
        assert info["misses"] == computed + semantic
        assert info["hits"] == outcomes.get(CACHED, 0) + outcomes.get(SHARED, 0)
        assert info["hits_by_tier"].get("in-flight", 0) == outcomes.get(SHARED, 0)
        # The library counts the declared cost of tier hits; the demo counts what each call would have cost.
        assert info["cost_saved"] == pytest.approx(stage["cost_saved"].get(CACHED, 0.0), rel=1e-9)
        assert stage["latency"][COMPUTED]["p50"] <= stage["latency"][COMPUTED]["p95"]
        assert stage["latency"][CACHED]["p50"] is not None
    # Computed calls: the embedding provider served them in fewer requests (batches), the others one each.
    assert report["provider_calls"] == sum(s["outcomes"].get(COMPUTED, 0) for s in report["stages"])
    assert report["provider_calls"] + report["avoided_calls"] == 3 * requests
    assert report["cost_spent"] == pytest.approx(sum(s["cost_spent"] for s in report["stages"]))
    assert report["cost_saved"] == pytest.approx(sum(sum(s["cost_saved"].values()) for s in report["stages"]))
    assert sum(report["requests_by_outcome"].values()) == requests
    assert report["time_saved"] > 0


def test_demo_reports_batching_rate_limiting_and_semantic_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """The numbers of the other three decorators agree with the stage outcomes and the request stream."""
    report = demo_json(capsys)
    embed, _, complete = report["stages"]
    # Batching: every computed embedding went to the provider in a batch; batches x mean size = items.
    batching = embed["details"]
    assert batching["items"] == embed["outcomes"][COMPUTED]
    assert embed["provider_calls"] == batching["batches"] <= batching["items"]
    assert batching["batches"] * batching["mean_batch_size"] == pytest.approx(batching["items"])
    assert batching["fill_ratio"] == pytest.approx(batching["mean_batch_size"] / batching["max_batch_size"])
    # Rate limiting: only calls that reached the LLM were admitted (hits never wait); each at once or after waiting.
    limits = complete["details"]
    assert limits["admitted"] == complete["outcomes"][COMPUTED] == complete["provider_calls"]
    assert limits["admitted"] == limits["immediate"] + limits["waited"]
    assert limits["timeouts"] == 0
    # Semantic layer: exact + semantic + computed = the LLM stage's requests; re-cased variants hit.
    outcomes = complete["outcomes"]
    exact = outcomes.get(CACHED, 0) + outcomes.get(SHARED, 0) + outcomes.get(EXACT, 0)
    assert exact + outcomes.get(SEMANTIC, 0) + outcomes[COMPUTED] == complete["calls"] == report["requests"]
    assert outcomes.get(SEMANTIC, 0) > 0
    semantic_info = limits["semantic_cache"]
    assert semantic_info["semantic_hits"] == outcomes.get(SEMANTIC, 0)
    # A question differing only in case or punctuation is answered semantically, so the LLM computes at least
    # one answer per distinct wording of a question, and no more than one per distinct call.
    requests = build_requests(DemoConfig(requests=240, seed=11))
    wordings = len({(same_words(r.question), r.collection, r.model, r.temperature) for r in requests})
    assert wordings <= outcomes[COMPUTED] < expected_provider_calls(DemoConfig(requests=240, seed=11))["complete"]


def test_constant_cost_stage_saves_hits_times_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """The vector search costs the same per query: spent = computed x price, saved = avoided x price."""
    from cachelayers.demo.pipeline import _SEARCH_PRICE

    report = demo_json(capsys)
    (search,) = [s for s in report["stages"] if s["name"] == "search"]
    assert search["cost_spent"] == pytest.approx(search["outcomes"][COMPUTED] * _SEARCH_PRICE)
    assert sum(search["cost_saved"].values()) == pytest.approx(search["avoided"] * _SEARCH_PRICE)


@pytest.mark.anyio
async def test_cost_spent_plus_saved_is_the_cost_without_a_cache() -> None:
    """Spent + saved equals the bill of the same stream sent straight to the providers (no cache).

    Without re-worded questions: a semantic answer is priced at what its stored answer cost, which a re-worded
    prompt would not cost exactly."""
    config = DemoConfig(requests=150, seed=5, concurrency=4, latency_scale=0.0, variant_fraction=0.0)
    report = await run_demo(config)
    uncached = default_stages(config)
    bill = 0.0
    for request in build_requests(config):
        context: dict[str, Any] = {}
        for stage in uncached:
            result = await stage.uncached(*stage.arguments(request, context))
            context[stage.name] = result
            bill += result["cost"]
    assert sum(s.provider.calls for s in uncached) == 3 * config.requests
    assert report.cost_spent + report.cost_saved == pytest.approx(bill, rel=1e-9)
    assert 0 < report.cost_saved < bill


def test_demo_replays_the_same_stream_for_the_same_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """Equal seeds: equal provider calls and spend (--fresh: the cache starts empty each run); another seed
    differs."""
    first, second = demo_json(capsys, "--fresh"), demo_json(capsys, "--fresh")
    for a, b in zip(first["stages"], second["stages"], strict=True):
        assert a["outcomes"][COMPUTED] == b["outcomes"][COMPUTED]
        assert a["cost_spent"] == pytest.approx(b["cost_spent"], rel=1e-12)
    assert build_requests(DemoConfig(seed=11, requests=50)) == build_requests(DemoConfig(seed=11, requests=50))
    assert build_requests(DemoConfig(seed=11, requests=50)) != build_requests(DemoConfig(seed=12, requests=50))


def test_second_run_on_the_default_tiers_computes_nothing(
    capsys: pytest.CaptureFixture[str], demo_cache_home: Any,
) -> None:
    """By default the demo keeps its entries in memory over disk under $XDG_CACHE_HOME: a second run with an
    empty memory tier (as in a new process) is answered from disk, and no provider is called."""
    cold = demo_json(capsys)
    assert set(cold["tiers"]) == {"memory", "disk"}
    assert str(demo_cache_home / "cachelayers" / "demo") in cold["tiers"]["disk"]
    reset_settings()  # a new engine: an empty memory tier over the same disk
    warm = demo_json(capsys)
    for before, after in zip(cold["stages"], warm["stages"], strict=True):
        assert after["outcomes"].get(COMPUTED, 0) == 0
        assert after["outcomes"].get(SEMANTIC, 0) == 0
        assert after["provider_calls"] == 0
        # Each distinct call missed the exact cache once in the first run; now it is read from disk once.
        assert after["cache_info"]["hits_by_tier"]["disk"] == before["cache_info"]["misses"]
    assert warm["cost_spent"] == 0
    assert warm["cost_saved"] == pytest.approx(cold["cost_spent"] + cold["cost_saved"])
    # --fresh removes the demo's entries first: the third run computes like the first.
    reset_settings()
    fresh = demo_json(capsys, "--fresh")
    assert [s["outcomes"][COMPUTED] > 0 for s in fresh["stages"]] == [True, True, True]


def test_demo_prints_a_readable_report(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, *DEMO_ARGS, "--quiet")
    assert status == 0
    for text in ("embed", "search", "complete", "hit rate", "provider calls:", "avoided", "spent", "saved",
                 "single-flight", "cached p50 / p95", "hits by tier", "memory", "embed batching:", "batches",
                 "mean size", "complete rate limit:", "waited", "answers by level: exact", "semantic"):
        assert text in out


def test_zipf_stream_repeats_popular_questions() -> None:
    """The stream mixes repeats and new questions: the top question is frequent, most are rare."""
    requests = build_requests(DemoConfig(requests=2000, seed=1))
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.question] = counts.get(r.question, 0) + 1
    top = max(counts.values())
    assert top >= 40  # the most popular question is asked again and again
    assert 0.05 < sum(1 for r in requests if "ticket" in r.question) / len(requests) < 0.15
    assert len(counts) < len(requests) * 0.8


# -- stats ----------------------------------------------------------------------------------------------


def test_stats_shows_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "stats")
    assert status == 0
    assert "memory://?max_entries=10000&max_bytes=64MiB" in out
    assert "0 of 10,000 entries" in out
    status, out, _ = run_cli(capsys, "stats", "--json")
    assert status == 0
    assert json.loads(out)["tiers"]["memory"]["max_entries"] == 10_000


# -- bad usage and bad configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["stats"], ["demo", "--quiet", "--requests", "5"], ["invalidate", "--tag", "t"]])
@pytest.mark.parametrize(("variable", "value", "named"), [
    ("CACHELAYERS_TIERS", "bogus://", "CACHELAYERS_TIERS"),
    ("CACHELAYERS_TIERS", "memory://?max_entries=-3", "max_entries"),
    ("CACHELAYERS_DEFAULT_TTL", "-5s", "CACHELAYERS_DEFAULT_TTL"),
    ("CACHELAYERS_TIRES", "memory://", "CACHELAYERS_TIRES"),
])
def test_bad_configuration_exits_2_naming_the_field(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], variable: str, value: str,
    named: str,
) -> None:
    monkeypatch.setenv(variable, value)
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert "configuration error" in err
    assert named in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize(("argv", "message"), [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--requests", "0", "--quiet"], "requests=0"),
    (["demo", "--requests", "many"], "invalid int value"),
    (["invalidate"], "at least one --tag or --namespace"),
    (["bench", "no-such-benchmark"], "unknown benchmark"),
])
def test_bad_usage_exits_2_with_a_message(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert message in err
    assert "Traceback" not in err + out


def test_console_script_runs_main_without_traceback() -> None:
    """The installed entry point is `cachelayers.cli:main`; run as a process, a bad config exits 2 cleanly."""
    (entry,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "cachelayers"]
    assert entry.value == "cachelayers.cli:main"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHELAYERS_")}
    env["CACHELAYERS_TIERS"] = "bogus://"
    done = subprocess.run([sys.executable, "-m", "cachelayers.cli", "stats"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "CACHELAYERS_TIERS" in done.stderr
    assert "unknown scheme 'bogus'" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    for name in ("demo", "stats", "invalidate", "bench"):
        assert name in out
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0
    assert out.startswith("cachelayers ")


# -- invalidate and stats against a tier below memory ------------------------------------------------------


class RecordingBackend(Backend):
    """A lower tier that records what it is asked to do, or fails every operation when told to."""

    schemes = ("clirecord",)
    options = frozenset({"fail"})
    deleted_tags: ClassVar[list[tuple[str, ...]]] = []

    def _check(self) -> None:
        if self.url.options.get("fail") == "1":
            raise ConnectionError("tier is down")

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check()
        return [None for _ in keys]

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        self._check()

    async def delete_many(self, keys: Sequence[str]) -> None:
        self._check()

    async def delete_tags(self, tags: Sequence[str]) -> None:
        self._check()
        RecordingBackend.deleted_tags.append(tuple(tags))

    async def clear(self) -> None:
        self._check()


@pytest.fixture
def recording_tier(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[RecordingBackend]]:
    register_backend("clirecord", f"{__name__}:RecordingBackend")
    RecordingBackend.deleted_tags.clear()
    yield RecordingBackend
    unregister_backend("clirecord")


def test_invalidate_reaches_every_lower_tier(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, recording_tier: type[RecordingBackend],
) -> None:
    monkeypatch.setenv("CACHELAYERS_TIERS", "memory://,shared=clirecord://somewhere")
    status, out, err = run_cli(capsys, "invalidate", "--tag", "collection:faq", "--tag", "model:x",
                               "--namespace", "app.answer")
    assert status == 0, err
    engine = TieredCache(get_settings())  # only to name the tags as the engine stores them in lower tiers
    assert recording_tier.deleted_tags == [engine.tier_tags(["collection:faq", "model:x"]),
                                           engine.tier_tags([namespace_tag("app.answer")])]
    assert "on shared" in out


def test_invalidate_on_a_failing_tier_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, recording_tier: type[RecordingBackend],
) -> None:
    monkeypatch.setenv("CACHELAYERS_TIERS", "memory://,shared=clirecord://somewhere?fail=1")
    status, _, err = run_cli(capsys, "invalidate", "--namespace", "app.answer")
    assert status == 1
    assert "invalidation failed on tier(s) shared" in err


def test_invalidate_with_only_memory_says_there_is_nothing_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "invalidate", "--tag", "t")
    assert status == 0
    assert "nothing to do" in out


def test_stats_probes_lower_tiers_and_exits_1_when_one_is_down(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, recording_tier: type[RecordingBackend],
) -> None:
    monkeypatch.setenv("CACHELAYERS_TIERS", "memory://,up=clirecord://a,down=clirecord://b?fail=1")
    status, out, _ = run_cli(capsys, "stats")
    assert status == 1
    assert "up  clirecord://a  RecordingBackend: reachable" in out
    assert "down  clirecord://b?fail=1  RecordingBackend: UNREACHABLE (ConnectionError: tier is down)" in out


# -- bench ---------------------------------------------------------------------------------------------------


def test_bench_lists_and_runs_the_memory_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "bench", "--list")
    assert status == 0
    assert any(line.startswith("memory ") for line in out.splitlines())
    # One tiny round as a subprocess: proves the script runs; its timings are not checked.
    done = subprocess.run(
        [sys.executable, "-m", "cachelayers.cli", "bench", "memory",
         "--args=--rounds 1 --hit-calls 200 --miss-calls 200 --budget-ms 2 --no-fill --json"],
        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout.split("\n", 1)[1])
    assert {"floor: async def + dict", "cachelayers"} <= set(document["results"])
    assert all(not r["problems"] for r in document["results"].values())



# -- the demo over a shared tier ---------------------------------------------------------------------------


@pytest.mark.redis
def test_demo_over_redis_is_warm_for_a_fresh_memory_tier(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str,
) -> None:
    """A second run with an empty memory tier (as in a new process) is answered from Redis: each distinct
    call is read there once, then served from memory; nothing reaches a provider."""
    monkeypatch.setenv("CACHELAYERS_TIERS", f"memory://,redis={redis_url}")
    monkeypatch.setenv("CACHELAYERS_TIER_TIMEOUT", "5s")  # a slow first connection must not count as a miss
    cold = demo_json(capsys)
    reset_settings()  # a new engine: an empty memory tier over the same Redis
    warm = demo_json(capsys)
    for before, after in zip(cold["stages"], warm["stages"], strict=True):
        assert after["outcomes"].get(COMPUTED, 0) == 0
        assert after["cost_spent"] == 0
        assert after["cache_info"]["hits_by_tier"]["redis"] == before["cache_info"]["misses"]
    assert warm["cost_saved"] == pytest.approx(cold["cost_spent"] + cold["cost_saved"])


# -- stats and invalidate on real shared tiers: entries and bytes per namespace ------------------------------


SHARED_KINDS = [pytest.param("redis", marks=pytest.mark.redis), pytest.param("disk", marks=pytest.mark.disk),
                pytest.param("memcached", marks=pytest.mark.memcached)]


def _shared_url(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if kind == "disk":
        return f"disk://{tmp_path}/tier"
    return str(request.getfixturevalue(f"{kind}_url"))


def _fill(url: str, calls: dict[str, int]) -> None:
    """Store ``calls[namespace]`` entries of each namespace (and one of the key/value API) in the tier."""
    import anyio

    from cachelayers import Settings, multilevel_cached

    async def fill() -> None:
        cache = TieredCache(Settings(tiers={"shared": url}))
        for namespace, count in calls.items():
            @multilevel_cached(cache=cache, namespace=namespace, tags=lambda x: ["even" if x % 2 == 0 else "odd"])
            async def value(x: int) -> str:
                return "v" * 100 + str(x)

            for x in range(count):
                await value(x)
        await cache.set("plain", "no namespace")
        await cache.aclose()

    anyio.run(fill)


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_stats_shows_entries_and_bytes_per_namespace(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = _shared_url(kind, request, tmp_path)
    _fill(url, {"app.answer": 5, "app.embed": 2})
    monkeypatch.setenv("CACHELAYERS_TIERS", f"memory://,shared={url}")
    status, out, err = run_cli(capsys, "stats", "--json")
    assert status == 0, err
    shared = json.loads(out)["tiers"]["shared"]
    assert shared["reachable"] is True
    assert {ns: u["entries"] for ns, u in shared["namespaces"].items()} == {"app.answer": 5, "app.embed": 2}
    assert shared["entries"] == 7
    assert all(u["bytes"] >= 100 * u["entries"] for u in shared["namespaces"].values())
    assert shared["bytes"] == sum(u["bytes"] for u in shared["namespaces"].values())
    status, out, _ = run_cli(capsys, "stats")
    assert status == 0
    assert "7 entries in namespaces" in out
    assert "namespace 'app.answer': 5 entries" in out
    assert "namespace 'app.embed': 2 entries" in out


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_invalidate_reports_how_many_entries_it_removed(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = _shared_url(kind, request, tmp_path)
    _fill(url, {"app.answer": 5, "app.embed": 2})
    monkeypatch.setenv("CACHELAYERS_TIERS", f"memory://,shared={url}")
    status, out, err = run_cli(capsys, "invalidate", "--namespace", "app.answer", "--tag", "even",
                               "--namespace", "nobody.home")
    assert status == 0, err
    assert "shared: namespace 'app.answer': 5 entries removed" in out
    assert "shared: tag 'even': 4 entries removed" in out  # x = 0, 2, 4 of app.answer and x = 0 of app.embed
    assert "shared: namespace 'nobody.home': 0 entries removed" in out
    status, out, _ = run_cli(capsys, "stats", "--json")
    namespaces = json.loads(out)["tiers"]["shared"]["namespaces"]
    assert {ns: u["entries"] for ns, u in namespaces.items()} == {"app.embed": 1}


@pytest.mark.parametrize(("argv", "message"), [
    (["--tag", ""], "--tag must not be empty"),
    (["--namespace", "  "], "--namespace must not be empty"),
    (["--tag", "ns\x1fapp.answer"], "reserved for namespace tags; use --namespace 'app.answer'"),
    (["--namespace", " app.answer"], "starts or ends with white space"),
    (["--tag", "a\x1fb"], "contains a control character"),
    (["--namespace", "app\nanswer"], "contains a control character"),
])
def test_invalidate_refuses_bad_and_reserved_names_before_touching_a_tier(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    recording_tier: type[RecordingBackend],
) -> None:
    monkeypatch.setenv("CACHELAYERS_TIERS", "memory://,shared=clirecord://somewhere")
    status, out, err = run_cli(capsys, "invalidate", "--tag", "fine", *argv)
    assert status == 2
    assert message in err
    assert "Traceback" not in err + out
    assert recording_tier.deleted_tags == []


def test_invalidate_says_when_a_tier_cannot_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, recording_tier: type[RecordingBackend],
) -> None:
    monkeypatch.setenv("CACHELAYERS_TIERS", "memory://,shared=clirecord://somewhere")
    status, out, _ = run_cli(capsys, "invalidate", "--tag", "t")
    assert status == 0
    assert "shared: tag 't': entries not counted (the tier cannot list them)" in out


def test_python_dash_m_cachelayers_runs_the_command() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(__import__("pathlib").Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "cachelayers", "--version"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cachelayers ")
    done = subprocess.run([sys.executable, "-m", "cachelayers", "invalidate"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 2
    assert "needs at least one --tag or --namespace" in done.stderr
