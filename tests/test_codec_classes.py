"""Results users actually return: dataclasses, pydantic v2 models, NamedTuples, TypedDicts and enums round-trip
as the same class, without registration, when the function's return annotation allows them — and stored
bytes never make a codec import or instantiate a class the function did not name.

This module uses ``from __future__ import annotations`` on purpose: every annotation below is a string that
`allowed_types` has to resolve.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import enum
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Optional, TypedDict

import msgpack
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachelayers
from cachelayers import Codec, ConfigError, IntegrityError, SerializationError, register_codec
from cachelayers.codec import allowed_types, types_in

KEY = "cl:ns:0123456789abcdef0123456789abcdef01234567"
SECRET = "a-secret-of-32-bytes-for-signing"
EXT_CLASS = 15  # the extension code of values stored by class name


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


@dataclasses.dataclass
class Segment:
    start: Point
    end: Point | None
    color: Color
    labels: tuple[str, ...] = ()


@dataclasses.dataclass(slots=True)
class Counted:
    """A slotted dataclass with a field outside __init__ that __post_init__ computes."""

    values: list[int]
    total: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.values)


class Pair(NamedTuple):
    left: Point
    right: int


class Usage(pydantic.BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Choice(pydantic.BaseModel):
    text: str
    priority: Priority
    created: dt.datetime
    finish_reason: Optional[str] = None  # noqa: UP045  # the spelling the SDKs use


class Reply(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    id: str
    choices: list[Choice]
    usage: Usage | None = None
    points: dict[str, Point] = {}
    _request_id: str | None = pydantic.PrivateAttr(default=None)


class Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    pair: Pair
    when: dt.date


class Node(pydantic.BaseModel):
    name: str
    children: list[Node] = []


class Document(TypedDict):
    title: str
    reply: Reply
    pairs: list[Pair]


class Loose(pydantic.BaseModel):
    anything: Any = None


async def returns_reply() -> Reply:
    raise NotImplementedError


def returns_segments() -> list[Segment] | None:
    raise NotImplementedError


def returns_mapping() -> dict[str, Pair]:
    raise NotImplementedError


def returns_tuple() -> tuple[Point, Usage]:
    raise NotImplementedError


def returns_annotated() -> Annotated[Point, Usage]:
    raise NotImplementedError


def returns_document() -> Document:
    raise NotImplementedError


def returns_node() -> Node:
    raise NotImplementedError


def returns_everything() -> list[Reply | Segment | Pair | Counted | Frozen | Node]:
    raise NotImplementedError


def returns_literal() -> Literal["a", "b"] | int:
    raise NotImplementedError


def returns_missing() -> MissingName:  # type: ignore[name-defined]  # noqa: F821
    raise NotImplementedError


def returns_nothing(): ...  # type: ignore[no-untyped-def]


@functools.wraps(returns_reply)
async def wrapper() -> Any: ...


def codec_for(fn: Any, **kwargs: Any) -> Codec:
    return Codec(**kwargs).with_types(allowed_types(fn))


EVERYTHING = codec_for(returns_everything)


def round_trip(value: Any, codec: Codec = EVERYTHING) -> Any:
    return codec.decode_value(codec.encode_value(value))


def assert_same(a: Any, b: Any) -> None:
    """Equal values of the same classes, all the way down."""
    assert type(a) is type(b), (a, b)
    if dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name))
    elif isinstance(a, pydantic.BaseModel):
        for name in type(a).model_fields:
            assert_same(getattr(a, name), getattr(b, name))
        assert a.model_fields_set == b.model_fields_set
        assert a.model_extra == b.model_extra
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    if isinstance(a, dt.datetime):
        assert a.utcoffset() == b.utcoffset()
    assert a == b


CREATED = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)


def a_reply() -> Reply:
    reply = Reply(id="r1", choices=[Choice(text="hi", priority=Priority.HIGH, created=CREATED)],
                  usage=Usage(prompt_tokens=3, completion_tokens=1), points={"a": Point(1, 2.5)},
                  system_fingerprint="fp_1")  # type: ignore[call-arg]  # an extra field
    reply._request_id = "req_123"
    return reply


# -- which classes a function allows -----------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "expected"), [
    (returns_reply, {Reply, Choice, Usage, Priority, Point}),
    (wrapper, {Reply, Choice, Usage, Priority, Point}),
    (returns_segments, {Segment, Point, Color}),
    (returns_mapping, {Pair, Point}),
    (returns_tuple, {Point, Usage}),
    (returns_annotated, {Point}),  # Annotated metadata is not a type of the value
    (returns_document, {Reply, Choice, Usage, Priority, Point, Pair}),  # TypedDict: its fields, not itself
    (returns_node, {Node}),  # a recursive model ends
    (returns_literal, set()),
    (returns_missing, set()),  # an annotation that cannot be resolved allows nothing
    (returns_nothing, set()),
], ids=lambda v: getattr(v, "__name__", "") or None)
def test_allowed_types_walk_the_return_annotation(fn: Any, expected: set[type]) -> None:
    """The classes named by the return annotation, through unions, generics, Annotated, TypedDicts and the
    fields of the classes met — string annotations resolved in their module."""
    assert allowed_types(fn) == expected


def test_forward_references_inside_generics_are_resolved() -> None:
    """``list["Segment"]`` (a generic holding a string, as written without the __future__ import) is resolved in
    the function's module."""

    def returns_forward() -> Any:
        raise NotImplementedError

    returns_forward.__annotations__["return"] = list["Segment"]
    assert allowed_types(returns_forward) == {Segment, Point, Color}


