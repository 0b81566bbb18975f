"""Cache keys: normalised through the signature, distinct for distinct arguments, stable across processes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayers import MemoryBackend, Settings, TieredCache, UnkeyableArgumentError, multilevel_cached
from cachelayers.backends.memory import STORAGE_KEY
from cachelayers.keys import CANONICAL, KeyBuilder, canonical_bytes, function_identity
from tests.strategies import DEFAULT_Y, equivalent_calls, keyable_values

ROOT = Path(__file__).resolve().parent.parent
HEX_DIGEST = re.compile(r"[0-9a-f]{40}")


async def f(x: Any, y: Any = DEFAULT_Y) -> Any:
    """The function most key tests key calls of."""
    return x


def key_of(builder: KeyBuilder, *args: Any, **kwargs: Any) -> tuple[Any, str]:
    """The local key and the storage digest of one call."""
    local = builder.local(args, kwargs)
    return local, builder.storage_digest(local)


def typed_equal(a: Any, b: Any) -> bool:
    """Equality as a cache key sees it, written independently of the key code: same types all the way down.

    ``1``, ``1.0`` and ``True`` differ, as do ``"a"`` and ``b"a"``, tuples and lists, sets and frozensets,
    ``0.0`` and ``-0.0``, ``Decimal("1.0")`` and ``Decimal("1.00")``, and one instant in two time zones;
    every NaN is one value and dict order does not matter.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(typed_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return ({(type(k), k) for k in a} == {(type(k), k) for k in b}
                and all(typed_equal(a[k], b[k]) for k in a))
    if isinstance(a, set | frozenset):
        return {(type(k), k) for k in a} == {(type(k), k) for k in b}
    if isinstance(a, dt.date | dt.time):
        return bool(a.isoformat() == b.isoformat())
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    return bool(a == b)


def twin(value: Any) -> Any:
    """A value that Python may consider equal but of another type (or, for dicts, another order)."""
    if type(value) is bool:
        return int(value)
    if type(value) is int:
        return float(value) if abs(value) < 2**53 else str(value)
    if type(value) is float:
        return -value if value == 0 else value
    if type(value) is str:
        return value.encode()
    if type(value) is bytes:
        return bytearray(value).decode("latin-1")
    if type(value) is tuple:
        return list(value)
    if type(value) is list:
        return tuple(value)
    if type(value) is set:
        return frozenset(value)
    if type(value) is frozenset:
        return set(value)
    if type(value) is dict:
        return dict(reversed(list(value.items())))
    return value


@st.composite
def value_pairs(draw: st.DrawFn) -> tuple[Any, Any]:
    """Two arguments: independent, a copy, or a twin of the first (the cases where keys are easy to get wrong)."""
    a = draw(keyable_values)
    how = draw(st.sampled_from(["independent", "copy", "twin"]))
    if how == "independent":
        return a, draw(keyable_values)
    if how == "copy":
        return a, structural_copy(a)
    return a, twin(a)


def structural_copy(value: Any) -> Any:
    """A structural copy of ``value``: equal, but never the same object."""
    if isinstance(value, list):
        return [structural_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(structural_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: structural_copy(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return type(value)(value)
    return value


# -- normalisation through the signature --------------------------------------------------------------------


@given(equivalent_calls())
def test_spellings_of_one_call_share_local_key_and_digest(call: Any) -> None:
    """f(v), f(x=v), f(v, y=<default>)... give one local key and one storage digest (KeyBuilder path)."""
    _, (args1, kwargs1), (args2, kwargs2) = call
    builder = KeyBuilder(f)
    assert key_of(builder, *args1, **kwargs1) == key_of(builder, *args2, **kwargs2)


@pytest.mark.anyio
@settings(max_examples=60)
@given(call=equivalent_calls())
async def test_compiled_wrapper_keys_calls_like_key_builder(call: Any) -> None:
    """Through the decorated function, the spellings of one call hit one entry, stored under the key that
    `KeyBuilder.local` builds, with the storage key `<prefix><namespace>:<KeyBuilder.storage_digest>`."""
    _, (args1, kwargs1), (args2, kwargs2) = call
    runs = 0

    async def g(x: Any, y: Any = DEFAULT_Y) -> str:
        nonlocal runs
        runs += 1
        return "result"

    # A lower tier names entries by storage key (a memory-only engine needs none and records none).
    lower = MemoryBackend()
    cache = TieredCache(Settings(key_prefix="kt:"), backends={"memory": MemoryBackend(), "lower": lower})
    cached = multilevel_cached(cache=cache)(g)
    builder = KeyBuilder(g)  # before the calls: the identity holds what g closes over (runs) as it was decorated
    assert await cached(*args1, **kwargs1) == "result"
    assert await cached(*args2, **kwargs2) == "result"
    assert runs == 1
    assert cache.local is not None
    [(local_key, slot)] = cache.local.slots.items()
    assert local_key == builder.local(args1, kwargs1) == builder.local(args2, kwargs2)
    expected = f"kt:{builder.namespace}:{builder.storage_digest(local_key)}"
    assert slot[STORAGE_KEY] == expected
    assert list(lower.slots) == [expected]


@pytest.mark.anyio
async def test_compiled_wrapper_handles_every_parameter_kind() -> None:
    """Positional-only, keyword-only and defaulted parameters normalise the same way in the wrapper."""
    runs: list[tuple[int, int, int]] = []

    async def g(a: int, /, b: int = 2, *, c: int = 3) -> int:
        runs.append((a, b, c))
        return a + b + c

    cached = multilevel_cached(cache=TieredCache(Settings()))(g)
    assert await cached(1) == 6
    assert await cached(1, 2) == 6
    assert await cached(1, b=2) == 6
    assert await cached(1, c=3) == 6
    assert await cached(1, b=2, c=3) == 6
    assert await cached(1, c=4) == 7
    assert runs == [(1, 2, 3), (1, 2, 4)]
    builder = KeyBuilder(g)
    assert builder.local((1,), {}) == builder.local((1, 2), {"c": 3})


# -- distinct arguments, distinct keys ----------------------------------------------------------------------


@settings(max_examples=300)
@given(value_pairs())
def test_keys_are_equal_exactly_when_arguments_are_typed_equal(pair: tuple[Any, Any]) -> None:
    """Never a key shared by different arguments, always one for equal ones (both key forms)."""
    a, b = pair
    builder = KeyBuilder(f)
    local_a, digest_a = key_of(builder, a)
    local_b, digest_b = key_of(builder, b)
    expected = typed_equal(a, b)
    assert (local_a == local_b) is expected
    assert (digest_a == digest_b) is expected


class Point(NamedTuple):
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class Box:
    width: int
    height: int


class Color(enum.Enum):
    RED = 1


class Account:
    """An object keyed by its ``__cache_key__``."""

    def __init__(self, account_id: str, session: object) -> None:
        self.account_id = account_id
        self.session = session

    def __cache_key__(self) -> str:
        return self.account_id


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(1, 1.0, id="int-float"),
        pytest.param(1, True, id="int-bool"),
        pytest.param(1.0, True, id="float-bool"),
        pytest.param(0, False, id="zero-false"),
        pytest.param("a", b"a", id="str-bytes"),
        pytest.param((1, 2), [1, 2], id="tuple-list"),
        pytest.param({1, 2}, frozenset({1, 2}), id="set-frozenset"),
        pytest.param(0.0, -0.0, id="signed-zero"),
        pytest.param(None, "None", id="none-text"),
        pytest.param(1, "1", id="int-text"),
        pytest.param(2**64, 2**64 + 1, id="big-ints"),
        pytest.param(2**63, float(2**63), id="big-int-float"),
        pytest.param(Point(1, 2), (1, 2), id="namedtuple-tuple"),
        pytest.param(Color.RED, 1, id="enum-value"),
        pytest.param(dt.date(2024, 1, 2), dt.datetime(2024, 1, 2), id="date-datetime"),
        pytest.param(dt.datetime(2024, 1, 2, 3), dt.datetime(2024, 1, 2, 3, tzinfo=dt.UTC), id="naive-aware"),
        pytest.param(decimal.Decimal("1.0"), decimal.Decimal("1.00"), id="decimal-exponent"),
        pytest.param(np.array([1, 2], dtype=np.int64), np.array([1, 2], dtype=np.float64), id="array-dtype"),
        pytest.param(np.array([1, 2]), np.array([[1, 2]]), id="array-shape"),
        pytest.param(np.array([1, 2]), [1, 2], id="array-list"),
        pytest.param(np.array(5), np.array([5]), id="array-0d-1d"),
        pytest.param(Box(1, 2), Box(2, 1), id="dataclass-fields"),
        pytest.param({"a": 1}, {"a": 1.0}, id="dict-value-type"),
        pytest.param([[1]], [(1,)], id="nested-tuple-list"),
    ],
)
def test_different_arguments_never_share_a_key(a: Any, b: Any) -> None:
    """Values Python may call equal but a function may tell apart get different keys."""
    builder = KeyBuilder(f)
    local_a, digest_a = key_of(builder, a)
    local_b, digest_b = key_of(builder, b)
    assert local_a != local_b
    assert digest_a != digest_b


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param({"a": 1, "b": 2}, {"b": 2, "a": 1}, id="dict-order"),
        pytest.param({3, 1, 2}, {2, 3, 1}, id="set-order"),
        pytest.param(float("nan"), -float("nan"), id="nan"),
        pytest.param(Box(1, 2), Box(1, 2), id="dataclass"),
        pytest.param(Point(1, 2), Point(x=1, y=2), id="namedtuple"),
        pytest.param(np.arange(6).reshape(2, 3), np.asfortranarray(np.arange(6).reshape(2, 3)), id="array-layout"),
        pytest.param(Account("acct-1", object()), Account("acct-1", object()), id="cache-key-method"),
        pytest.param(dt.datetime(2024, 1, 2, tzinfo=dt.UTC), dt.datetime(2024, 1, 2, tzinfo=dt.UTC), id="datetime"),
    ],
)
def test_equal_arguments_share_a_key(a: Any, b: Any) -> None:
    """Equal values share a key whatever their order, layout or identity."""
    builder = KeyBuilder(f)
    assert key_of(builder, a) == key_of(builder, b)


