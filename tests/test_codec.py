"""The codec: values round-trip with their types; envelopes reject anything not sealed for their key.

In the engine, an entry that fails its check is a miss, is deleted and is counted — never served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import math
import uuid
from typing import Any

import msgpack
import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayers import (
    Codec,
    ConfigError,
    IntegrityError,
    MemoryBackend,
    SerializationError,
    Settings,
    StoreItem,
    TieredCache,
    multilevel_cached,
    register_codec,
)
from cachelayers.backends.memory import VALUE
from cachelayers.codec import unregister_codec
from tests.conftest import FakeClock
from tests.strategies import (
    aware_datetimes,
    codec_values,
    decimals_with_specials,
    numpy_arrays,
    numpy_scalars,
    tag_sets,
    uuid_values,
)

SECRET = "a-secret-of-32-bytes-for-signing"
OTHER_SECRET = "another-secret-32-bytes-for-sign"


@register_codec
@dataclasses.dataclass(frozen=True)
class Usage:
    """A registered dataclass, as a pipeline would return."""

    prompt_tokens: int
    completion_tokens: int


@register_codec
class Completion(pydantic.BaseModel):
    """A registered pydantic model with nested values the codec handles itself."""

    text: str
    created: dt.datetime
    usage: Usage
    scores: list[float]


class Unregistered:
    """A type the codec does not know."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unregistered) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


