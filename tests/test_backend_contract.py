"""The storage contract, checked the same way on every backend (memory, Redis, disk).

Each test takes a fresh backend of every kind (marks ``memory``, ``redis``, ``disk``). Redis parameters are
skipped under trio: the Redis tier is asyncio-only.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelayers import Backend, StoreItem
from cachelayers.backends import ClearPrefixSupport, create_backend
from tests.conftest import FakeClock
from tests.tier_factories import backend_params, make_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=backend_params())
async def backend(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Backend]:
    """A fresh backend of each kind, on the fake clock."""
    store = make_backend(request.param, request, clock)
    yield store
    await store.aclose()


def item(key: str, blob: bytes, expires_at: float | None = None, tags: tuple[str, ...] = ()) -> StoreItem:
    return StoreItem(key, blob, expires_at, tags)


class TestStorage:
    async def test_missing_keys_read_as_none_and_no_keys_as_nothing(self, backend: Backend) -> None:
        assert await backend.get_many(["nope", "neither"]) == [None, None]
        assert await backend.get_many([]) == []

    async def test_bytes_come_back_exactly_including_every_byte_value_and_large_blobs(self, backend: Backend) -> None:
        every_byte = bytes(range(256)) * 4
        large = os.urandom(1 << 20)
        await backend.set_many([item("a", every_byte), item("b", large), item("empty", b"")])
        assert await backend.get_many(["a", "b", "empty"]) == [every_byte, large, b""]

    async def test_a_write_replaces_the_previous_entry(self, backend: Backend) -> None:
        await backend.set_many([item("k", b"one")])
        await backend.set_many([item("k", b"two")])
        assert await backend.get_many(["k"]) == [b"two"]

    async def test_batches_keep_their_order_and_repeat_duplicates(self, backend: Backend) -> None:
        await backend.set_many([item(f"k{i}", f"v{i}".encode()) for i in range(100)])
        keys = [f"k{i}" for i in reversed(range(100))] + ["k7", "missing", "k7"]
        expected = [f"v{i}".encode() for i in reversed(range(100))] + [b"v7", None, b"v7"]
        assert await backend.get_many(keys) == expected

    async def test_delete_removes_the_keys_and_ignores_missing_ones(self, backend: Backend) -> None:
        await backend.set_many([item("a", b"1"), item("b", b"2"), item("c", b"3")])
        await backend.delete_many(["a", "c", "never-there"])
        assert await backend.get_many(["a", "b", "c"]) == [None, b"2", None]
        await backend.delete_many([])

    async def test_keys_are_any_text(self, backend: Backend) -> None:
        keys = ["cl:ns:0123abcd", "with space", "ünïcødé:🔑", "a" * 300, "*?[glob]\\"]
        await backend.set_many([item(k, k.encode()) for k in keys])
        assert await backend.get_many(keys) == [k.encode() for k in keys]


class TestExpiry:
    async def test_an_entry_written_already_expired_is_not_stored_and_drops_the_old_copy(
            self, backend: Backend, clock: FakeClock) -> None:
        await backend.set_many([item("k", b"old")])
        await backend.set_many([item("k", b"dead", expires_at=clock() - 1)])
        assert await backend.get_many(["k"]) == [None]

    async def test_an_entry_lives_until_its_absolute_expiry(self, backend: Backend, clock: FakeClock,
                                                            request: pytest.FixtureRequest) -> None:
        await backend.set_many([item("k", b"v", expires_at=clock() + 30), item("forever", b"f")])
        assert await backend.get_many(["k", "forever"]) == [b"v", b"f"]
        if "redis" in request.node.callspec.id:
            # Redis expires by its own clock: the TTL it was given must be the remaining lifetime.
            import redis

            client = redis.Redis.from_url(str(request.getfixturevalue("redis_url")))
            assert 29_000 < client.pttl("k") <= 30_000
            assert client.pttl("forever") == -1
            client.close()
        else:
            clock.advance(29.9)
            assert await backend.get_many(["k"]) == [b"v"]
            clock.advance(0.2)
            assert await backend.get_many(["k", "forever"]) == [None, b"f"]


class TestTags:
    async def test_invalidating_a_tag_removes_every_key_under_it_and_nothing_else(self, backend: Backend) -> None:
        await backend.set_many([
            item("a", b"1", tags=("red",)),
            item("b", b"2", tags=("red", "blue")),
            item("c", b"3", tags=("blue",)),
            item("d", b"4"),
        ])
        await backend.delete_tags(["red"])
        assert await backend.get_many(["a", "b", "c", "d"]) == [None, None, b"3", b"4"]
        await backend.delete_tags(["blue", "never-used"])
        assert await backend.get_many(["c", "d"]) == [None, b"4"]

    async def test_a_tag_invalidated_twice_and_reused_works_again(self, backend: Backend) -> None:
        await backend.set_many([item("a", b"1", tags=("t",))])
        await backend.delete_tags(["t"])
        await backend.delete_tags(["t"])
        await backend.set_many([item("a", b"2", tags=("t",)), item("b", b"3", tags=("t",))])
        assert await backend.get_many(["a", "b"]) == [b"2", b"3"]
        await backend.delete_tags(["t"])
        assert await backend.get_many(["a", "b"]) == [None, None]

    async def test_many_keys_under_one_tag_all_go(self, backend: Backend) -> None:
        # More members than one SPOP/UNLINK chunk (Redis) or one statement (disk) takes.
        await backend.set_many([item(f"k{i}", b"x", tags=("bulk",)) for i in range(2500)])
        await backend.delete_tags(["bulk"])
        assert await backend.get_many([f"k{i}" for i in range(0, 2500, 97)]) == [None] * 26


class TestClear:
    async def test_clear_removes_everything(self, backend: Backend) -> None:
        await backend.set_many([item("a", b"1", tags=("t",)), item("b", b"2")])
        await backend.clear()
        assert await backend.get_many(["a", "b"]) == [None, None]
        await backend.set_many([item("a", b"again", tags=("t",))])
        assert await backend.get_many(["a"]) == [b"again"]

    async def test_clear_prefix_keeps_other_prefixes(self, backend: Backend) -> None:
        if not isinstance(backend, ClearPrefixSupport):
            pytest.skip(f"{type(backend).__name__} has no ClearPrefixSupport (it is never shared)")
        await backend.set_many([item("app1:a", b"1"), item("app1:b", b"2"), item("app2:a", b"3"), item("app1", b"4")])
        await backend.clear_prefix("app1:")
        assert await backend.get_many(["app1:a", "app1:b", "app2:a", "app1"]) == [None, None, b"3", b"4"]


@pytest.mark.parametrize("kind", backend_params(["redis", "disk", "memcached"]))
async def test_a_second_instance_on_the_same_url_sees_the_same_entries(
        kind: str, request: pytest.FixtureRequest, clock: FakeClock) -> None:
    """Shared tiers: what one process (or instance) wrote, another reads; invalidation is shared too."""
    first = make_backend(kind, request, clock)
    await first.set_many([item("k", b"v", tags=("t",)), item("j", b"w")])
    await first.aclose()  # the disk tier survives a restart of its user
    second = create_backend(first.url, clock=clock)
    try:
        assert await second.get_many(["k", "j"]) == [b"v", b"w"]
        await second.delete_tags(["t"])
        third = create_backend(first.url, clock=clock)
        assert await third.get_many(["k", "j"]) == [None, b"w"]
        await third.aclose()
    finally:
        await second.aclose()


# -- a property over the whole contract ----------------------------------------------------------------------

KEYS = [f"key{i}" for i in range(6)]
TAGS = {key: tuple(f"tag{j}" for j in range(3) if (i >> j) & 1) for i, key in enumerate(KEYS)}
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.lists(st.tuples(st.sampled_from(KEYS), st.binary(max_size=40)), max_size=4)),
        st.tuples(st.just("delete"), st.lists(st.sampled_from(KEYS), max_size=3)),
        st.tuples(st.just("tags"), st.lists(st.sampled_from(["tag0", "tag1", "tag2", "tag9"]), max_size=2)),
        st.tuples(st.just("clear"), st.just(None)),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
async def test_any_sequence_of_operations_matches_a_dict(backend: Backend, ops: list[tuple[str, object]]) -> None:
    """After any sequence of batch writes, deletes, tag invalidations and clears, reads agree with a dict.

    Every key always carries the same tags (as a cached function's entries do), so the model is exact.
    """
    await backend.clear()
    model: dict[str, bytes] = {}
    for op, arg in ops:
        if op == "set":
            pairs = dict(arg)  # type: ignore[call-overload]
            await backend.set_many([item(k, v, tags=TAGS[k]) for k, v in pairs.items()])
            model.update(pairs)
        elif op == "delete":
            await backend.delete_many(arg)  # type: ignore[arg-type]
            for k in arg:  # type: ignore[attr-defined]
                model.pop(k, None)
        elif op == "tags":
            await backend.delete_tags(arg)  # type: ignore[arg-type]
            for k in [k for k in model if set(TAGS[k]) & set(arg)]:  # type: ignore[call-overload]
                del model[k]
        else:
            await backend.clear()
            model.clear()
        assert await backend.get_many(KEYS) == [model.get(k) for k in KEYS]
