"""The memory tier: LRU bounded by entries and bytes, absolute expiry, tags, and the `Backend` contract."""

from __future__ import annotations

import gc
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachelayers import BackendURL, ConfigError, MemoryBackend, Settings, StoreItem, TieredCache, multilevel_cached
from cachelayers.backends import create_backend
from cachelayers.backends.memory import MISSING, STORAGE_KEY, TAGS
from tests.conftest import FakeClock

pytestmark = pytest.mark.memory

OVERHEAD = 64  # bytes the tier charges per entry beyond the size it is given


def backend(clock: FakeClock, url: str = "memory://") -> MemoryBackend:
    made = create_backend(url, clock=clock)
    assert isinstance(made, MemoryBackend)
    return made


def test_lru_eviction_by_entries(clock: FakeClock) -> None:
    """Past ``max_entries`` the least recently *used* entry goes first; a lookup makes an entry recent."""
    tier = backend(clock, "memory://?max_entries=3")
    for key in "abc":
        assert tier.store(key, key.upper(), size=1, expires_at=None)
    assert tier.lookup("a") == "A"  # a is now the most recent
    tier.store("d", "D", size=1, expires_at=None)
    assert list(tier.slots) == ["c", "a", "d"]
    assert tier.lookup("b") is MISSING
    assert tier.evictions == 1


def test_lru_eviction_by_bytes(clock: FakeClock) -> None:
    """Past ``max_bytes`` as many least recently used entries go as needed; the bound always holds."""
    tier = backend(clock, f"memory://?max_bytes={3 * (100 + OVERHEAD)}")
    for key in "abc":
        tier.store(key, key, size=100, expires_at=None)
    assert tier.bytes_used == 3 * (100 + OVERHEAD)
    tier.store("big", "B", size=250, expires_at=None)
    assert list(tier.slots) == ["c", "big"]
    assert tier.bytes_used == (100 + OVERHEAD) + (250 + OVERHEAD) <= tier.max_bytes


def test_entry_larger_than_the_bound_is_not_stored(clock: FakeClock) -> None:
    """An entry over ``max_bytes`` is refused (the old value under its key goes too: it is stale)."""
    tier = backend(clock, "memory://?max_bytes=1000")
    tier.store("k", "old", size=10, expires_at=None)
    tier.store("other", "o", size=10, expires_at=None)
    assert tier.store("k", "new", size=1000, expires_at=None) is False
    assert tier.lookup("k") is MISSING
    assert tier.lookup("other") == "o"
    assert tier.bytes_used == 10 + OVERHEAD


def test_absolute_expiry(clock: FakeClock) -> None:
    """An entry is served until its absolute expiry, not after; an already expired entry is not stored."""
    tier = backend(clock)
    tier.store("k", "v", size=1, expires_at=clock() + 10)
    clock.advance(9.999)
    assert tier.lookup_entry("k") == ("v", clock.now + 0.001)
    clock.advance(0.001)
    assert tier.lookup("k") is MISSING
    assert len(tier) == 0
    assert tier.bytes_used == 0
    assert tier.store("late", "v", size=1, expires_at=clock() - 1) is False
    assert tier.lookup("late") is MISSING


def test_none_is_a_value(clock: FakeClock) -> None:
    """``None`` is stored and served like any value; a miss is `MISSING`."""
    tier = backend(clock)
    tier.store("k", None, size=1, expires_at=None)
    assert tier.lookup("k") is None
    assert tier.lookup("absent") is MISSING


def test_tags_and_storage_keys(clock: FakeClock) -> None:
    """Entries are removed by tag and by the storage key other tiers know them by; bookkeeping follows."""
    tier = backend(clock)
    tier.store(("f", 1), "one", size=1, expires_at=None, tags=("t1", "t2"), storage_key="cl:f:1")
    tier.store(("f", 2), "two", size=1, expires_at=None, tags=("t2",), storage_key="cl:f:2")
    tier.store(("f", 3), "three", size=1, expires_at=None, tags=("t3",), storage_key="cl:f:3")
    assert tier.remove_tags(["t1"]) == 1
    assert tier.lookup(("f", 2)) == "two"
    assert tier.remove_storage_keys(["cl:f:2", "cl:unknown"]) == 1
    assert list(tier.slots) == [("f", 3)]
    assert tier.remove_tags(["t2"]) == 0
    tier.clear_now()
    assert len(tier) == 0
    assert tier.bytes_used == 0