def test_types_in_takes_an_evaluated_annotation() -> None:
    """`types_in` walks an annotation object directly: Optional, nested generics, NamedTuple fields."""
    assert types_in(Optional[dict[str, list[Pair]]]) == {Pair, Point}  # noqa: UP045
    assert types_in(int | str | None) == set()


# -- round trips ----------------------------------------------------------------------------------------------


def test_pydantic_model_comes_back_as_its_class_with_its_state() -> None:
    """Nested models, lists and dicts of them, Optional fields, datetimes and enums inside; the fields set,
    the extra fields and the private attributes are kept (``exclude_unset`` dumps stay equal)."""
    reply = a_reply()
    decoded = round_trip(reply)
    assert_same(decoded, reply)
    assert decoded._request_id == "req_123"
    assert decoded.model_dump(exclude_unset=True) == reply.model_dump(exclude_unset=True)
    assert decoded.model_dump_json() == reply.model_dump_json()
    assert type(decoded.choices[0].priority) is Priority


def test_dataclasses_named_tuples_and_frozen_models_round_trip() -> None:
    """Frozen, slotted and nested dataclasses; NamedTuples stay NamedTuples (not plain tuples)."""
    values = [
        Segment(Point(1, 0.5), None, Color.BLUE, ("a", "b")),
        Counted([1, 2, 3]),
        Pair(Point(-1, 1e300), 7),
        Frozen(pair=Pair(Point(0, 0.0), 1), when=dt.date(2024, 1, 2)),
        Node(name="root", children=[Node(name="leaf")]),
        {"doc": {"title": "t", "reply": a_reply(), "pairs": [Pair(Point(2, 2.0), 2)]}},
    ]
    for value in values:
        assert_same(round_trip(value), value)


def test_typed_dict_results_are_dicts_with_their_classes_inside() -> None:
    """A TypedDict value is a dict at run time: it comes back as one, its models as their classes."""
    document: Document = {"title": "t", "reply": a_reply(), "pairs": [Pair(Point(1, 1.0), 1)]}
    codec = codec_for(returns_document)
    decoded = round_trip(document, codec)
    assert_same(decoded, document)


def test_state_is_restored_without_running_init_again() -> None:
    """Decoding restores what the function returned, as pickle does: __post_init__ does not run again."""
    counted = Counted([1, 2])
    counted.total = 100  # changed after construction
    assert round_trip(counted).total == 100