def test_big_ints_key_like_their_canonical_form() -> None:
    """An int beyond 64 bits takes the fast path of the local key, and its storage digest is the one of the
    call's canonical encoding (what a call with non-scalar arguments hashes)."""
    builder = KeyBuilder(f)
    local, digest = key_of(builder, 2**70)
    assert local == (builder.token, 2**70, DEFAULT_Y)
    assert HEX_DIGEST.fullmatch(digest)
    assert digest != key_of(builder, -(2**70))[1]
    assert digest == builder.storage_digest((builder.token, CANONICAL, canonical_bytes([2**70, DEFAULT_Y])))
    assert key_of(builder, 1)[1] == builder.storage_digest((builder.token, CANONICAL, canonical_bytes([1, DEFAULT_Y])))


# -- identity, version, namespace, key= and ignore= -----------------------------------------------------------


async def other(x: Any, y: Any = DEFAULT_Y) -> Any:
    """Same signature and body as `f`, another identity."""
    return x


def test_function_identity_version_and_namespace_change_the_key() -> None:
    """The key of one call differs between functions, versions and namespaces; ``name=`` keeps it."""
    digests = {
        "f": key_of(KeyBuilder(f), 1)[1],
        "other": key_of(KeyBuilder(other), 1)[1],
        "f v1": key_of(KeyBuilder(f, version=1), 1)[1],
        "f v2": key_of(KeyBuilder(f, version=2), 1)[1],
        "f ns": key_of(KeyBuilder(f, namespace="elsewhere"), 1)[1],
    }
    assert len(set(digests.values())) == len(digests)
    assert KeyBuilder(f, version=1).local((1,), {}) != KeyBuilder(f, version=2).local((1,), {})
    assert KeyBuilder(f).local((1,), {}) != KeyBuilder(other).local((1,), {})
    # A function moved to another module keeps its entries when it keeps its name=.
    assert key_of(KeyBuilder(f, name="pipeline.answer"), 1) == key_of(KeyBuilder(other, name="pipeline.answer"), 1)
    assert function_identity(f) == "tests.test_keys.f"


