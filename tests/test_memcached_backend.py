"""What the memcached tier does beyond the shared contract (tests/test_backend_contract.py runs that on it).

Memcached forgets keys when it likes and has no sets: the tier's generation record and tag tokens must make
every eviction cost hits only, never serve an invalidated entry. Runs against a real memcached.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachelayers import ConfigError, StoreItem
from cachelayers.backends import create_backend
from cachelayers.backends.memcached import MemcachedBackend, entries
from cachelayers.errors import BackendError
from tests.conftest import FakeClock
from tests.memcached_server import MemcachedServer

pytestmark = [pytest.mark.memcached]


@pytest.fixture
def anyio_backend() -> str:
    """The memcached tier is asyncio-only."""
    return "asyncio"


@pytest.fixture
async def backend(memcached_url: str, clock: FakeClock) -> AsyncIterator[MemcachedBackend]:
    store = create_backend(memcached_url, clock=clock)
    assert isinstance(store, MemcachedBackend)
    yield store
    await store.aclose()


class TestConfiguration:
    @pytest.mark.parametrize(("url", "field"), [
        ("memcached://localhost?namespace=has%20space", "url?namespace"),
        ("memcached://localhost?namespace=" + "n" * 33, "url?namespace"),
        ("memcached://localhost?pool_size=0", "url?pool_size"),
        ("memcached://localhost?pool_size=many", "url?pool_size"),
        ("memcached://localhost?db=1", "url?db"),
        ("memcached://localhost/0", "url"),
        ("memcached://user:pw@localhost", "url"),
    ])
    def test_bad_urls_fail_at_configuration_naming_the_field(self, url: str, field: str) -> None:
        with pytest.raises(ConfigError) as raised:
            create_backend(url)
        assert raised.value.field == field

    def test_defaults(self) -> None:
        store = create_backend("memcached://")
        assert isinstance(store, MemcachedBackend)
        assert (store.host, store.port, store.namespace, store.pool_size) == ("127.0.0.1", 11211, "cl", 4)

    def test_a_tier_url_in_settings(self) -> None:
        from cachelayers import Settings

        with pytest.raises(ConfigError) as raised:
            Settings(tiers={"mc": "memcached://localhost?pool_size=-1"})
        assert "pool_size" in str(raised.value.field)


@pytest.mark.anyio
class TestTokens:
    async def test_memcached_gets_the_entry_ttl_rounded_up(self, backend: MemcachedBackend, clock: FakeClock,
                                                           memcached_server: MemcachedServer) -> None:
        await backend.set_many([StoreItem("k", b"v", clock() + 30.2), StoreItem("forever", b"f", None),
                                StoreItem("far", b"x", clock() + 60 * 86400)])
        ttl = memcached_server.command("mg cl:k t")
        assert ttl.startswith(b"HD t"), ttl
        assert 30 <= int(ttl.split()[1][1:]) <= 32
        assert memcached_server.command("mg cl:forever t").strip() == b"HD t-1"
        # Beyond 30 days memcached would read a date: the tier stores without expiry and expires it itself.
        assert memcached_server.command("mg cl:far t").strip() == b"HD t-1"
        clock.advance(60 * 86400 + 1)
        assert await backend.get_many(["far", "forever"]) == [None, b"f"]

    async def test_an_evicted_generation_record_hides_every_entry(self, backend: MemcachedBackend,
                                                                  memcached_server: MemcachedServer) -> None:
        await backend.set_many([StoreItem("a", b"1", None), StoreItem("b", b"2", None)])
        assert memcached_server.command("delete cl~g").strip() == b"DELETED"
        assert await backend.get_many(["a", "b"]) == [None, None]
        await backend.set_many([StoreItem("a", b"3", None)])
        assert await backend.get_many(["a", "b"]) == [b"3", None]

    async def test_an_evicted_tag_token_hides_the_entries_of_that_tag_only(
            self, backend: MemcachedBackend, memcached_server: MemcachedServer) -> None:
        await backend.set_many([StoreItem("a", b"1", None, ("red",)), StoreItem("b", b"2", None, ("blue",))])
        key = entries.tag_key("cl", "red").decode()
        assert memcached_server.command(f"delete {key}").strip() == b"DELETED"
        assert await backend.get_many(["a", "b"]) == [None, b"2"]

    async def test_clear_and_tags_are_seen_by_every_instance(self, backend: MemcachedBackend, clock: FakeClock
                                                             ) -> None:
        other = create_backend(backend.url, clock=clock)
        assert isinstance(other, MemcachedBackend)
        await backend.set_many([StoreItem("app:a", b"1", None, ("t",)), StoreItem("b", b"2", None)])
        assert await other.get_many(["app:a", "b"]) == [b"1", b"2"]
        await other.delete_tags(["t"])
        assert await backend.get_many(["app:a", "b"]) == [None, b"2"]
        await backend.set_many([StoreItem("app:a", b"1", None, ("t",))])
        await other.clear_prefix("app:")
        assert await backend.get_many(["app:a", "b"]) == [None, b"2"]
        await other.clear()
        assert await backend.get_many(["b"]) == [None]
        await other.aclose()

    async def test_namespaces_are_separate_stores(self, memcached_url: str, clock: FakeClock) -> None:
        one = create_backend(memcached_url + "?namespace=one", clock=clock)
        two = create_backend(memcached_url + "?namespace=two", clock=clock)
        await one.set_many([StoreItem("k", b"1", None)])
        await two.set_many([StoreItem("k", b"2", None)])
        await one.clear()
        assert await one.get_many(["k"]) == [None]
        assert await two.get_many(["k"]) == [b"2"]
        await one.aclose()
        await two.aclose()

    async def test_a_value_that_is_not_a_frame_is_handed_on_for_the_codec_to_reject(
            self, backend: MemcachedBackend, memcached_server: MemcachedServer) -> None:
        await backend.set_many([StoreItem("k", b"v", None)])
        assert memcached_server.command("set cl:k 0 0 5\r\nhello").strip() == b"STORED"
        assert await backend.get_many(["k"]) == [b"hello"]

    async def test_reads_cancelled_mid_reply_never_mix_up_replies(self, backend: MemcachedBackend) -> None:
        """aiomcache would put a connection back in its pool halfway through a reply; the tier lets every
        exchange finish, so later reads on the same connections get their own replies."""
        values = {f"k{i}": bytes([i]) * (1000 + 37 * i) for i in range(50)}
        await backend.set_many([StoreItem(k, v, None) for k, v in values.items()])
        rng = random.Random(3)
        wrong: list[str] = []

        async def read(i: int) -> None:
            keys = rng.sample(sorted(values), 5)
            with anyio.move_on_after(rng.choice([0, 0.0001, 0.001, 1.0])):
                got = await backend.get_many(keys)
                wrong.extend(k for k, v in zip(keys, got, strict=True) if v != values[k])

        for _ in range(4):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(read, i)
        assert wrong == []
        assert await backend.get_many(sorted(values)) == [values[k] for k in sorted(values)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_tier_fails_with_a_clear_error(anyio_backend: str) -> None:
    store = create_backend("memcached://127.0.0.1:1")
    with pytest.raises(BackendError, match="asyncio only"):
        await store.get_many(["k"])


tags = st.lists(st.tuples(st.text(max_size=20), st.binary(min_size=8, max_size=8)), max_size=4).map(tuple)


@given(stamp=st.binary(max_size=60), expires=st.none() | st.floats(allow_nan=False, allow_infinity=False),
       tags=tags, envelope=st.binary(max_size=200))
def test_frames_round_trip(stamp: bytes, expires: float | None, tags: tuple[tuple[str, bytes], ...],
                           envelope: bytes) -> None:
    parts = entries.unframe(entries.frame(stamp, expires, tags, envelope))
    assert parts == entries.Frame(stamp, expires, tags, envelope)


@given(prefixes=st.lists(st.text(max_size=10), max_size=5), key=st.text(max_size=20), data=st.binary(max_size=40))
def test_records_round_trip_and_a_cleared_prefix_changes_exactly_its_keys_stamps(
        prefixes: list[str], key: str, data: bytes) -> None:
    record = entries.Record.fresh()
    for prefix in prefixes:
        record = record.with_prefix_cleared(prefix)
    assert entries.Record.decode(record.encode()) == record
    for prefix in ["x", key[:3]]:
        after = record.with_prefix_cleared(prefix)
        assert (after.stamp(key) != record.stamp(key)) == key.startswith(prefix)
    entries.unframe(data)  # any bytes: a frame or None, never an exception
    assert entries.Record.decode(data[:7]) is None


@given(key=st.text(min_size=0, max_size=400), other=st.text(min_size=0, max_size=400))
def test_every_key_becomes_a_valid_memcached_key_of_its_own(key: str, other: str) -> None:
    name = entries.data_key("cl", key)
    assert 0 < len(name) <= 250
    assert all(0x21 <= b <= 0x7E for b in name)
    assert (name == entries.data_key("cl", other)) == (key == other)
    assert name not in (entries.generation_key("cl"), entries.tag_key("cl", key))