def test_envelopes_carry_allowed_classes_signed_or_not() -> None:
    """seal/open round-trip allowed classes; an entry holding them opens only for a codec allowing them."""
    for base in (Codec(), Codec(secret=SECRET)):
        codec = base.with_types(allowed_types(returns_reply))
        envelope = codec.open(KEY, codec.seal(KEY, a_reply(), None, ("t",)))
        assert_same(envelope.value, a_reply())
        assert base.open(KEY, codec.seal(KEY, {"plain": 1}, None)).value == {"plain": 1}
        with pytest.raises(SerializationError, match="does not allow") as info:
            base.open(KEY, codec.seal(KEY, a_reply(), None))
        assert not isinstance(info.value, IntegrityError)  # the entry is intact; the engine counts it corrupt


def test_with_types_shares_everything_but_the_table() -> None:
    """One codec per function is cheap: the same codec back when nothing is added, the tables add up, the
    base codec is unchanged."""
    base = Codec(secret=SECRET)
    assert base.with_types(()) is base
    reply_codec = base.with_types(allowed_types(returns_reply))
    assert reply_codec.with_types([Usage]) is reply_codec
    both = reply_codec.with_types([Segment, Color])
    assert both.types == reply_codec.types | {Segment, Color}
    assert base.types == frozenset()
    assert Codec(types=[Point]).types == {Point}
    assert_same(round_trip(Segment(Point(1, 1.0), None, Color.RED), both), Segment(Point(1, 1.0), None, Color.RED))


def test_registered_classes_keep_their_registration() -> None:
    """A registered class is stored by its registered codec (and readable by every codec), allowed or not."""

    @dataclasses.dataclass
    class Celsius:
        degrees: float

    register_codec(Celsius, name="tests.codec_classes.Celsius", encode=lambda c: c.degrees,
                   decode=lambda d: Celsius(d + 0))
    blob = Codec(types=[Celsius]).encode_value(Celsius(21.5))
    assert b"tests.codec_classes.Celsius" in blob
    assert Codec().decode_value(blob) == Celsius(21.5)


# -- what is refused ------------------------------------------------------------------------------------------


def test_a_class_the_function_does_not_name_is_unstorable() -> None:
    """Encoding an instance of a class that is neither allowed nor registered raises SerializationError (the
    engine returns the result uncached and counts it as unstorable) — from every encoding entry point."""
    codec = codec_for(returns_tuple)  # allows Point and Usage only
    for value in (Segment(Point(1, 1.0), None, Color.RED), [Pair(Point(1, 1.0), 1)], Loose(anything=object())):
        for encode in (codec.encode_value, lambda v: codec.pack_body(v, ("t",)),
                       lambda v: codec.seal(KEY, v, None), lambda v: codec.body_size(v, ())):
            with pytest.raises(SerializationError, match="return annotation"):
                encode(value)
    assert isinstance(codec.encode_value((Point(1, 1.0), Usage(prompt_tokens=1, completion_tokens=2))), bytes)


def test_a_value_inside_an_allowed_class_must_be_storable_too() -> None:
    """An `Any` field holding an enum the annotation never named, or a cycle: SerializationError."""
    codec = Codec(types=[Loose, Segment, Point])
    with pytest.raises(SerializationError):
        codec.encode_value(Loose(anything=Color.RED))
    cyclic = Segment(Point(1, 1.0), None, Color.RED)
    cyclic.labels = (cyclic,)  # type: ignore[assignment]
    with pytest.raises(SerializationError):
        codec.with_types([Color]).encode_value(cyclic)


def test_a_class_that_changed_is_a_miss() -> None:
    """A stored state whose fields are not the class's current ones is refused, never half-restored."""
    blob = Codec(types=[Point]).encode_value(Point(1, 2.0))
    moved = dataclasses.make_dataclass("Point", [("x", int), ("y", float), ("z", int)], frozen=True)
    moved.__module__, moved.__qualname__ = Point.__module__, Point.__qualname__
    with pytest.raises(SerializationError, match="do not match"):
        Codec(types=[moved]).decode_value(blob)


def test_table_mistakes_are_config_errors() -> None:
    """A class of another kind, or two classes under one name, is a ConfigError when the codec is made."""
    with pytest.raises(ConfigError, match="not a dataclass"):
        Codec(types=[dict])
    twin = dataclasses.make_dataclass("Point", [("x", int)])
    twin.__module__, twin.__qualname__ = Point.__module__, Point.__qualname__
    with pytest.raises(ConfigError, match="share this name"):
        Codec().with_types([Point, twin])