@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 400), st.booleans(), st.booleans()), max_size=60))
def test_bounds_always_hold_and_contents_are_the_lru_model(ops: list[tuple[int, int, bool, bool]]) -> None:
    """After any sequence of stores and lookups the tier holds exactly what an LRU model predicts, and its
    tag and storage-key indexes name exactly the entries it holds (evicted and replaced ones are forgotten)."""
    clock = FakeClock()
    tier = MemoryBackend(clock=clock, max_entries=5, max_bytes=1200)
    model: OrderedDict[int, int] = OrderedDict()
    for key, size, is_lookup, tagged in ops:
        if is_lookup:
            found = tier.lookup(key)
            assert (found is not MISSING) == (key in model)
            if key in model:
                assert found == key
                model.move_to_end(key)
            continue
        charged = size + OVERHEAD
        model.pop(key, None)
        # Odd keys are tagged by their parity and named by a storage key when ``tagged``; the rest are plain.
        indexed = tagged and key % 2 == 1
        stored = tier.store(key, key, size, None, ("odd",) if indexed else (), f"sk{key}" if indexed else None)
        assert stored == (charged <= tier.max_bytes)
        if stored:
            model[key] = charged
            while len(model) > 5 or sum(model.values()) > 1200:
                model.popitem(last=False)
        assert list(tier.slots) == list(model)
        assert len(tier) <= tier.max_entries
        assert tier.bytes_used == sum(model.values()) <= tier.max_bytes
    named = [key for key in model if tier.slots[key][STORAGE_KEY] is not None]
    assert tier.remove_storage_keys([f"sk{key}" for key in range(13)]) == len(named)
    tagged_left = [key for key in model if key not in named and tier.slots[key][TAGS]]
    assert tier.remove_tags(["odd"]) == len(tagged_left)
    assert list(tier.slots) == [key for key in model if key not in named and key not in tagged_left]


def test_remove_where_scans_every_entry(clock: FakeClock) -> None:
    """`remove_where` removes exactly the entries whose key satisfies the predicate, with their bookkeeping."""
    tier = backend(clock)
    for i in range(10):
        tier.store(("ns-a" if i % 2 else "ns-b", i), i, 10, None, ("t",), f"sk{i}")
    assert tier.remove_where(lambda key: key[0] == "ns-a") == 5  # type: ignore[index]
    assert [key[1] for key in tier.slots] == [0, 2, 4, 6, 8]  # type: ignore[index]
    assert tier.bytes_used == 5 * (10 + OVERHEAD)
    assert tier.remove_storage_keys(["sk1", "sk2"]) == 1
    assert tier.remove_tags(["t"]) == 4
    assert tier.remove_where(lambda key: True) == 0


@pytest.mark.anyio
async def test_backend_contract_with_envelopes(clock: FakeClock) -> None:
    """As a lower tier the memory backend stores blobs by storage key through the five operations."""
    tier = backend(clock)
    await tier.set_many([StoreItem("a", b"A", None, ("x",)), StoreItem("b", b"B", clock() + 5, ("y",)),
                         StoreItem("c", b"C", None, ("x", "y"))])
    assert await tier.get_many(["a", "b", "c", "d"]) == [b"A", b"B", b"C", None]
    clock.advance(5)
    assert await tier.get_many(["b"]) == [None]
    await tier.delete_many(["a", "missing"])
    assert await tier.get_many(["a", "c"]) == [None, b"C"]
    await tier.delete_tags(["y"])
    assert await tier.get_many(["c"]) == [None]
    await tier.set_many([StoreItem("z", b"Z", None)])
    await tier.clear()
    assert await tier.get_many(["z"]) == [None]
    await tier.aclose()


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("memory://?max_entries=0", "max_entries"),
        ("memory://?max_entries=-3", "max_entries"),
        ("memory://?max_entries=ten", "max_entries"),
        ("memory://?max_bytes=0", "max_bytes"),
        ("memory://?max_bytes=-1KiB", "max_bytes"),
        ("memory://?max_bytes=lots", "max_bytes"),
        ("memory://?max_items=3", "max_items"),
        ("memory://somehost", "url"),
        ("memory:///a/path", "url"),
    ],
)
def test_bad_memory_urls(url: str, field: str) -> None:
    """Bad options are a ConfigError naming the option."""
    with pytest.raises(ConfigError) as info:
        MemoryBackend.validate_url(BackendURL.parse(url))
    assert field in info.value.field


@pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"max_entries": -1}, {"max_bytes": 0}, {"max_bytes": -5}])
def test_bad_bounds_in_code(kwargs: dict[str, int]) -> None:
    """Bounds given in code are checked like those in URLs."""
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        MemoryBackend(**kwargs)  # type: ignore[arg-type]


def test_url_sizes_with_units() -> None:
    """``max_bytes`` takes units."""
    assert MemoryBackend(BackendURL.parse("memory://?max_bytes=2KiB&max_entries=7")).max_bytes == 2048
    assert MemoryBackend(max_bytes=4096, max_entries=2).max_entries == 2


# -- max_bytes bounds live memory (issue 11) -----------------------------------------------------------------

LIVE_BOUND = 4 * 1024 * 1024


def rows(x: int) -> list[dict[str, Any]]:
    """The issue's workload: a list of small dicts, as a pipeline returns records."""
    return [{"id": x * 100 + i, "role": "user", "text": f"message {x}.{i}", "score": i / 7} for i in range(20)]


def text(x: int) -> str:
    """A string, as a cached prompt or completion."""
    return f"completion {x}: " + "lorem ipsum " * 12


def label(x: int) -> str:
    """A short string, as a cached classification."""
    return f"label {x}"


async def traced_growth(result: Callable[[int], Any], calls: int) -> tuple[int, MemoryBackend]:
    """Fill ``memory://?max_bytes=4MiB`` through `multilevel_cached` with ``calls`` distinct calls; return the
    growth of traced memory (after the calls' garbage is collected) and the tier."""
    cache = TieredCache(Settings(tiers={"memory": f"memory://?max_entries=1000000&max_bytes={LIVE_BOUND}"}))
    tier = cache.local
    assert isinstance(tier, MemoryBackend)

    @multilevel_cached(cache=cache)
    async def fetch(x: int) -> Any:
        return result(x)

    await fetch(-1)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for x in range(calls):
            await fetch(x)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return grown, tier


@pytest.mark.anyio
@pytest.mark.parametrize(("result", "calls"), [pytest.param(rows, 6_000, id="lists-of-dicts"),
                                               pytest.param(text, 30_000, id="str"),
                                               pytest.param(label, 60_000, id="short-str")])
async def test_max_bytes_bounds_live_memory(result: Callable[[int], Any], calls: int) -> None:
    """Memory held by a full memory tier stays within twice ``max_bytes``, as `tracemalloc` traces it: the
    tier charges the estimated live size of what it holds, not its encoded size."""
    grown, tier = await traced_growth(result, calls)
    assert tier.evictions > 0, "the tier never filled: the test shows nothing"
    assert tier.bytes_used <= tier.max_bytes
    assert grown <= 2 * LIVE_BOUND, f"{grown:,} bytes traced for max_bytes={LIVE_BOUND:,} ({len(tier)} entries)"


def test_live_size_estimates() -> None:
    """The estimate follows what values hold: never below the encoded size, sampled for long containers, and
    charged by the encoding past its node budget."""
    import dataclasses

    import numpy as np
    import pydantic

    from cachelayers.codec.sizing import FALLBACK_FACTOR, MAX_NODES, live_size

    @dataclasses.dataclass
    class Point:
        x: int
        label: str

    class Row(pydantic.BaseModel):
        id: int
        text: str

    assert live_size("x" * 1000, 1003) >= 1000
    assert live_size(b"x" * 1000, 1003) >= 1003
    assert live_size(12345, 3) >= 24
    assert live_size(np.zeros(1000), 8000) >= 8000
    assert live_size(np.zeros(1000)[::2], 4000) >= 4000  # a view holds its base
    assert live_size(Point(1, "a" * 500), 10) > 500
    assert live_size(Row(id=1, text="a" * 500), 10) > 500
    small = [{"id": i, "text": f"row {i}"} for i in range(10_000)]
    assert 10_000 * 150 < live_size(small, 0) < 10_000 * 600  # sampled, scaled to the length
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    assert live_size(deep, 50) == 50 * FALLBACK_FACTOR
    wide = [[[i] for i in range(100)] for _ in range(MAX_NODES)]
    assert live_size(wide, 7) >= 7
