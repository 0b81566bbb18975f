"""Audit records on the ``cachelayers.audit`` logger: invalidations and clears with their actor and outcome,
integrity failures (tampered entries, forged events), configuration changes with secrets redacted."""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio
import msgpack
import pytest
import redis

import cachelayers
from cachelayers import InvalidationError, Settings, TieredCache, audit
from cachelayers.backends import Backend, BackendURL
from cachelayers.backends.memory import MemoryBackend
from cachelayers.exporters import catalogue, samples

pytestmark = pytest.mark.anyio
SECRET = "audit-secret-0123456789"


def _records(caplog: pytest.LogCaptureFixture, event: str | None = None) -> list[dict[str, Any]]:
    found = [r.audit for r in caplog.records if r.name == "cachelayers.audit" and hasattr(r, "audit")]
    return [a for a in found if event is None or a["event"] == event]


class _Down(Backend):
    """A lower tier that fails every operation."""

    schemes = ("auditdown",)

    async def get_many(self, keys: Any) -> list[bytes | None]:
        raise ConnectionError("down")

    async def set_many(self, items: Any) -> None:
        raise ConnectionError("down")

    async def delete_many(self, keys: Any) -> None:
        raise ConnectionError("down")

    async def delete_tags(self, tags: Any) -> None:
        raise ConnectionError("down")

    async def clear(self) -> None:
        raise ConnectionError("down")


async def test_invalidations_and_clears_are_recorded_with_actor_and_outcome(caplog: pytest.LogCaptureFixture,
                                                                            ) -> None:
    cache = TieredCache(Settings())
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    try:
        with audit.actor("alice"):
            await cache.invalidate_tags("prices", "stock")
            await cache.invalidate_namespace("app.answer")
        token = audit.set_actor("bob")
        await cache.delete("k1")
        audit.reset_actor(token)
        await cache.clear()
    finally:
        await cache.aclose()
    got = [(a["event"], a["kind"], a["items"], a["actor"], a["outcome"], a["prefix"]) for a in _records(caplog)]
    assert got == [
        ("invalidate", "tags", ["prices", "stock"], "alice", "ok", "cl:"),
        ("invalidate", "tags", ["ns\x1fapp.answer"], "alice", "ok", "cl:"),
        ("invalidate", "keys", [cache.storage_key("k1")], "bob", "ok", "cl:"),
        ("clear", "clear", [], None, "ok", "cl:"),
    ]
    assert all(a["tiers"] == ["memory"] for a in _records(caplog))


