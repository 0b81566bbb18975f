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

