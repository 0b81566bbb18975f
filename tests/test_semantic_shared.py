"""Shared mode on plain Redis and on a 3-node Redis Cluster: a write in one process is found by another within 1 s;
replicas stay in sync; tenants never meet; on a cluster each partition is one hash slot."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachelayers
from cachelayers import explain, semantic_cached
from cachelayers.backends.vectors.redis_commands import COMMANDS_IN_FLIGHT
from cachelayers.backends.vectors.redis_store import RedisStore
from cachelayers.engines.semantic import SemanticStore
from tests.conftest import FakeClock
from tests.redis_server import RedisServer
from tests.test_redis_backend import redis_cluster  # noqa: F401  (the cluster fixture)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "how do I reset the password of my router",
    "what is the boiling point of water on mount everest",
    "which river flows through the city of vienna",
    "how many moons does the planet neptune have",
]


def sync_client(url: str) -> Any:
    """A synchronous client behind the backend's back (a cluster client for ``redis+cluster://``)."""
    if url.startswith("redis+cluster://"):
        return redis.RedisCluster.from_url("redis://" + url.split("://", 1)[1])
    return redis.Redis.from_url(url)


def all_keys(client: Any, pattern: str) -> list[bytes]:
    """Keys matching ``pattern`` on every node."""
    if isinstance(client, redis.RedisCluster):
        found: Any = client.keys(pattern, target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        found = client.keys(pattern)
    return [k if isinstance(k, bytes) else k.encode() for k in found]


def flush(url: str) -> None:
    client = sync_client(url)
    if isinstance(client, redis.RedisCluster):
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        client.flushall()
    client.close()


@pytest.fixture(params=["standalone", "cluster"])
def shared_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The URL of the shared store: the session's redis-server, or a 3-node Redis Cluster (flushed)."""
    if request.param == "standalone":
        return redis_url
    url: str = request.getfixturevalue("redis_cluster")
    flush(url)
    return url


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client: shared mode runs on asyncio."""
    return "asyncio"


def make(url: str, *, sync_interval: float = 0.1, threshold: float = 0.8, **options: Any) -> Any:
    """One 'process': its own engine and replica over the shared Redis."""

    @semantic_cached(threshold=threshold, name="shared.ask", vector_index=f"{url}?sync_interval={sync_interval}",
                     **options)
    async def ask(question: str, tenant: str = "t") -> dict[str, str]:
        return {"q": question, "tenant": tenant}

    return ask


def replica(fn: Any) -> SemanticStore:
    store: SemanticStore = fn.cache._store
    assert isinstance(store.persistence, RedisStore)
    return store


CHILD = textwrap.dedent('''
    import sys, anyio
    from cachelayers import semantic_cached

    url, question = sys.argv[1], sys.argv[2]

    @semantic_cached(threshold=0.8, name="shared.ask", vector_index=url)
    async def ask(question: str, tenant: str = "t") -> dict:
        return {"q": question, "tenant": tenant, "writer": "child"}

    async def main():
        await ask(question)
        await ask.aclose()

    anyio.run(main)
''')


async def test_a_write_in_another_process_is_found_within_one_second(shared_url: str, tmp_path: Path) -> None:
    reader = make(shared_url)
    await reader("warm up the replica")  # opened and synced before the other process writes
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    with anyio.fail_after(120):
        await anyio.run_process([sys.executable, str(script), shared_url, QUESTIONS[0]], cwd=ROOT)
    written = time.monotonic()
    found_after = None
    while time.monotonic() - written < 1.0:
        with explain() as info:
            got = await reader(QUESTIONS[0] + "?")
        if info.last is not None and info.last.level == "semantic":
            assert got == {"q": QUESTIONS[0], "tenant": "t", "writer": "child"}
            found_after = time.monotonic() - written
            break
        await anyio.sleep(0.05)
    assert found_after is not None
    assert found_after < 1.0
    await reader.aclose()


async def test_a_new_process_rebuilds_its_replica_from_redis(shared_url: str) -> None:
    writer = make(shared_url)
    for q in QUESTIONS:
        await writer(q)
    await writer(QUESTIONS[0], tenant="other")
    newcomer = make(shared_url)
    with explain() as info:
        for q in QUESTIONS:
            assert await newcomer(q + "?") == {"q": q, "tenant": "t"}
        assert await newcomer(QUESTIONS[0] + "?", tenant="other") == {"q": QUESTIONS[0], "tenant": "other"}
        assert await newcomer(QUESTIONS[1]) == {"q": QUESTIONS[1], "tenant": "t"}
    assert [lookup.level for lookup in info] == ["semantic"] * 5 + ["exact"]
    assert len(replica(newcomer)) == 5
    await writer.aclose()
    await newcomer.aclose()


async def test_evictions_and_clears_reach_every_replica(shared_url: str) -> None:
    a = make(shared_url, sync_interval=0, max_entries=2)
    b = make(shared_url, sync_interval=0, max_entries=2)
    await a(QUESTIONS[0])
    await a(QUESTIONS[1])
    await b("sync b", tenant="b")  # b's replica now has both (and its own entry, in another partition)
    assert {e.text for e in replica(b).entries.values()} == {QUESTIONS[0], QUESTIONS[1], "sync b"}
    await a(QUESTIONS[2])  # evicts QUESTIONS[0] in Redis
    with explain() as info:
        assert await b(QUESTIONS[0] + "?") == {"q": QUESTIONS[0] + "?", "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "computed"
    assert QUESTIONS[1] not in {e.text for e in replica(b).entries.values()}  # evicted by b's own insert
    await a.cache_clear()
    with explain() as info:
        await b(QUESTIONS[2])
    assert info.last is not None
    assert info.last.level == "computed"
    assert {e.text for e in replica(b).entries.values()} == {QUESTIONS[2]}
    await a.aclose()
    await b.aclose()


async def test_an_entry_removed_elsewhere_is_never_served_even_before_the_replica_syncs(shared_url: str) -> None:
    a = make(shared_url, sync_interval=3600)  # never syncs after opening
    b = make(shared_url, sync_interval=0)
    await b(QUESTIONS[0])
    await a("open a")  # a's replica loads b's entry
    assert QUESTIONS[0] in {e.text for e in replica(a).entries.values()}
    await b.cache_clear()
    with explain() as info:
        assert await a(QUESTIONS[0] + "?") == {"q": QUESTIONS[0] + "?", "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "computed"  # the payload read missed
    await a.aclose()
    await b.aclose()


async def test_a_trimmed_log_makes_a_replica_reload(shared_url: str) -> None:
    a = make(shared_url, sync_interval=0)
    b = make(shared_url, sync_interval=0)
    await b("open b")
    await a(QUESTIONS[0])
    client = sync_client(shared_url)
    [log] = all_keys(client, "*sem:*log")
    client.xtrim(log, maxlen=0)  # b never saw the insert of QUESTIONS[0]
    client.close()
    await a(QUESTIONS[1])
    with explain() as info:
        assert await b(QUESTIONS[0] + "?") == {"q": QUESTIONS[0], "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "semantic"
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("sync_interval", [0, 3600], ids=["syncing", "not-yet-synced"])
async def test_a_redis_that_lost_its_data_never_answers_with_another_question_s_entry(
        shared_url: str, sync_interval: float) -> None:
    """Redis restarted empty (here: flushed) hands entry ids out again; an old replica must not take a new entry
    for the one it knew under that id, whether it has synced since (it reloads) or not (the payload's seal)."""
    cachelayers.configure(secret="s" * 32)  # signed entries: the payload of another entry is signed too
    old = make(shared_url, sync_interval=sync_interval)
    await old(QUESTIONS[0])
    await old(QUESTIONS[1])
    flush(shared_url)
    new = make(shared_url, sync_interval=0)
    await new(QUESTIONS[2])  # takes the id QUESTIONS[0] had, in the same partition
    await new(QUESTIONS[3])
    with explain() as info:
        assert await old(QUESTIONS[0]) == {"q": QUESTIONS[0], "tenant": "t"}
        assert await old(QUESTIONS[1] + "?") == {"q": QUESTIONS[1] + "?", "tenant": "t"}
    assert [lookup.level for lookup in info] == ["computed", "computed"]
    assert await new(QUESTIONS[0]) == {"q": QUESTIONS[0], "tenant": "t"}  # what old computed again is shared
    await old.aclose()
    await new.aclose()


async def test_a_reset_id_counter_never_gives_one_id_to_two_live_entries(shared_url: str) -> None:
    cachelayers.configure(secret="s" * 32)
    a = make(shared_url, sync_interval=0)
    b = make(shared_url, sync_interval=0)
    await a(QUESTIONS[0])
    await a(QUESTIONS[1])
    client = sync_client(shared_url)
    [seq] = all_keys(client, "*sem:*seq")
    client.set(seq, 0)  # a restore of an old dump, or a writer without the secret: no seal is needed for this
    client.close()
    await b(QUESTIONS[2])
    await b(QUESTIONS[3])
    with explain() as info:
        for question in QUESTIONS:
            assert await a(question) == {"q": question, "tenant": "t"}
            assert await b(question) == {"q": question, "tenant": "t"}
    assert [lookup.level for lookup in info] == ["exact"] * 8
    assert len(replica(a)) == len(replica(b)) == 4
    await a.aclose()
    await b.aclose()


def make_slow(url: str) -> tuple[Any, anyio.Event, anyio.Event]:
    """A 'process' whose computation, of the data as it was, waits for ``release`` once it has ``started``."""
    started, release = anyio.Event(), anyio.Event()

    @semantic_cached(threshold=0.8, name="shared.ask", vector_index=f"{url}?sync_interval=0")
    async def slow(question: str, tenant: str = "t") -> dict[str, str]:
        started.set()  # the computation has begun (the store is open, the lookup missed)
        await release.wait()
        return {"q": question, "tenant": tenant, "data": "old"}

    return slow, started, release


async def test_a_computation_that_began_before_a_clear_elsewhere_is_not_stored(shared_url: str) -> None:
    slow, started, release = make_slow(shared_url)

    other = make(shared_url, sync_interval=0)  # another process, over the same entries
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow, QUESTIONS[0])
        await started.wait()
        await other.invalidate_all()  # the data changed while slow was computing
        release.set()
    with explain() as info:
        assert await other(QUESTIONS[0]) == {"q": QUESTIONS[0], "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "computed"  # slow's old answer was not put back after the clear
    assert await slow(QUESTIONS[0]) == {"q": QUESTIONS[0], "tenant": "t"}  # other's new one, exactly
    client = sync_client(shared_url)
    assert len(all_keys(client, "*sem:*:e:*")) == 1  # and slow's dropped entry left no keys behind
    client.close()
    await slow.aclose()
    await other.aclose()


async def test_prefill_stores_after_a_clear_and_a_clear_during_a_computation_wins_over_a_flush(
        shared_url: str) -> None:
    a = make(shared_url, sync_interval=0)
    b = make(shared_url, sync_interval=0)
    await a.invalidate_all()
    await a.invalidate_all()  # the count of clears is 2
    assert await a.prefill([(QUESTIONS[0], {"q": "known answer", "tenant": "t"})]) == 1
    assert await b(QUESTIONS[0] + "?") == {"q": "known answer", "tenant": "t"}

    slow, started, release = make_slow(shared_url)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow, QUESTIONS[1])
        await started.wait()
        flush(shared_url)  # Redis loses its keys: the count of clears starts again, below slow's
        await b.invalidate_all()
        release.set()
    with explain() as info:
        assert await b(QUESTIONS[1]) == {"q": QUESTIONS[1], "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "computed"  # slow's old answer was dropped, though the count went 2 -> 1
    for fn in (a, b, slow):
        await fn.aclose()


async def test_a_replica_that_has_not_synced_since_a_clear_stores_again_after_its_first_dropped_insert(
        shared_url: str) -> None:
    lagging = make(shared_url, sync_interval=3600)
    other = make(shared_url, sync_interval=0)
    await lagging("open lagging")
    await other.invalidate_all()
    await lagging(QUESTIONS[0])  # began before it knew of the clear: dropped, and it syncs at its next call
    await lagging(QUESTIONS[1])
    with explain() as info:
        assert await other(QUESTIONS[1]) == {"q": QUESTIONS[1], "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "exact"
    await lagging.aclose()
    await other.aclose()


class Resized:
    """One embedder name, two models: vectors of ``ndim`` from the words (same words, same vector)."""

    name = "shared.resized"

    def __init__(self, ndim: int) -> None:
        self.size = ndim

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng(sum(map(ord, " ".join(sorted(t.casefold().strip("?").split())))))
                .standard_normal(self.size) for t in texts]
        return np.asarray(rows, dtype=np.float32)


async def test_processes_on_two_dimensions_of_one_embedder_keep_their_own_entries(shared_url: str) -> None:
    """A rolling upgrade of the model under one name: each process compares only vectors of its dimension, and
    none wipes the other's entries."""
    old = make(shared_url, sync_interval=0, embed=Resized(16), cache_embeddings=False)
    await old(QUESTIONS[0])
    new = make(shared_url, sync_interval=0, embed=Resized(32), cache_embeddings=False)
    with explain() as info:
        await new(QUESTIONS[0] + "?")  # the old entry is never compared: computed, and stored at 32
        await new(QUESTIONS[0])
        await old(QUESTIONS[0] + "?")  # the old process still has its own, and skips the new one
    assert [lookup.level for lookup in info] == ["computed", "semantic", "semantic"]
    assert new.cache_info().embed_errors == old.cache_info().embed_errors == 0
    assert {e.text for e in replica(new).entries.values()} == {QUESTIONS[0] + "?"}
    assert {e.text for e in replica(old).entries.values()} == {QUESTIONS[0]}
    await old.aclose()
    await new.aclose()


async def test_ttl_is_absolute_in_shared_mode(shared_url: str) -> None:
    clock = FakeClock(time.time())
    a = make(shared_url, sync_interval=0, ttl=60, clock=clock)
    await a(QUESTIONS[0])
    client = sync_client(shared_url)
    ttls = [client.pttl(k) for k in all_keys(client, "*sem:*e:*")]
    client.close()
    assert len(ttls) == 1
    assert 55_000 < ttls[0] <= 60_000  # Redis expires its copy at the same moment
    clock.advance(30)
    assert await a(QUESTIONS[0] + "?") == {"q": QUESTIONS[0], "tenant": "t"}
    clock.advance(31)
    with explain() as info:
        await a(QUESTIONS[0] + "?")
    assert info.last is not None
    assert info.last.level == "computed"
    await a.aclose()


async def test_an_unreachable_redis_makes_calls_proceed_uncached() -> None:
    fn = make("redis://127.0.0.1:1/0")
    with explain() as info:
        assert await fn(QUESTIONS[0]) == {"q": QUESTIONS[0], "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "uncached"
    assert fn.cache_info().index_errors == 1


tenants = st.sampled_from(["acme", "globex"])
texts = st.sampled_from(["reset password", "reset my password", "delete account", "delete my account"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1), tenants, texts), min_size=1, max_size=12))
def test_no_call_is_ever_answered_from_another_tenant_in_shared_mode(shared_url: str,
                                                                     calls: list[tuple[int, str, str]]) -> None:
    async def run() -> None:
        flush(shared_url)
        # Threshold 0: any entry of the partition answers, so a leak between tenants would show.
        processes = [make(shared_url, sync_interval=0, threshold=0.0), make(shared_url, sync_interval=0, threshold=0.0)]
        for process, tenant, text in calls:
            fn = processes[process]
            got = await fn(text, tenant)
            assert got["tenant"] == tenant
        for fn in processes:
            await fn.aclose()

    cachelayers.reset_settings()
    anyio.run(run)


async def test_on_a_cluster_each_partition_is_one_hash_slot_and_partitions_spread(
        redis_cluster: str) -> None:  # noqa: F811  (the fixture imported above)
    """Every key of one partition hashes to one slot (its scripts are valid on a cluster); 12 tenants use
    several slots on several nodes; the function's own keys (id counter, log, live set) share one slot."""
    from redis.crc import key_slot

    flush(redis_cluster)
    fn = make(redis_cluster, sync_interval=0)
    tenants = [f"tenant-{i}" for i in range(12)]
    for tenant in tenants:
        for q in QUESTIONS[:2]:
            await fn(q, tenant)
    client = sync_client(redis_cluster)
    keys = [k.decode() for k in all_keys(client, "*sem:*")]
    by_tag: dict[str, set[int]] = {}
    for key in keys:
        tag = key[key.index("{") + 1:key.index("}")]
        by_tag.setdefault(tag, set()).add(key_slot(key.encode()))
    function_tags = [t for t in by_tag if ":" not in t]
    partition_tags = [t for t in by_tag if ":" in t]
    assert len(function_tags) == 1
    assert len(partition_tags) == len(tenants)
    assert all(len(slots) == 1 for slots in by_tag.values())  # one slot per partition (and for the function)
    partition_slots = {next(iter(by_tag[t])) for t in partition_tags}
    assert len(partition_slots) == len(tenants)
    owners = {client.get_node_from_key(f"{{{t}}}").name for t in partition_tags}
    assert len(owners) >= 2  # spread over the nodes
    entries = [k for k in keys if ":e:" in k]
    assert len(entries) == 2 * len(tenants)
    client.close()
    with explain() as info:
        for tenant in tenants:
            assert await fn(QUESTIONS[1] + "?", tenant) == {"q": QUESTIONS[1], "tenant": tenant}
    assert [lookup.level for lookup in info] == ["semantic"] * len(tenants)
    await fn.cache_clear()
    client = sync_client(redis_cluster)
    assert [k for k in all_keys(client, "*sem:*") if b":e:" in k or k.endswith(b"}:p")] == []
    client.close()
    await fn.aclose()


async def test_a_checked_answer_that_disagrees_is_stored_for_the_other_processes(shared_url: str) -> None:
    flush(shared_url)  # nothing an earlier test stored under this name can answer first
    policy = cachelayers.AnswerAgreement(0.02, seed=0)
    checker = make(shared_url, threshold=0.5, agreement=policy)
    first, second = "How do I reset my password?", "How do I reset my password now?"
    assert await checker(first) == {"q": first, "tenant": "t"}
    with explain() as info:
        assert await checker(second) == {"q": second, "tenant": "t"}  # a would-be hit on `first`, checked
    assert info.last is not None
    assert info.last.reason == "checked: the cached answer disagreed"
    assert (policy.checks, policy.disagreements) == (1, 1)
    other = make(shared_url, threshold=0.5)  # another 'process', no checks: finds the checked answer in Redis
    with explain() as info:
        assert await other(second) == {"q": second, "tenant": "t"}
    assert info.last is not None
    assert info.last.level == "exact"
    await checker.aclose()
    await other.aclose()


async def test_redis_killed_while_the_function_runs_still_returns_its_result() -> None:
    """The store fails at the insert (after the function ran): the caller gets the result, the error is counted."""
    server = RedisServer().start()
    try:
        @semantic_cached(threshold=0.8, name="shared.killed", vector_index=f"{server.url}?sync_interval=0.1")
        async def ask(question: str) -> dict[str, str]:
            if question == QUESTIONS[1]:
                server.kill()  # Redis goes away between the lookup and the insert
            return {"q": question}

        assert await ask(QUESTIONS[0]) == {"q": QUESTIONS[0]}
        assert await ask(QUESTIONS[1]) == {"q": QUESTIONS[1]}
        assert ask.cache_info().index_errors >= 1
        assert await ask(QUESTIONS[2]) == {"q": QUESTIONS[2]}  # and the calls after it proceed uncached
        await ask.aclose()
    finally:
        server.kill()


async def test_a_hung_redis_is_left_alone_for_a_while_instead_of_each_call_waiting_out_the_timeout() -> None:
    cachelayers.configure(tier_timeout="50ms", breaker_threshold=3, breaker_cooldown="300ms")
    server = RedisServer().start()
    try:
        @semantic_cached(threshold=0.8, name="shared.hung", vector_index=f"{server.url}?sync_interval=0")
        async def ask(question: str) -> dict[str, str]:
            return {"q": question}

        await ask(QUESTIONS[0])
        server.pause()
        reasons: list[str] = []

        async def one(i: int) -> None:
            with explain() as info:
                assert await ask(f"question number {i}") == {"q": f"question number {i}"}
            assert info.last is not None
            assert info.last.level in ("uncached", "computed")  # computed: its store failed after it ran
            reasons.append(info.last.level)

        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(one, i)
        assert len(reasons) == 300
        counts = ask.cache_info()
        assert counts.index_errors >= 300  # each call's store operation failed, and its result was returned
        # those in flight when it hung waited out the timeout; the others were not sent
        assert counts.index_errors - counts.store_skipped <= COMMANDS_IN_FLIGHT + 3
        server.resume()
        await anyio.sleep(0.4)  # the cool-down: then one call probes, and Redis answers again
        with explain() as info:
            assert await ask(QUESTIONS[1]) == {"q": QUESTIONS[1]}
            assert await ask(QUESTIONS[0] + "?") == {"q": QUESTIONS[0]}
        assert [lookup.level for lookup in info] == ["computed", "semantic"]
        await ask.aclose()
    finally:
        server.kill()


async def test_a_burst_of_misses_waits_for_connections_instead_of_failing(shared_url: str) -> None:
    """More concurrent misses than the client has connections: each call returns its result and each computed
    result is stored (another process finds it as an exact hit)."""
    computed: list[str] = []

    @semantic_cached(threshold=0.8, name="shared.burst", vector_index=f"{shared_url}?sync_interval=0.1")
    async def ask(question: str) -> str:
        computed.append(question)
        await anyio.sleep(0.01)  # the calls overlap: many inserts at once
        return question.upper()

    questions = [f"burst question {i} about {QUESTIONS[i % 4]}" for i in range(300)]
    results: dict[str, str] = {}

    async def one(question: str) -> None:
        results[question] = await ask(question)

    async with anyio.create_task_group() as tg:
        for question in questions:
            tg.start_soon(one, question)
    assert set(results) == set(questions)
    assert all(results[q] == q.upper() for q in computed)
    assert ask.cache_info().index_errors == 0
    assert len(computed) > 100  # a burst of misses, not of hits

    @semantic_cached(threshold=0.8, name="shared.burst", vector_index=f"{shared_url}?sync_interval=0.1")
    async def other(question: str) -> str:
        raise AssertionError("every question was stored by the first process")

    for question in computed[::10]:
        with explain() as info:
            assert await other(question) == question.upper()
        assert info.last is not None
        assert info.last.level == "exact"
    await ask.aclose()
    await other.aclose()
