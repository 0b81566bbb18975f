"""The semantic stores as an attacker sees them: write access to the SQLite file or to Redis, but no secret.

Each test plays one attack of issue 12 (move a row to another tenant, extend its expiry, rewrite or swap a
vector) and checks that the victim's next call is a miss (computed), never the planted answer, and that the
tampered entry is counted in ``cache_info().corrupt``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import cachelayers
from cachelayers import HashingEmbedder, explain, semantic_cached
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

SECRET = "semantic-secret-of-32-bytes-long"
VICTIM = "what is the salary of the chief executive officer"
OTHER = "which river flows through the city of vienna"
ATTACK = "tell me a joke about penguins in the antarctic"


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client: shared mode runs on asyncio (the disk tests need nothing else)."""
    return "asyncio"


def make(vector_index: str, **options: Any) -> Any:
    """One 'process' of an application with a secret."""
    cachelayers.configure(secret=SECRET, vector_index=vector_index)

    @semantic_cached(threshold=0.8, name="tamper.ask", **options)
    async def ask(question: str, tenant: str) -> dict[str, str]:
        return {"q": question, "tenant": tenant}

    return ask


async def level_of(fn: Any, question: str, tenant: str) -> tuple[str, dict[str, str]]:
    with explain() as info:
        answer = await fn(question, tenant)
    assert info.last is not None
    return info.last.level, answer


def rows(path: Path) -> list[tuple[int, bytes, str]]:
    with sqlite3.connect(next(path.glob("*.sqlite"))) as db:
        return [(int(k), bytes(p), str(t)) for k, p, t in db.execute("SELECT key, partition, text FROM entries")]


def execute(path: Path, sql: str, *args: Any) -> None:
    db = sqlite3.connect(next(path.glob("*.sqlite")))
    db.execute(sql, args)
    db.commit()
    db.close()


def drop_snapshot(path: Path) -> None:
    next(path.glob("*.usearch")).unlink()


def damage_snapshot(path: Path) -> None:
    snapshot = next(path.glob("*.usearch"))
    raw = bytearray(snapshot.read_bytes())
    raw[-40] ^= 0x55
    snapshot.write_bytes(bytes(raw))


def unit(text: str) -> np.ndarray:
    vector: np.ndarray = np.asarray(HashingEmbedder()([text]), dtype=np.float32)[0]
    return np.asarray(vector / np.linalg.norm(vector), dtype=np.float32)


# -- the SQLite file ----------------------------------------------------------------------------------------


async def test_a_row_moved_to_another_tenant_is_dropped_not_served(tmp_path: Path) -> None:
    ask = make(f"usearch://{tmp_path}")
    await ask(VICTIM, "alice")
    await ask(OTHER, "bob")  # gives the attacker bob's partition digest
    await ask.aclose()
    by_text = {text: (key, partition) for key, partition, text in rows(tmp_path)}
    alice_key, bob_partition = by_text[VICTIM][0], by_text[OTHER][1]
    execute(tmp_path, "UPDATE entries SET partition = ? WHERE key = ?", bob_partition, alice_key)
    drop_snapshot(tmp_path)

    again = make(f"usearch://{tmp_path}")
    level, answer = await level_of(again, VICTIM, "bob")
    assert (level, answer) == ("computed", {"q": VICTIM, "tenant": "bob"})
    assert again.cache_info().corrupt == 1
    await again.aclose()


async def test_a_row_whose_text_was_rewritten_is_dropped(tmp_path: Path) -> None:
    ask = make(f"usearch://{tmp_path}")
    await ask(VICTIM, "alice")
    await ask.aclose()
    execute(tmp_path, "UPDATE entries SET text = ?", ATTACK)

    again = make(f"usearch://{tmp_path}")
    level, _ = await level_of(again, ATTACK, "alice")
    assert level == "computed"
    assert again.cache_info().corrupt == 1
    await again.aclose()


async def test_an_extended_expiry_does_not_keep_an_entry_in_service(tmp_path: Path, clock: FakeClock) -> None:
    ask = make(f"usearch://{tmp_path}", ttl=60, clock=clock)
    await ask(VICTIM, "alice")
    await ask.aclose()
    execute(tmp_path, "UPDATE entries SET expires_at = expires_at + 365 * 86400")
    clock.advance(120)

    again = make(f"usearch://{tmp_path}", ttl=60, clock=clock)
    level, _ = await level_of(again, VICTIM, "alice")
    assert level == "computed"
    assert again.cache_info().corrupt == 1
    await again.aclose()


async def test_a_rewritten_vector_on_disk_answers_nothing(tmp_path: Path) -> None:
    ask = make(f"usearch://{tmp_path}")
    await ask(VICTIM, "alice")
    await ask.aclose()
    execute(tmp_path, "UPDATE entries SET vector = ?", unit(ATTACK).tobytes())
    drop_snapshot(tmp_path)  # the snapshot would otherwise still hold the true vector

    again = make(f"usearch://{tmp_path}")
    level, answer = await level_of(again, ATTACK, "alice")
    assert (level, answer) == ("computed", {"q": ATTACK, "tenant": "alice"})
    assert again.cache_info().corrupt == 1
    await again.aclose()


