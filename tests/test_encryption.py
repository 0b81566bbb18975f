"""Encryption at rest: no stored byte tells a prompt, an answer, a text or a vector; keys rotate; tampering is a miss.

Every store test runs twice: without keys the marker strings *are* found in the raw bytes (the scan works), with
keys they are not. Redis tests run against the real server of tests/conftest.py.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

import cachelayers
from cachelayers import (
    ConfigError,
    HashingEmbedder,
    IntegrityError,
    MissingDependencyError,
    Settings,
    StoreItem,
    TieredCache,
    explain,
    multilevel_cached,
    semantic_cached,
)
from cachelayers.backends.memory import MemoryBackend
from cachelayers.codec import Codec
from cachelayers.embedders import validate_embeddings
from tests.conftest import FakeClock
from tests.memcached_server import MemcachedServer

K1 = os.urandom(32)
K2 = os.urandom(32)
KEYS = f"k1:{base64.b64encode(K1).decode()}"
pytestmark = pytest.mark.anyio

PROMPT = "MARKER-PROMPT-4b1f how do I reset the password of my router"
ANSWER = "MARKER-ANSWER-9c2e unplug it for thirty seconds"


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client: the Redis tiers run on asyncio."""
    return "asyncio"


def redis_bytes(url: str) -> bytes:
    """Every key name and every stored byte of the database, read type by type (not DUMP, which compresses)."""
    client: Any = redis.Redis.from_url(url)  # replies are bytes (no decode_responses)
    out: list[Any] = []
    for key in client.scan_iter(match="*"):
        out.append(key)
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            out += [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"stream":
            out += [b for _, data in client.xrange(key) for pair in data.items() for b in pair]
        elif kind == b"list":
            out += client.lrange(key, 0, -1)
    client.close()
    return b"\x00".join(out)


def file_bytes(directory: Path) -> bytes:
    """Every byte of every file under ``directory`` (SQLite files, their logs, snapshots)."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def vector_bytes(text: str) -> bytes:
    """A 16-byte stretch of the float32 vector the default embedder gives ``text``."""
    vector = validate_embeddings(HashingEmbedder()([text]), 1)[0]
    nonzero = int(np.flatnonzero(vector)[0])
    return np.ascontiguousarray(vector[nonzero:nonzero + 4], dtype=np.float32).tobytes()


def protection(encrypted: bool) -> dict[str, Any]:
    return {"encryption_keys": KEYS} if encrypted else {"secret": "a-secret-of-32-bytes-for-signing"}


ENCRYPTED = pytest.mark.parametrize("encrypted", [False, True], ids=["signed", "encrypted"])


# -- the exact tiers ----------------------------------------------------------------------------------------


async def exact_round_trip(settings: Settings) -> TieredCache:
    cache = TieredCache(settings)
    computed: list[str] = []

    @multilevel_cached(cache=cache, ttl=600)
    async def answer(prompt: str) -> dict[str, str]:
        computed.append(prompt)
        return {"prompt": prompt, "answer": ANSWER}

    assert await answer(PROMPT) == {"prompt": PROMPT, "answer": ANSWER}
    assert cache.local is not None
    cache.local.clear_now()
    assert await answer(PROMPT) == {"prompt": PROMPT, "answer": ANSWER}  # read back from below, decrypted
    assert computed == [PROMPT]
    assert await cache.set("kv", f"{PROMPT} {ANSWER}")
    cache.local.clear_now()
    assert await cache.get("kv") == f"{PROMPT} {ANSWER}"
    return cache


@pytest.mark.redis
@ENCRYPTED
async def test_redis_tier_holds_no_plaintext_with_keys(redis_url: str, encrypted: bool) -> None:
    cache = await exact_round_trip(Settings(tiers={"memory": "memory://", "redis": redis_url},
                                            **protection(encrypted)))
    await cache.aclose()
    raw = redis_bytes(redis_url)
    assert (b"MARKER-ANSWER" in raw, b"MARKER-PROMPT" in raw) == (not encrypted, not encrypted)


@ENCRYPTED
async def test_disk_tier_holds_no_plaintext_with_keys(tmp_path: Path, encrypted: bool) -> None:
    cache = await exact_round_trip(Settings(tiers={"memory": "memory://", "disk": f"disk://{tmp_path}"},
                                            **protection(encrypted)))
    await cache.aclose()
    raw = file_bytes(tmp_path)
    assert (b"MARKER-ANSWER" in raw, b"MARKER-PROMPT" in raw) == (not encrypted, not encrypted)


def memcached_bytes(server: MemcachedServer) -> bytes:
    """Every key and stored byte of a memcached, listed with ``lru_crawler metadump`` and read with ``get``."""
    dump = server.command("lru_crawler metadump all").decode()
    keys = [unquote(part[4:]) for line in dump.splitlines() for part in line.split() if part.startswith("key=")]
    assert keys, "the memcached holds no entry: the scan would prove nothing"
    return b"\x00".join(key.encode() + b"\x00" + server.command(f"get {key}") for key in keys)


@pytest.mark.memcached
@ENCRYPTED
async def test_memcached_tier_holds_no_plaintext_with_keys(memcached_server: MemcachedServer, memcached_url: str,
                                                           encrypted: bool) -> None:
    cache = await exact_round_trip(Settings(tiers={"memory": "memory://", "memcached": memcached_url},
                                            **protection(encrypted)))
    await cache.aclose()
    raw = memcached_bytes(memcached_server)
    assert (b"MARKER-ANSWER" in raw, b"MARKER-PROMPT" in raw) == (not encrypted, not encrypted)


# -- the semantic stores ------------------------------------------------------------------------------------


def semantic() -> Any:
    @semantic_cached(threshold=0.8, name="enc.ask")
    async def ask(question: str, tenant: str) -> dict[str, str]:
        return {"q": question, "answer": ANSWER}

    return ask


async def semantic_round_trip() -> None:
    ask = semantic()
    assert await ask(PROMPT, "t") == {"q": PROMPT, "answer": ANSWER}
    await ask.aclose()
    again = semantic()
    with explain() as info:
        assert await again(PROMPT + "?", "t") == {"q": PROMPT, "answer": ANSWER}
        assert await again(PROMPT, "t") == {"q": PROMPT, "answer": ANSWER}
    assert [lookup.level for lookup in info] == ["semantic", "exact"]  # decrypted texts and vectors
    await again.aclose()


@ENCRYPTED
async def test_semantic_files_hold_no_plaintext_text_or_vector_with_keys(tmp_path: Path, encrypted: bool) -> None:
    cachelayers.configure(vector_index=f"usearch://{tmp_path / 'semantic'}",
                          tiers={"memory": "memory://", "disk": f"disk://{tmp_path / 'tier'}"},
                          **protection(encrypted))
    await semantic_round_trip()
    raw = file_bytes(tmp_path)
    found = (b"MARKER-ANSWER" in raw, b"MARKER-PROMPT" in raw, vector_bytes(PROMPT) in raw)
    assert found == (not encrypted,) * 3


@pytest.mark.redis
@ENCRYPTED
async def test_shared_redis_holds_no_plaintext_text_or_vector_with_keys(redis_url: str, encrypted: bool) -> None:
    cachelayers.configure(vector_index=redis_url, tiers={"memory": "memory://", "redis": redis_url},
                          **protection(encrypted))
    await semantic_round_trip()
    raw = redis_bytes(redis_url)
    found = (b"MARKER-ANSWER" in raw, b"MARKER-PROMPT" in raw, vector_bytes(PROMPT) in raw)
    assert found == (not encrypted,) * 3


# -- keys: rotation, unknown ids, tampering -------------------------------------------------------------------


def two_tier(clock: FakeClock, lower: MemoryBackend, keys: Any) -> TieredCache:
    return TieredCache(Settings(encryption_keys=keys), backends={"l1": MemoryBackend(clock=clock), "l2": lower},
                       clock=clock)


async def test_rotation_new_key_first_reads_old_entries_and_writes_with_the_new(clock: FakeClock) -> None:
    lower = MemoryBackend(clock=clock)
    old = two_tier(clock, lower, [("k1", K1)])
    assert await old.set("a", "written under k1")
    rotated = two_tier(clock, lower, [("k2", K2), ("k1", K1)])
    assert await rotated.get("a") == "written under k1"
    assert await rotated.set("b", "written under k2")
    only_new = two_tier(clock, lower, {"k2": K2})
    assert await only_new.get("b") == "written under k2"
    assert await only_new.get("a", "miss") == "miss"  # k1 is no longer listed: dropped, counted, no error
    assert only_new.tier_stats()["l2"]["corrupt"] == 1


async def test_unknown_key_id_and_flipped_bits_are_counted_misses(clock: FakeClock) -> None:
    lower = MemoryBackend(clock=clock)
    writer = two_tier(clock, lower, KEYS)
    assert await writer.set("x", "value")
    storage_key = writer.storage_key("x")
    blob = await lower.get_many([storage_key])
    assert blob[0] is not None
    flipped = bytearray(blob[0])
    flipped[-3] ^= 0x01
    await lower.set_many([StoreItem(storage_key, bytes(flipped), None)])
    reader = two_tier(clock, lower, KEYS)
    assert await reader.get("x", "miss") == "miss"
    assert reader.tier_stats()["l2"]["corrupt"] == 1
    stranger = two_tier(clock, lower, {"other": K2})
    await lower.set_many([StoreItem(storage_key, blob[0], None)])
    assert await stranger.get("x", "miss") == "miss"
    assert stranger.tier_stats()["l2"]["corrupt"] == 1


def test_an_entry_moved_to_another_key_or_given_another_expiry_fails_its_tag() -> None:
    codec = Codec(encryption_keys=KEYS)
    blob = codec.seal("cl:f:aaa", "value", 1000.0)
    with pytest.raises(IntegrityError):
        codec.open("cl:f:bbb", blob)
    extended = bytearray(blob)
    extended[4:12] = np.float64(9e9).astype(">f8").tobytes()  # the header's expiry
    with pytest.raises(IntegrityError):
        codec.open("cl:f:aaa", bytes(extended))
    assert codec.open("cl:f:aaa", blob).expires_at == 1000.0


def test_signed_and_plain_entries_are_refused_by_an_encrypting_codec_and_back() -> None:
    encrypting = Codec(encryption_keys=KEYS)
    for other in (Codec(), Codec(secret="a-secret-of-32-bytes-for-signing")):
        with pytest.raises(IntegrityError):
            encrypting.open("k", other.seal("k", 1, None))
        with pytest.raises(IntegrityError):
            other.open("k", encrypting.seal("k", 1, None))


@settings(max_examples=60, deadline=None)
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                          max_leaves=12),
       expires=st.none() | st.floats(0, 1e10), key=st.text(min_size=1, max_size=40), where=st.integers(0, 10_000))
def test_any_value_round_trips_and_any_flipped_byte_is_refused(value: Any, expires: float | None, key: str,
                                                               where: int) -> None:
    codec = Codec(encryption_keys=[("b", K2), ("a", K1)])
    blob = codec.seal(key, value, expires)
    assert codec.open(key, blob).value == value
    assert Codec(encryption_keys={"a": K1, "b": K2}).open(key, blob).value == value
    damaged = bytearray(blob)
    damaged[where % len(blob)] ^= 0x20
    with pytest.raises(IntegrityError):
        codec.open(key, bytes(damaged))


# -- configuration --------------------------------------------------------------------------------------------


def test_keys_parse_from_the_environment_and_never_show() -> None:
    b64 = base64.b64encode(K1).decode()
    loaded = Settings.from_env({"CACHELAYERS_ENCRYPTION_KEYS": f"new:{base64.urlsafe_b64encode(K2).decode()},"
                                                               f" old:{b64}"})
    assert loaded.encryption_keys == (("new", K2), ("old", K1))
    for text in (repr(loaded), str(loaded)):
        assert b64 not in text
        assert base64.b64encode(K2).decode() not in text
        assert "encryption_keys=<2 redacted>" in text


@pytest.mark.parametrize(("value", "field", "says"), [
    ("k1:" + base64.b64encode(os.urandom(16)).decode(), "encryption_keys['k1']", "32 bytes"),
    ("k1:not base64!!", "encryption_keys['k1']", "base64"),
    (f"k1:{base64.b64encode(K1).decode()},k1:{base64.b64encode(K2).decode()}", "encryption_keys", "twice"),
    ("just-a-key", "encryption_keys", "kid:base64key"),
    ({"bad id!": K1}, "encryption_keys", "key ids"),
    (42, "encryption_keys", "kid:base64key"),
])
def test_bad_keys_are_refused_naming_the_field_never_the_key(value: Any, field: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(encryption_keys=value)
    assert info.value.field == field
    assert says in str(info.value)
    if isinstance(value, str) and ":" in value:
        assert value.split(":", 1)[1].split(",")[0] not in str(info.value)


def test_bad_keys_from_the_environment_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"CACHELAYERS_ENCRYPTION_KEYS": "k1:AAAA"})
    assert info.value.field.startswith("CACHELAYERS_ENCRYPTION_KEYS")


@pytest.fixture
def no_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)


@pytest.mark.usefixtures("no_cryptography")
def test_keys_without_cryptography_name_the_field_and_the_extra() -> None:
    with pytest.raises(MissingDependencyError) as info:
        Settings(encryption_keys=KEYS)
    assert info.value.field == "encryption_keys"
    assert "cachelayers[encryption]" in str(info.value)
    assert Settings().encryption_keys == ()  # without keys nothing is imported
