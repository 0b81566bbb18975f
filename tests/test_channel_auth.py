"""The invalidation channel with ``secret=``: forged, unsigned, expired and replayed messages are dropped and
counted; valid ones still work across engines; clears from other processes are coalesced.

The attacker publishes raw bytes on ``<prefix>~events`` with a plain redis client: write access to Redis, no
secret. To know the victim has read the attack, a valid message (a deletion of a marker key by another
engine) is published after it: messages of one channel arrive in order.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgpack
import pytest
import redis

from cachelayers import Settings, TieredCache
from cachelayers.backends.base import MISSING

pytestmark = [pytest.mark.anyio, pytest.mark.redis]
SECRET = "channel-secret-0123456789"
CHANNEL = "cl:~events"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _settings(redis_url: str, **more: Any) -> Settings:
    return Settings(tiers={"memory": "memory://", "redis": redis_url}, **more)


@pytest.fixture
async def engines(redis_url: str) -> AsyncIterator[tuple[TieredCache, TieredCache]]:
    settings = _settings(redis_url, secret=SECRET)
    a, b = TieredCache(settings), TieredCache(settings)
    yield a, b
    await a.aclose()
    await b.aclose()


def _attacker(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _in_memory(cache: TieredCache, key: str) -> bool:
    assert cache.local is not None
    return cache.local.lookup(cache.storage_key(key)) is not MISSING


async def _eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(2000):  # bounded: 10 s
        if check():
            break
        await anyio.sleep(0.005)
    assert check(), what


async def _victim_read_everything(sender: TieredCache, victim: TieredCache) -> None:
    """Publish a valid deletion of a marker after the attack and wait until the victim applied it."""
    await victim.set("marker", 1)
    assert _in_memory(victim, "marker")
    await sender.delete("marker")
    await _eventually(lambda: not _in_memory(victim, "marker"), "the victim applies the valid message")


async def _prepare(a: TieredCache, b: TieredCache) -> None:
    await a.set("warm", 0)
    await b.set("k", "kept")
    assert await b.get("k") == "kept"
    assert _in_memory(b, "k")


def _events(cache: TieredCache) -> dict[str, Any]:
    return cache.tier_stats()["redis"]


async def test_an_unsigned_clear_is_dropped_and_counted(engines: tuple[TieredCache, TieredCache],
                                                         redis_url: str) -> None:
    a, b = engines
    await _prepare(a, b)
    attacker = _attacker(redis_url)
    attacker.publish(CHANNEL, msgpack.packb([os.urandom(8), "c", []], use_bin_type=True))
    attacker.publish(CHANNEL, msgpack.packb([os.urandom(8), "k", [b.storage_key("k")]], use_bin_type=True))
    attacker.publish(CHANNEL, b"not msgpack at all \xff")
    await _victim_read_everything(a, b)
    assert _in_memory(b, "k")  # on the old code the unsigned clear emptied b's memory tier
    assert _events(b)["events_unsigned"] == 3
    assert _events(b)["events_dropped"] == 3


async def test_a_forged_clear_and_a_forged_sequenced_event_are_dropped(engines: tuple[TieredCache, TieredCache],
                                                                       redis_url: str) -> None:
    a, b = engines
    await _prepare(a, b)
    assert b.epochs is not None
    stamp = b.epochs.stamp
    attacker = _attacker(redis_url)
    now = int(time.time() * 1000)
    forged = msgpack.packb([os.urandom(8), "c", [], now, os.urandom(12), os.urandom(20)], use_bin_type=True)
    attacker.publish(CHANNEL, forged)
    attacker.publish(CHANNEL, b"#99999999999999999:" + forged)  # would move b's epochs far ahead
    await _victim_read_everything(a, b)
    assert _in_memory(b, "k")
    assert _events(b)["events_forged"] == 2
    assert stamp <= b.epochs.stamp < 99999999999999999
    assert "c" not in b.epochs.last or b.epochs.last["c"] < 99999999999999999


async def test_a_replayed_valid_deletion_is_dropped(engines: tuple[TieredCache, TieredCache], redis_url: str) -> None:
    """The attacker records a genuine deletion and publishes it again: refused by its (sender, nonce)."""
    a, b = engines
    await _prepare(a, b)
    spy = _attacker(redis_url).pubsub()
    spy.subscribe(CHANNEL)
    spy.get_message(timeout=1)  # the subscription confirmation
    await a.delete("k")
    await _eventually(lambda: not _in_memory(b, "k"), "the genuine deletion is applied")
    recorded = None
    for _ in range(200):
        message = spy.get_message(timeout=0.05)
        if message is not None and message["type"] == "message":
            recorded = message["data"]
            break
    assert recorded is not None
    assert recorded.startswith(b"#")
    spy.close()
    await b.set("k", "again")
    assert _in_memory(b, "k")
    _attacker(redis_url).publish(CHANNEL, recorded)
    await _victim_read_everything(a, b)
    assert _in_memory(b, "k")
    assert _events(b)["events_replayed"] == 1


async def test_a_recorded_message_outside_the_window_is_dropped(redis_url: str) -> None:
    """Replayed to an engine that never saw it, but later than the window: refused as expired."""
    from cachelayers.engines.tiered.events import Events

    settings = _settings(redis_url, secret=SECRET)
    a, b = TieredCache(settings), TieredCache(settings)
    try:
        await _prepare(a, b)
        old = Events(CHANNEL, os.urandom(8), SECRET, 0.0)
        old.clock = lambda: time.time() - 120  # sealed two minutes ago
        _attacker(redis_url).publish(CHANNEL, old.seal("c", []))
        await _victim_read_everything(a, b)
        assert _in_memory(b, "k")
        assert _events(b)["events_expired"] == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_valid_messages_still_invalidate_across_engines(engines: tuple[TieredCache, TieredCache]) -> None:
    a, b = engines
    await _prepare(a, b)
    await b.set("tagged", 1, tags=["t"])
    await a.invalidate_tags("t")
    await _eventually(lambda: not _in_memory(b, "tagged"), "a tag invalidation reaches b")
    await a.clear()
    await _eventually(lambda: not _in_memory(b, "k"), "a clear reaches b")
    assert _events(b)["events_dropped"] == 0
    assert _events(b)["events_received"] >= 2


async def test_a_message_sealed_with_another_secret_is_forged(redis_url: str) -> None:
    from cachelayers.engines.tiered.events import Events

    a = TieredCache(_settings(redis_url, secret=SECRET))
    b = TieredCache(_settings(redis_url, secret=SECRET))
    try:
        await _prepare(a, b)
        other = Events(CHANNEL, os.urandom(8), "another-secret-0123456789", 0.0)
        _attacker(redis_url).publish(CHANNEL, other.seal("c", []))
        await _victim_read_everything(a, b)
        assert _in_memory(b, "k")
        assert _events(b)["events_forged"] == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_without_a_secret_messages_are_unsigned_and_applied(redis_url: str) -> None:
    """The channel without a secret is as before (documented as open): a plain clear empties memory."""
    a, b = TieredCache(_settings(redis_url)), TieredCache(_settings(redis_url))
    try:
        await _prepare(a, b)
        _attacker(redis_url).publish(CHANNEL, msgpack.packb([os.urandom(8), "c", []], use_bin_type=True))
        await _eventually(lambda: not _in_memory(b, "k"), "an unsigned clear is applied without a secret")
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("interval", [0.0, 30.0])
async def test_a_flood_of_clears_every_2ms_is_coalesced(redis_url: str, interval: float) -> None:
    """Forged clears are dropped; valid ones empty the memory tier at most once per interval (plus the first).
    With ``interval=0`` every valid clear is applied: the bound below is what coalescing buys."""
    from cachelayers.engines.tiered.events import Events

    settings = _settings(redis_url, secret=SECRET, channel_clear_interval=interval)
    a, b = TieredCache(settings), TieredCache(settings)
    try:
        await _prepare(a, b)
        attacker = _attacker(redis_url)
        insider = Events(CHANNEL, os.urandom(8), SECRET, 0.0)
        flood = 50
        for _ in range(flood):
            now = int(time.time() * 1000)
            attacker.publish(CHANNEL, msgpack.packb([os.urandom(8), "c", [], now, os.urandom(12), os.urandom(20)],
                                                    use_bin_type=True))
            attacker.publish(CHANNEL, insider.seal("c", []))
            await anyio.sleep(0.002)
        await _victim_read_everything(a, b)
        stats = _events(b)
        assert stats["events_forged"] == flood
        if interval:
            assert stats["clears_applied"] == 1  # the first at once; the rest wait for the interval's end
            assert stats["clears_coalesced"] == flood - 1
        else:
            assert stats["clears_applied"] == flood
    finally:
        await a.aclose()
        await b.aclose()


def test_the_clear_gate_applies_at_most_one_clear_per_interval() -> None:
    """With a fake monotonic clock: a clear every 2 ms for 10 s applies one clear per 1 s window (the latest)."""
    from cachelayers.engines.tiered.events import ClearGate, Events

    events = Events(CHANNEL, b"x" * 8, SECRET, 1.0)
    now = [0.0]
    applied: list[float] = []
    scheduled: list[Callable[[], Any]] = []
    gate = ClearGate(events, lambda: applied.append(now[0]), scheduled.append, lambda s: None,
                     monotonic=lambda: now[0])

    async def trailing() -> None:
        while scheduled:
            job = scheduled.pop()
            now[0] = max(now[0], gate.last + events.clear_interval)
            await job()

    for step in range(5000):
        now[0] = step * 0.002
        gate.clear()
        if scheduled and now[0] >= gate.last + events.clear_interval:
            anyio.run(trailing)
    anyio.run(trailing)
    assert len(applied) <= 11
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(applied))
    assert events.stats.clears_applied == len(applied)
    assert events.stats.clears_coalesced == 4999  # every clear but the first waited for its window's end