async def test_an_invalidation_that_did_not_land_is_recorded_as_queued(caplog: pytest.LogCaptureFixture) -> None:
    cache = TieredCache(Settings(tier_timeout=0.05), backends={"memory": MemoryBackend(), "down": _Down(BackendURL.parse("auditdown://x"))})
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    try:
        with audit.actor("carol"), pytest.raises(InvalidationError):
            await cache.invalidate_tags("t")
    finally:
        await cache.aclose()
    (record,) = _records(caplog, "invalidate")
    assert record["outcome"] == "queued"
    assert record["tiers"] == ["memory", "down"]
    assert "down" in record["error"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.redis
async def test_a_tampered_entry_and_a_forged_event_are_integrity_records(redis_url: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(tiers={"memory": "memory://", "redis": redis_url}, secret=SECRET)
    cache = TieredCache(settings)
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    attacker = redis.Redis.from_url(redis_url)
    try:
        await cache.set("k", "answer")
        sk = cache.storage_key("k")
        blob = attacker.get(sk)
        assert isinstance(blob, bytes)
        attacker.set(sk, blob[:-1] + bytes([blob[-1] ^ 1]))
        assert cache.local is not None
        cache.local.clear_now()
        assert await cache.get("k") is None
        attacker.publish("cl:~events", msgpack.packb([os.urandom(8), "c", []], use_bin_type=True))
        for _ in range(400):
            if cache.tier_stats()["redis"]["events_dropped"]:
                break
            await anyio.sleep(0.005)
    finally:
        await cache.aclose()
    records = _records(caplog, "integrity")
    assert [r["source"] for r in records] == ["redis", "channel"]
    assert records[0]["target"] == sk
    assert records[1]["target"] == "cl:~events"
    assert all(r.levelno == logging.WARNING for r in caplog.records if getattr(r, "audit", {}).get("event")
               == "integrity")
    assert b"answer" not in b"".join(str(r).encode() for r in records)


def test_configuration_changes_are_recorded_with_secrets_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    with audit.actor("deploy"):
        cachelayers.configure(Settings(tiers={"memory": "memory://", "redis": "redis://:hunter2pass@db:6379/0"},
                                       secret=SECRET))
        cachelayers.configure(default_ttl="1h")
    first, second = _records(caplog, "config")
    assert first["actor"] == "deploy"
    assert first["changes"]["secret"] == "<redacted>"
    text = repr(first) + repr(second) + caplog.text
    assert SECRET not in text
    assert "hunter2pass" not in text
    assert set(second["changes"]) == {"default_ttl"}


async def test_records_are_counted_and_exported(caplog: pytest.LogCaptureFixture) -> None:
    before = audit.counts().get("clear", 0)
    cache = TieredCache(Settings())
    try:
        await cache.clear()
    finally:
        await cache.aclose()
    assert audit.counts()["clear"] == before + 1
    assert catalogue()["cachelayers_audit_events"] is True
    exported = {s.labels["event"]: s.value for s in samples() if s.name == "cachelayers_audit_events"}
    assert exported["clear"] == before + 1


async def test_nothing_is_built_when_the_logger_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the audit logger disabled, records are counted but no log call is made."""
    calls: list[Any] = []
    monkeypatch.setattr(audit.logger, "log", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(audit.logger, "disabled", True)
    cache = TieredCache(Settings())
    try:
        await cache.invalidate_tags("t")
    finally:
        await cache.aclose()
    assert calls == []



# -- sampled access records ---------------------------------------------------------------------------------

ARGUMENT = "argument-value-4242"
PAYLOAD = "payload-answer-9191"
QUESTION = "what is the private question of tenant acme"


def _access_texts(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the access records hold, fields and message."""
    return " ".join(repr(getattr(r, "audit", None)) + r.getMessage() for r in caplog.records
                    if r.name == "cachelayers.audit" and getattr(r, "audit", {}).get("event") == "access")


async def test_rate_one_records_every_access_with_its_fields_and_no_payload(caplog: pytest.LogCaptureFixture) -> None:
    from cachelayers.engines.tiered.control import WATCHING

    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    cachelayers.configure(audit_sample_rate=1.0)
    assert WATCHING[0] >= 1  # callers moved to the watched path while sampling is on

    @cachelayers.multilevel_cached(namespace="audit.exact", ttl=60)
    async def exact(argument: str) -> str:
        return PAYLOAD + argument

    @cachelayers.semantic_cached(threshold=0.8, name="audit.semantic", partition=lambda question, tenant: tenant)
    async def ask(question: str, tenant: str) -> str:
        return PAYLOAD

    with audit.actor("carol"):
        assert await exact(ARGUMENT) == PAYLOAD + ARGUMENT
        assert await exact(ARGUMENT) == PAYLOAD + ARGUMENT
        assert await ask(QUESTION, "acme") == PAYLOAD
        assert await ask(QUESTION, "acme") == PAYLOAD
    await ask.aclose()
    records = _records(caplog, "access")
    assert [(r["decorator"], r["level"]) for r in records] == [
        ("multilevel_cached", "computed"), ("multilevel_cached", "memory"),
        ("semantic_cached", "computed"), ("semantic_cached", "exact")]
    for r in records:
        assert set(r) == {"event", "actor", "namespace", "partition", "level", "decorator", "function", "tier"}
        assert r["actor"] == "carol"
    assert [r["namespace"] for r in records[:2]] == ["audit.exact"] * 2
    assert records[0]["partition"] is None
    assert records[1]["tier"] == "memory"
    partitions = {r["partition"] for r in records[2:]}
    assert len(partitions) == 1
    assert all(isinstance(p, str) and len(p) >= 16 for p in partitions)
    texts = _access_texts(caplog)
    for secret in (ARGUMENT, PAYLOAD, QUESTION, "acme"):
        assert secret not in texts
    assert audit.counts().get("access", 0) >= 4


async def test_rate_zero_records_nothing_and_leaves_the_hit_path_compiled(caplog: pytest.LogCaptureFixture,
                                                                         ) -> None:
    from cachelayers.engines.tiered.control import WATCHING

    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    cachelayers.configure(audit_sample_rate=0.5)
    cachelayers.configure(audit_sample_rate=0)
    assert WATCHING[0] == 0

    @cachelayers.multilevel_cached(namespace="audit.off", ttl=60)
    async def exact(argument: str) -> str:
        return PAYLOAD

    @cachelayers.semantic_cached(threshold=0.8, name="audit.off.semantic")
    async def ask(question: str) -> str:
        return PAYLOAD

    for _ in range(3):
        await exact(ARGUMENT)
        await ask(QUESTION)
    await ask.aclose()
    assert _records(caplog, "access") == []


async def test_a_rate_in_between_records_the_sampled_accesses(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    draws = iter([0.1, 0.9, 0.29, 0.3, 0.7, 0.0])  # under 0.3: the 1st, 3rd and 6th accesses are sampled
    audit.set_random(lambda: next(draws))
    try:
        cachelayers.configure(audit_sample_rate=0.3)

        @cachelayers.multilevel_cached(namespace="audit.sampled", ttl=60)
        async def exact(argument: int) -> int:
            return argument

        for i in range(6):
            await exact(i % 2)  # computed, computed, then memory hits
    finally:
        audit.set_random(None)
    assert [r["level"] for r in _records(caplog, "access")] == ["computed", "memory", "memory"]


def test_a_bad_sample_rate_is_a_config_error_naming_the_field() -> None:
    for bad in (1.5, -0.1, "often", True, float("nan"), None):
        with pytest.raises(cachelayers.ConfigError) as info:
            Settings(audit_sample_rate=bad)
        assert info.value.field == "audit_sample_rate"
    with pytest.raises(cachelayers.ConfigError) as info:
        Settings.from_env({"CACHELAYERS_AUDIT_SAMPLE_RATE": "2"})
    assert info.value.field == "CACHELAYERS_AUDIT_SAMPLE_RATE"
    assert Settings.from_env({"CACHELAYERS_AUDIT_SAMPLE_RATE": "0.25"}).audit_sample_rate == 0.25
    assert Settings().audit_sample_rate == 0.0


async def test_a_tampered_semantic_row_is_an_integrity_record(tmp_path: Any, caplog: pytest.LogCaptureFixture,
                                                               ) -> None:
    import sqlite3

    caplog.set_level(logging.INFO, logger="cachelayers.audit")

    def make() -> Any:
        cachelayers.configure(secret=SECRET, vector_index=f"usearch://{tmp_path}")

        @cachelayers.semantic_cached(threshold=0.8, name="audit.tamper")
        async def ask(question: str) -> str:
            return PAYLOAD

        return ask

    ask = make()
    await ask(QUESTION)
    await ask.aclose()
    db = sqlite3.connect(next(tmp_path.glob("*.sqlite")))
    db.execute("UPDATE entries SET expires_at = 4102444800")
    db.commit()
    db.close()
    again = make()
    await again(QUESTION)
    await again.aclose()
    assert again.cache_info().corrupt == 1
    records = _records(caplog, "integrity")
    assert [(r["source"], r["count"]) for r in records] == [("semantic", 1)]
    assert QUESTION not in repr(records)
    assert PAYLOAD not in repr(records)


async def test_sampling_and_an_explain_block_together_report_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cachelayers.audit")
    draws = iter([0.0, 0.99])  # rate 0.5: the first call is sampled, the second is not
    audit.set_random(lambda: next(draws))
    try:
        cachelayers.configure(audit_sample_rate=0.5)

        @cachelayers.multilevel_cached(namespace="audit.explained", ttl=60)
        async def exact(argument: str) -> str:
            return PAYLOAD

        with cachelayers.explain() as info:
            await exact(ARGUMENT)
            await exact(ARGUMENT)
    finally:
        audit.set_random(None)
    assert [(lookup.level, lookup.tier) for lookup in info] == [("computed", None), ("exact", "memory")]
    assert [r["level"] for r in _records(caplog, "access")] == ["computed"]