def same(a: Any, b: Any) -> bool:
    """Deep equality that also requires equal types, equal array dtypes and shapes, and NaN == NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, dt.datetime | dt.time):
        return bool(a == b and a.utcoffset() == b.utcoffset())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def round_trip(value: Any, codec: Codec | None = None) -> Any:
    codec = codec or Codec()
    return codec.decode_value(codec.encode_value(value))


# -- values --------------------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(codec_values)
def test_values_round_trip_with_their_types(value: Any) -> None:
    """Built-in types, bytes, tuples, sets, big ints, datetimes, decimals and UUIDs come back equal and typed."""
    assert same(round_trip(value), value)


@given(numpy_arrays)
def test_numpy_arrays_keep_dtype_shape_and_data(array: np.ndarray[Any, Any]) -> None:
    """Every scalar dtype (byte order, datetime units, strings) and every shape, including 0-d and empty."""
    assert same(round_trip(array), array)


@given(numpy_arrays.filter(lambda a: a.ndim >= 2))
def test_numpy_views_round_trip_as_their_values(array: np.ndarray[Any, Any]) -> None:
    """Transposed, Fortran-ordered and strided views are stored by value."""
    for view in (array.T, np.asfortranarray(array), array[::-1, ::2]):
        decoded = round_trip(view)
        assert decoded.dtype == view.dtype
        assert decoded.shape == view.shape
        assert decoded.tobytes() == view.tobytes()


@given(numpy_scalars)
def test_numpy_scalars_keep_their_dtype(scalar: Any) -> None:
    """A numpy scalar comes back as a numpy scalar of the same dtype."""
    assert same(round_trip(scalar), scalar)


@given(st.datetimes() | aware_datetimes)
def test_datetimes_keep_their_offset(value: dt.datetime) -> None:
    """Naive stays naive; aware keeps its UTC offset and its instant."""
    decoded = round_trip(value)
    assert decoded == value
    assert decoded.utcoffset() == value.utcoffset()


@given(st.integers(min_value=-(2**200), max_value=2**200) | st.sampled_from([2**64, -(2**63) - 1, 2**1000]))
def test_big_ints_round_trip(value: int) -> None:
    """Integers beyond 64 bits are stored exactly."""
    assert round_trip(value) == value


@given(decimals_with_specials(), uuid_values())
def test_decimals_and_uuids_round_trip(number: decimal.Decimal, identifier: uuid.UUID) -> None:
    """Decimals keep their exponent, sign and specials; UUIDs of every version come back equal."""
    assert str(round_trip(number)) == str(number)
    assert round_trip(identifier) == identifier


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_registered_dataclass_and_pydantic_model_round_trip(scores: list[int]) -> None:
    """Registered types come back as instances of their class, nested values included."""
    usage = Usage(prompt_tokens=scores[0], completion_tokens=len(scores))
    completion = Completion(text="ok", created=dt.datetime(2024, 1, 2, tzinfo=dt.UTC), usage=usage,
                            scores=[s / 7 for s in scores])
    value = {"usage": usage, "completions": (completion, completion), "all": {usage}}
    decoded = round_trip(value)
    assert decoded == value
    assert type(decoded["completions"][0]) is Completion
    assert type(decoded["completions"][0].usage) is Usage


def test_custom_codec_with_encode_and_decode() -> None:
    """Any type can be registered with encode= and decode=."""

    class Celsius:
        def __init__(self, degrees: float) -> None:
            self.degrees = degrees

    register_codec(Celsius, name="tests.Celsius", encode=lambda c: c.degrees, decode=Celsius)
    assert round_trip([Celsius(21.5)])[0].degrees == 21.5


def test_register_codec_rejects_what_it_cannot_encode() -> None:
    """A plain class needs encode/decode; a name belongs to one class."""
    with pytest.raises(ConfigError, match=r"register_codec\.cls"):
        register_codec(Unregistered)

    @dataclasses.dataclass
    class Impostor:
        value: int

    with pytest.raises(ConfigError, match=r"register_codec\.name"):
        register_codec(Impostor, name=f"{Usage.__module__}.{Usage.__qualname__}")


def test_unregistered_types_need_pickle() -> None:
    """Without pickle an unknown type is a SerializationError; with it, it round-trips."""
    with pytest.raises(SerializationError, match="register_codec"):
        Codec().encode_value([Unregistered(1)])
    with pytest.raises(SerializationError):
        Codec().encode_value({1, 2, object()})
    pickling = Codec(allow_pickle=True)
    assert round_trip([Unregistered(2)], pickling) == [Unregistered(2)]


def test_unknown_registered_name_is_a_serialization_error() -> None:
    """An entry written by a class that is no longer registered decodes to an error, never a wrong type."""
    blob = Codec().encode_value(Usage(1, 2))
    unregister_codec(Usage)
    try:
        with pytest.raises(SerializationError, match="no codec registered"):
            Codec().decode_value(blob)
    finally:
        register_codec(Usage)


# Scalars at every boundary of msgpack's formats (fixint/8/16/32/64-bit integers, fixstr/str8/16 and bin8/16
# lengths), plus the values body_size leaves to the encoder (beyond 64 bits, lone surrogates).
_int_edges = [sign * (1 << bits) + delta for bits in range(66) for sign in (1, -1) for delta in (-1, 0, 1)]
scalar_values: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(), st.sampled_from(_int_edges),
    st.text(), st.text(alphabet="aé€😀", min_size=25, max_size=70), st.binary(),
    st.sampled_from([0, 31, 32, 255, 256, 65535, 65536]).flatmap(
        lambda n: st.sampled_from(["a" * n, b"b" * n, "é" * (n // 2)])),
    st.just("lone \ud800 surrogate"),
)


@settings(max_examples=400)
@given(scalar_values | codec_values, tag_sets)
def test_body_size_is_the_length_of_the_encoded_body(value: Any, tags: frozenset[str]) -> None:
    """The size the memory tier charges without encoding is exactly what encoding would give (or the same
    error when the value cannot be encoded)."""
    codec = Codec()
    ordered = tuple(sorted(tags))
    try:
        expected: int | type[Exception] = len(codec.pack_body(value, ordered))
    except SerializationError:
        expected = SerializationError
    try:
        assert codec.body_size(value, ordered) == expected
    except SerializationError:
        assert expected is SerializationError


# -- envelopes -----------------------------------------------------------------------------------------------

KEY = "cl:ns:0123456789abcdef0123456789abcdef01234567"


@given(codec_values, st.none() | st.floats(min_value=0, max_value=2e9), tag_sets)
def test_envelopes_round_trip_value_expiry_and_tags(value: Any, expires_at: float | None,
                                                    tags: frozenset[str]) -> None:
    """What is sealed under a key opens under that key, signed or not."""
    for codec in (Codec(), Codec(secret=SECRET)):
        envelope = codec.open(KEY, codec.seal(KEY, value, expires_at, sorted(tags)))
        assert same(envelope.value, value)
        assert envelope.expires_at == expires_at
        assert set(envelope.tags) == tags


@pytest.mark.parametrize("secret", [None, SECRET], ids=["checksum", "hmac"])
@given(data=st.data())
def test_any_bit_flip_is_detected(secret: str | None, data: st.DataObject) -> None:
    """Flipping any bit of an envelope — header, mac or body — raises IntegrityError."""
    codec = Codec(secret=secret)
    blob = bytearray(codec.seal(KEY, data.draw(codec_values), data.draw(st.none() | st.floats(0, 2e9))))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        codec.open(KEY, bytes(blob))


@given(codec_values, st.data())
def test_truncated_envelopes_are_rejected(value: Any, data: st.DataObject) -> None:
    """Any strict prefix of an envelope raises IntegrityError."""
    codec = Codec()
    blob = codec.seal(KEY, value, None)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(IntegrityError):
        codec.open(KEY, blob[:cut])


def test_foreign_envelopes_are_rejected() -> None:
    """Another key's envelope, the wrong signature, or not an envelope at all: IntegrityError."""
    plain, signed, other = Codec(), Codec(secret=SECRET), Codec(secret=OTHER_SECRET)
    with pytest.raises(IntegrityError, match="does not match"):
        plain.open(KEY, plain.seal(KEY + "0", "value", None))
    with pytest.raises(IntegrityError, match="unsigned but a secret is set"):
        signed.open(KEY, plain.seal(KEY, "value", None))
    with pytest.raises(IntegrityError, match="signed but no secret"):
        plain.open(KEY, signed.seal(KEY, "value", None))
    with pytest.raises(IntegrityError, match="does not match"):
        signed.open(KEY, other.seal(KEY, "value", None))
    with pytest.raises(IntegrityError, match="not a cachelayers envelope"):
        plain.open(KEY, msgpack.packb(["a bare", "msgpack value", b"x" * 64]))
    with pytest.raises(IntegrityError, match="truncated"):
        plain.open(KEY, b"")


