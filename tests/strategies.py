"""Composite hypothesis strategies shared by the property and stateful tests."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as nps

__all__ = [
    "DEFAULT_Y",
    "aware_datetimes",
    "codec_values",
    "decimals_with_specials",
    "durations",
    "equivalent_calls",
    "hashable_values",
    "keyable_scalars",
    "keyable_values",
    "numpy_arrays",
    "numpy_scalars",
    "payload_sizes",
    "spell_call",
    "tag_sets",
    "uuid_values",
]

# -- keys ---------------------------------------------------------------------------------------------------

keyable_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: beyond 64 bits too
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
"""Scalars a cache key accepts, including the ones that compare equal across types (``1 == 1.0 == True``)."""

aware_datetimes: st.SearchStrategy[dt.datetime] = st.datetimes(
    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)),
                               dt.timezone(dt.timedelta(hours=-8))]))


def _keyable_children(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    hashable = st.one_of(st.integers(), st.text(max_size=4), st.binary(max_size=4))
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(hashable, children, max_size=3),
        st.frozensets(hashable, max_size=3),
        st.sets(hashable, max_size=3),
    )


keyable_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(keyable_scalars, st.datetimes(), aware_datetimes, st.dates(), st.timedeltas(),
              st.decimals(allow_nan=False), st.uuids()),
    _keyable_children,
    max_leaves=8,
)
"""Values ``KeyBuilder`` can key: scalars, datetimes, decimals, UUIDs and containers of them."""

# -- codec --------------------------------------------------------------------------------------------------

numpy_arrays: st.SearchStrategy[np.ndarray[Any, Any]] = nps.arrays(
    dtype=nps.scalar_dtypes(),
    shape=nps.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
"""Arrays of every scalar dtype (numbers, bools, strings, bytes, datetime64, timedelta64), any order."""

numpy_scalars: st.SearchStrategy[Any] = nps.from_dtype(np.dtype("f8")).map(np.float64) | st.sampled_from(
    [np.int8(-3), np.uint64(2**64 - 1), np.bool_(True), np.float32(1.5), np.datetime64("2024-01-02T03:04"),
     np.str_("é")])

hashable_values: st.SearchStrategy[Any] = st.one_of(
    st.integers(), st.text(max_size=6), st.binary(max_size=6), st.uuids(), st.decimals(allow_nan=False),
    st.datetimes(), st.tuples(st.integers(), st.text(max_size=3)),
)
"""Hashable values the codec keeps as set members and dict keys (no NaN: it never equals itself)."""

_codec_leaves: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # big ints beyond 64 bits included
    st.floats(allow_nan=False),
    st.text(max_size=16),
    st.binary(max_size=16),
    st.datetimes(),
    aware_datetimes,
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.decimals(allow_nan=False),
    st.uuids(),
)


def _codec_children(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.binary(max_size=4)), children, max_size=4),
        st.sets(hashable_values, max_size=4),
        st.frozensets(hashable_values, max_size=4),
    )


codec_values: st.SearchStrategy[Any] = st.recursive(_codec_leaves, _codec_children, max_leaves=12)
"""Values the codec must round-trip to an equal value of the same type."""


# -- engine -------------------------------------------------------------------------------------------------

durations: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=1, max_value=120),
    st.floats(min_value=0.5, max_value=120.0),
    st.sampled_from(["90s", "1m", "2min", "1500ms", "0.5m"]),
    st.timedeltas(min_value=dt.timedelta(seconds=1), max_value=dt.timedelta(minutes=2)),
)
"""TTLs in every accepted form: seconds, strings with a unit, timedeltas."""

tag_sets: st.SearchStrategy[frozenset[str]] = st.frozensets(st.sampled_from(["red", "green", "blue"]), max_size=2)

SMALL_PAYLOAD_MAX = 300
MEDIUM_PAYLOAD = (1700, 2400)
HUGE_PAYLOAD = (4300, 4500)

payload_sizes: st.SearchStrategy[int] = st.one_of(
    st.integers(0, SMALL_PAYLOAD_MAX),
    st.integers(0, SMALL_PAYLOAD_MAX),
    st.integers(0, SMALL_PAYLOAD_MAX),
    st.integers(*MEDIUM_PAYLOAD),
    st.integers(*HUGE_PAYLOAD),
)
"""Payload sizes in three classes far from each other, so whether an entry fits a tier of the stateful test
(1,500 and 4,000 bytes) is never a matter of a few bytes of bookkeeping: small ones fit both, medium ones only
the larger tier, huge ones neither."""


@st.composite
def decimals_with_specials(draw: st.DrawFn) -> decimal.Decimal:
    """Decimals including NaN, infinities and signed zero (compare them by ``str``)."""
    return draw(st.one_of(st.decimals(), st.sampled_from([decimal.Decimal("-0"), decimal.Decimal("sNaN")])))


@st.composite
def uuid_values(draw: st.DrawFn) -> uuid.UUID:
    """UUIDs of every version."""
    return draw(st.uuids(version=draw(st.sampled_from([None, 1, 3, 4, 5]))))


DEFAULT_Y: Any = 7
"""Default of ``y`` in the two-parameter functions the key tests decorate: ``async def f(x, y=7)``."""

_CALL_STYLES = ("positional", "keyword", "positional+default", "all-positional", "all-keyword", "reversed-keyword")


def spell_call(value: Any, style: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``(args, kwargs)`` of ``f(value)`` for ``async def f(x, y=DEFAULT_Y)``, spelled in ``style``."""
    return {
        "positional": ((value,), {}),
        "keyword": ((), {"x": value}),
        "positional+default": ((value,), {"y": DEFAULT_Y}),
        "all-positional": ((value, DEFAULT_Y), {}),
        "all-keyword": ((), {"x": value, "y": DEFAULT_Y}),
        "reversed-keyword": ((), {"y": DEFAULT_Y, "x": value}),
    }[style]


@st.composite
def equivalent_calls(
    draw: st.DrawFn, values: st.SearchStrategy[Any] = keyable_values
) -> tuple[Any, tuple[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
    """A value and two spellings of the same call ``f(value)`` of ``async def f(x, y=DEFAULT_Y)``."""
    value = draw(values)
    first, second = draw(st.lists(st.sampled_from(_CALL_STYLES), min_size=2, max_size=2))
    return value, spell_call(value, first), spell_call(value, second)