async def test_a_tampered_snapshot_is_not_used(tmp_path: Path) -> None:
    """Graph snapshots hold vectors too: one changed without the secret is ignored (graphs rebuilt from rows)."""
    ask = make(f"usearch://{tmp_path}")
    await ask(VICTIM, "alice")
    await ask.aclose()
    damage_snapshot(tmp_path)

    again = make(f"usearch://{tmp_path}")
    level, _ = await level_of(again, VICTIM + "?", "alice")
    assert level == "semantic"  # the true vector, rebuilt from the checked row
    await again.aclose()


# -- shared Redis -------------------------------------------------------------------------------------------


def field(client: redis.Redis, key: bytes, name: str) -> bytes:
    value = client.hget(key, name)
    assert isinstance(value, bytes)
    return value


def entry_keys(client: redis.Redis) -> dict[str, bytes]:
    """Text -> key of every semantic entry hash (texts read from the plain column)."""
    return {field(client, key, "t").decode(): key for key in client.scan_iter(match="*sem:*:e:*")}


@pytest.mark.redis
async def test_a_rewritten_vector_in_redis_answers_nothing(redis_url: str) -> None:
    writer = make(redis_url)
    await writer(VICTIM, "alice")
    await writer.aclose()
    client = redis.Redis.from_url(redis_url)
    key = entry_keys(client)[VICTIM]
    client.hset(key, "v", unit(ATTACK).tobytes())  # "answer any question at similarity 1.0"

    reader = make(redis_url)
    level, answer = await level_of(reader, ATTACK, "alice")
    assert (level, answer) == ("computed", {"q": ATTACK, "tenant": "alice"})
    assert reader.cache_info().corrupt == 1
    assert not client.exists(key)  # dropped for every process
    await reader.aclose()
    client.close()


@pytest.mark.redis
async def test_a_vector_copied_from_another_entry_in_redis_is_refused(redis_url: str) -> None:
    """A well-sealed row of another entry, planted in the victim's hash: bound to the other id, refused."""
    writer = make(redis_url)
    await writer(VICTIM, "alice")
    await writer(ATTACK, "alice")
    await writer.aclose()
    client = redis.Redis.from_url(redis_url)
    keys = entry_keys(client)
    client.hset(keys[VICTIM], mapping={"v": field(client, keys[ATTACK], "v"), "t": ATTACK})
    client.delete(keys[ATTACK])

    reader = make(redis_url)
    level, answer = await level_of(reader, ATTACK + "?", "alice")
    assert (level, answer) == ("computed", {"q": ATTACK + "?", "tenant": "alice"})
    assert reader.cache_info().corrupt == 1
    await reader.aclose()
    client.close()


@pytest.mark.redis
async def test_an_entry_moved_to_another_tenant_in_redis_is_dropped(redis_url: str) -> None:
    writer = make(redis_url)
    await writer(VICTIM, "alice")
    await writer(OTHER, "bob")
    await writer.aclose()
    client = redis.Redis.from_url(redis_url)
    keys = entry_keys(client)
    client.hset(keys[VICTIM], "p", field(client, keys[OTHER], "p"))

    reader = make(redis_url)
    level, answer = await level_of(reader, VICTIM, "bob")
    assert (level, answer) == ("computed", {"q": VICTIM, "tenant": "bob"})
    assert reader.cache_info().corrupt == 1
    await reader.aclose()
    client.close()


@pytest.mark.redis
async def test_an_extended_expiry_in_redis_does_not_keep_an_entry_in_service(redis_url: str) -> None:
    clock = FakeClock(time.time())  # Redis expires the hash on its own clock
    writer = make(redis_url, ttl=60, clock=clock)
    await writer(VICTIM, "alice")
    await writer.aclose()
    client = redis.Redis.from_url(redis_url)
    key = entry_keys(client)[VICTIM]
    later = int((clock() + 365 * 86400) * 1000)
    client.hset(key, "x", str(later))
    client.persist(key)
    for zset in client.scan_iter(match="*sem:*:all"):
        client.zadd(zset, {key.rsplit(b":", 1)[1]: later})
    clock.advance(120)

    reader = make(redis_url, ttl=60, clock=clock)
    level, _ = await level_of(reader, VICTIM, "alice")
    assert level == "computed"
    assert reader.cache_info().corrupt == 1
    await reader.aclose()
    client.close()


@pytest.mark.redis
async def test_a_payload_swapped_between_entries_in_redis_is_a_counted_miss(redis_url: str) -> None:
    writer = make(redis_url)
    await writer(VICTIM, "alice")
    await writer(OTHER, "alice")
    client = redis.Redis.from_url(redis_url)
    keys = entry_keys(client)
    client.hset(keys[OTHER], "d", field(client, keys[VICTIM], "d"))

    level, answer = await level_of(writer, OTHER, "alice")
    assert (level, answer) == ("computed", {"q": OTHER, "tenant": "alice"})
    assert writer.cache_info().corrupt == 1
    await writer.aclose()
    client.close()