def test_pickled_entry_is_refused_without_pickle() -> None:
    """An entry written with pickle passes its checksum but is never unpickled by a codec without pickle."""
    blob = Codec(allow_pickle=True).seal(KEY, Unregistered(3), None)
    assert Codec(allow_pickle=True).open(KEY, blob).value == Unregistered(3)
    with pytest.raises(SerializationError, match="pickle is not enabled"):
        Codec().open(KEY, blob)


def test_secret_must_have_a_sane_length() -> None:
    """A signing secret of the wrong length is a ConfigError that does not show the secret."""
    with pytest.raises(ConfigError, match="secret") as info:
        Codec(secret="short")
    assert "short" not in str(info.value)


# -- corrupt entries in the engine -----------------------------------------------------------------------------


def two_tier_cache(clock: FakeClock, *, secret: str | None = None,
                   lower: MemoryBackend | None = None, allow_pickle: bool = False) -> tuple[TieredCache, MemoryBackend]:
    """A cache with a memory tier and a lower memory tier holding envelopes."""
    l2 = lower if lower is not None else MemoryBackend(clock=clock)
    cache = TieredCache(Settings(secret=secret, allow_pickle=allow_pickle),
                        backends={"l1": MemoryBackend(clock=clock), "l2": l2}, clock=clock)
    return cache, l2