def forged(name: str, state: Any) -> bytes:
    """A bare value naming ``name``, as someone able to write to a shared store could make it."""
    inner = msgpack.packb([name, state], use_bin_type=True)
    return bytes(msgpack.packb(msgpack.ExtType(EXT_CLASS, inner), use_bin_type=True))


@pytest.mark.parametrize("name", ["subprocess.Popen", "os._wrap_close", f"{__name__}.Segment",
                                  "tests.never_written_module.Evil", "builtins.eval"])
def test_forged_names_are_refused_without_any_import(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes naming a loaded class, an unknown module or a builtin are a SerializationError for a codec that
    does not allow that name; no import is even attempted."""
    imports: list[str] = []
    real_import = builtins.__import__

    def watching_import(module: str, *args: Any, **kwargs: Any) -> Any:
        imports.append(module)
        return real_import(module, *args, **kwargs)

    codec = codec_for(returns_tuple)
    monkeypatch.setattr(builtins, "__import__", watching_import)
    with pytest.raises(SerializationError, match="does not allow"):
        codec.decode_value(forged(name, {"x": 1, "y": 2.0}))
    monkeypatch.undo()
    assert imports == []


def test_a_class_in_a_module_never_imported_is_not_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real entry written by another process for a class of a module this process never imported: reading it
    is a SerializationError, the module stays unimported (importing it would leave a mark)."""
    mark = tmp_path / "imported"
    (tmp_path / "planted_results.py").write_text(textwrap.dedent(f"""
        import dataclasses, pathlib
        pathlib.Path({str(mark)!r}).write_text("imported")

        @dataclasses.dataclass
        class Planted:
            x: int
    """))
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import planted_results
        from cachelayers import Codec
        codec = Codec(secret={SECRET!r}, types=[planted_results.Planted])
        print(codec.seal({KEY!r}, [planted_results.Planted(1)], None).hex())
    """)
    src = str(Path(cachelayers.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    blob = bytes.fromhex(subprocess.run([sys.executable, "-c", writer], check=True, capture_output=True,
                                        text=True, env=env, timeout=60).stdout)
    mark.unlink()
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, were the codec to try
    for reader in (Codec(secret=SECRET), codec_for(returns_everything, secret=SECRET)):
        with pytest.raises(SerializationError, match=r"planted_results\.Planted"):
            reader.open(KEY, blob)
    assert "planted_results" not in sys.modules
    assert not mark.exists()


def msgpack_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)


msgpack_values = st.recursive(st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | st.floats(),
                              msgpack_containers, max_leaves=10)


@settings(max_examples=200)
@given(st.sampled_from([f"{Reply.__module__}.{cls.__qualname__}" for cls in (Reply, Point, Pair, Color)]),
       msgpack_values)
def test_malformed_states_of_allowed_classes_are_serialization_errors(name: str, state: Any) -> None:
    """Whatever state stored bytes give an allowed class, decoding yields that class or a SerializationError —
    never another exception."""
    try:
        value = EVERYTHING.decode_value(forged(name, state))
    except SerializationError:
        return
    assert f"{type(value).__module__}.{type(value).__qualname__}" == name


# -- property: generated nested values -----------------------------------------------------------------------

texts = st.text(max_size=6)
finite = st.floats(allow_nan=False)
points = st.builds(Point, st.integers(), finite)
segments = st.builds(Segment, points, st.none() | points, st.sampled_from(Color),
                     st.lists(texts, max_size=2).map(tuple))
pairs = st.builds(Pair, points, st.integers(-(2**70), 2**70))
usages = st.builds(Usage, prompt_tokens=st.integers(0, 10**6), completion_tokens=st.integers(0, 10**6))
choices = st.builds(Choice, text=texts, priority=st.sampled_from(Priority),
                    created=st.datetimes(timezones=st.none() | st.just(dt.UTC)), finish_reason=st.none() | texts)
replies = st.builds(Reply, id=texts, choices=st.lists(choices, max_size=2), usage=st.none() | usages,
                    points=st.dictionaries(texts, points, max_size=2))
frozens = st.builds(Frozen, pair=pairs, when=st.dates())
nodes = st.recursive(st.builds(Node, name=texts),
                     lambda c: st.builds(Node, name=texts, children=st.lists(c, max_size=2)), max_leaves=4)
classed = st.one_of(points, segments, pairs, usages, choices, replies, frozens, nodes,
                    st.lists(st.integers(), max_size=3).map(Counted))
nested = st.recursive(classed, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3)
                      | st.tuples(c, c), max_leaves=6)


def holds_a_class(value: Any) -> bool:
    if isinstance(value, dict):
        return any(holds_a_class(v) for v in value.values())
    if type(value) in (list, tuple):
        return any(holds_a_class(v) for v in value)
    return True


@settings(max_examples=150, deadline=None)
@given(nested.filter(holds_a_class))
def test_generated_values_round_trip_as_their_classes(value: Any) -> None:
    """decode(encode(v)) == v with the same class at every level; a codec without the classes refuses the bytes
    (and one allowing other classes refuses them too)."""
    blob = EVERYTHING.encode_value(value)
    assert_same(EVERYTHING.decode_value(blob), value)
    for stranger in (Codec(), Codec(types=[Loose])):
        with pytest.raises(SerializationError, match="does not allow"):
            stranger.decode_value(blob)


# -- the real SDKs ------------------------------------------------------------------------------------------

COMPLETION = {
    "id": "chatcmpl-AbC123", "object": "chat.completion", "created": 1714567890, "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_9d50cd990b", "service_tier": "default",
    "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "refusal": None, "annotations": [],
                    "tool_calls": [{"id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        "logprobs": {"content": [{"token": "Hi", "logprob": -0.01, "bytes": [72, 105],
                                  "top_logprobs": [{"token": "Hi", "logprob": -0.01, "bytes": [72, 105]}]}],
                     "refusal": None},
    }],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
}

MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-20250514", "stop_reason": "tool_use", "stop_sequence": None,
    "content": [
        {"type": "thinking", "thinking": "The user wants the weather.", "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": "Let me check.", "citations": None},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"city": "Paris", "unit": "celsius"}},
    ],
    "usage": {"input_tokens": 472, "output_tokens": 91, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 128, "service_tier": "standard"},
}


def check_sdk_round_trip(fn: Any, value: Any) -> Any:
    codec = codec_for(fn, secret=SECRET)
    decoded = codec.open(KEY, codec.seal(KEY, value, None)).value
    assert_same(decoded, value)
    assert decoded.model_dump(exclude_unset=True) == value.model_dump(exclude_unset=True)
    assert decoded.to_json() == value.to_json()
    with pytest.raises(SerializationError):
        Codec(secret=SECRET).open(KEY, codec.seal(KEY, value, None))
    return decoded


def test_openai_chat_completion_round_trips() -> None:
    """A real `openai.types.chat.ChatCompletion` with a tool call, logprobs and usage details."""
    chat = pytest.importorskip("openai.types.chat")

    async def complete() -> Any:
        raise NotImplementedError

    complete.__annotations__["return"] = chat.ChatCompletion  # the SDK is imported by the test only
    value = chat.ChatCompletion.model_validate(COMPLETION)
    decoded = check_sdk_round_trip(complete, value)
    call = decoded.choices[0].message.tool_calls[0]
    assert type(call) is type(value.choices[0].message.tool_calls[0])
    assert call.function.arguments == "{\"city\": \"Paris\"}"


def test_anthropic_message_round_trips() -> None:
    """A real `anthropic.types.Message` with thinking, text and tool-use blocks and cache usage."""
    types = pytest.importorskip("anthropic.types")

    async def create() -> Any:
        raise NotImplementedError

    create.__annotations__["return"] = Optional[types.Message]  # noqa: UP045
    value = types.Message.model_validate(MESSAGE)
    decoded = check_sdk_round_trip(create, value)
    assert [type(block).__name__ for block in decoded.content] == ["ThinkingBlock", "TextBlock", "ToolUseBlock"]
    assert decoded.content[2].input == {"city": "Paris", "unit": "celsius"}