async def _positional(a: Any, b: Any, c: Any = "c", d: Any = None) -> Any:
    return a


@given(args=st.lists(keyable_values, max_size=5), kwargs=st.dictionaries(st.sampled_from("abcde"), keyable_values,
                                                                          max_size=2))
def test_arguments_are_what_the_signature_binds(args: list[Any], kwargs: dict[str, Any]) -> None:
    """`KeyBuilder.arguments` (which skips `inspect.Signature.bind` for positional calls) returns what ``bind`` and
    ``apply_defaults`` return, in the same order, and raises TypeError exactly when ``bind`` does."""
    signature = inspect.signature(_positional)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        with pytest.raises(TypeError):
            KeyBuilder(_positional).arguments(tuple(args), kwargs)
        return
    bound.apply_defaults()
    got = KeyBuilder(_positional).arguments(tuple(args), kwargs)
    assert list(got.items()) == list(bound.arguments.items())
    assert all(got[name] is bound.arguments[name] for name in got)


def test_key_function_replaces_the_arguments() -> None:
    """``key=`` is called with the arguments by name, defaults applied, and its result is keyed."""

    async def ask(question: str, model: str = "small") -> str:
        return question

    builder = KeyBuilder(ask, key=lambda question, **_: question.strip().lower())
    assert key_of(builder, "Hello ") == key_of(builder, question="hello", model="large")
    assert key_of(builder, "hello") != key_of(builder, "goodbye")