def flip_bit(blob: bytes, index: int) -> bytes:
    raw = bytearray(blob)
    raw[index] ^= 0x10
    return bytes(raw)


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "other-key", "garbage"])
async def test_corrupt_entry_is_a_miss_deleted_and_counted(clock: FakeClock, damage: str) -> None:
    """A damaged entry in a lower tier is never served: the call recomputes, the entry is replaced, the tier
    counts it as corrupt."""
    cache, l2 = two_tier_cache(clock)
    runs: list[int] = []

    @multilevel_cached(cache=cache)
    async def square(x: int) -> int:
        runs.append(x)
        return x * x

    assert await square(3) == 9
    assert await square(4) == 16
    [key3, key4] = [str(key) for key in l2.slots]
    blob = l2.slots[key3][VALUE]
    damaged = {"bit-flip": flip_bit(blob, len(blob) - 1), "truncate": blob[:10],
               "other-key": l2.slots[key4][VALUE], "garbage": b"\xc1C" + b"\x00" * 60}[damage]
    await l2.set_many([StoreItem(key3, damaged, None)])
    assert cache.local is not None
    cache.local.clear_now()

    assert await square(3) == 9
    assert runs == [3, 4, 3]
    assert cache.tier_stats()["l2"]["corrupt"] == 1
    # The damaged entry was deleted, and the recomputed value stored in its place.
    assert cache.codec.open(key3, l2.slots[key3][VALUE]).value == 9
    assert await square(3) == 9
    assert runs == [3, 4, 3]


@pytest.mark.anyio
async def test_corrupt_entry_is_deleted_even_when_the_call_fails(clock: FakeClock) -> None:
    """Reading a corrupt entry deletes it from its tier at once (not only when a new value replaces it)."""
    cache, l2 = two_tier_cache(clock)
    await cache.set("k", "value")
    [key] = [str(key) for key in l2.slots]
    await l2.set_many([StoreItem(key, flip_bit(l2.slots[key][VALUE], 5), None)])
    assert cache.local is not None
    cache.local.clear_now()
    assert await cache.get("k", "missing") == "missing"
    assert key not in l2.slots
    assert cache.tier_stats()["l2"]["corrupt"] == 1


@pytest.mark.anyio
async def test_entries_of_another_secret_are_misses(clock: FakeClock) -> None:
    """A process with a secret never serves what an unsigned (or differently signed) process wrote."""
    shared = MemoryBackend(clock=clock)
    unsigned, _ = two_tier_cache(clock, lower=shared)
    signed, _ = two_tier_cache(clock, secret=SECRET, lower=shared)
    other, _ = two_tier_cache(clock, secret=OTHER_SECRET, lower=shared)
    await unsigned.set("k", "written unsigned")
    assert await signed.get("k", "miss") == "miss"
    assert signed.tier_stats()["l2"]["corrupt"] == 1
    await signed.set("k", "written signed")
    assert await other.get("k", "miss") == "miss"
    assert other.tier_stats()["l2"]["corrupt"] == 1
    await signed.set("k", "written signed")
    assert unsigned.local is not None
    unsigned.local.clear_now()  # its own memory tier still holds what it wrote
    assert await unsigned.get("k", "miss") == "miss"
    assert unsigned.tier_stats()["l2"]["corrupt"] == 1


@pytest.mark.anyio
async def test_pickled_entry_is_a_miss_for_a_cache_without_pickle(clock: FakeClock) -> None:
    """An entry pickled by a trusting process is not unpickled by one without pickle: a counted miss.

    Both share a secret: pickle without one is refused by the settings (see tests/test_hygiene.py)."""
    shared = MemoryBackend(clock=clock)
    trusting, _ = two_tier_cache(clock, lower=shared, allow_pickle=True, secret=SECRET)
    careful, _ = two_tier_cache(clock, lower=shared, secret=SECRET)
    assert await trusting.set("k", Unregistered(5)) is True
    assert await careful.get("k", "miss") == "miss"
    assert careful.tier_stats()["l2"]["corrupt"] == 1