def test_ignored_parameters_are_left_out() -> None:
    """An argument listed in ``ignore=`` never changes the key."""

    async def fetch(client: object, url: str) -> str:
        return url

    builder = KeyBuilder(fetch, ignore=("client",))
    assert key_of(builder, object(), "https://a") == key_of(builder, client=object(), url="https://a")
    assert key_of(builder, None, "https://a") != key_of(builder, None, "https://b")


# -- storage digests -----------------------------------------------------------------------------------------

SAMPLE_CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1,), {}),
    ((), {"x": "question about tax rules", "y": 3}),
    ((b"\x00bytes",), {}),
    (([1, 2.5, None, True],), {}),
    (({"model": "m", "temperature": 0.2, "stop": ("\n",)},), {}),
    (({3, 1, 2},), {}),
    ((2**80,), {}),
    ((dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC), decimal.Decimal("1.50")), {}),
    ((np.arange(4, dtype=np.float32).reshape(2, 2),), {}),
    ((Box(3, 4),), {}),
]


def digest_table() -> list[str]:
    """Storage digests of `SAMPLE_CALLS` (called in this process and in fresh interpreters)."""
    builder = KeyBuilder(f)
    return [key_of(builder, *args, **kwargs)[1] for args, kwargs in SAMPLE_CALLS]


def test_storage_digests_are_stable_across_processes() -> None:
    """Fresh interpreters with other hash seeds compute the same digests: no ``hash()`` anywhere."""
    here = digest_table()
    assert len(set(here)) == len(here)
    for seed in ("4242",):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", "import json, tests.test_keys as t; print(json.dumps(t.digest_table()))"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60,
        )
        assert json.loads(out.stdout) == here


def test_storage_digests_are_stable_across_releases() -> None:
    """Known digests: a change of the key encoding shows up here (it would orphan every stored entry)."""
    builder = KeyBuilder(f, name="stable.identity")
    assert key_of(builder, 1)[1] == "d4055117ba150872446a2c387a3d72015433c67e"
    assert key_of(builder, "text", y=[1, (2, 3)])[1] == "fb6173745297ab09564eb81e84c291d911ad6c40"


def test_storage_digests_never_contain_argument_text() -> None:
    """A storage digest is 40 hex characters whatever the arguments; no argument text leaks into it."""
    builder = KeyBuilder(f)
    for args, kwargs in [*SAMPLE_CALLS, (("sk-live-SECRET-token-1234",), {})]:
        digest = key_of(builder, *args, **kwargs)[1]
        assert HEX_DIGEST.fullmatch(digest)
        assert "SECRET" not in digest
        assert "question" not in digest


# -- unkeyable arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "argument"),
    [
        pytest.param((object(),), {}, "x", id="object"),
        pytest.param(([1, object()],), {}, "x[1]", id="in-list"),
        pytest.param(({"meta": object()},), {}, "x['meta']", id="in-dict"),
        pytest.param((1,), {"y": [{"a": lambda: 0}]}, "y[0]['a']", id="keyword-nested"),
        pytest.param((np.array([object()]),), {}, "x", id="object-array"),
    ],
)
def test_unkeyable_argument_names_its_path(args: tuple[Any, ...], kwargs: dict[str, Any], argument: str) -> None:
    """An argument without a canonical encoding raises a TypeError naming the parameter and the path in it."""
    with pytest.raises(UnkeyableArgumentError) as info:
        KeyBuilder(f).local(args, kwargs)
    assert isinstance(info.value, TypeError)
    assert info.value.argument == argument
    assert repr(argument) in str(info.value)
    assert "tests.test_keys.f" in str(info.value)


def test_canonical_bytes_rejects_unkeyable_values() -> None:
    """`canonical_bytes` raises a plain TypeError naming the path."""
    with pytest.raises(TypeError, match=r"value\[0\]"):
        canonical_bytes([object()])
    assert canonical_bytes({"b": 1, "a": 2}) == canonical_bytes({"a": 2, "b": 1})
