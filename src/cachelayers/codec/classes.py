"""Classes the codec stores by name without registration, and the walk that decides which are allowed.

Dataclasses, pydantic v2 models, ``NamedTuple`` classes and enums are stored as their stable name
(``module.qualname``) and their state; ``TypedDict`` values are plain dicts at run time and need nothing.
A codec decodes such a value only when the class is in its own table (`Codec.with_types`): the engine builds
that table from what the decorated function's return annotation names (`allowed_types`). Stored bytes
therefore never import a module and never instantiate a class the function did not name.

Decoding restores the stored state the way pickle does — ``cls.__new__`` then the fields (pydantic's own
``__setstate__`` for models) — so ``__init__``, ``__post_init__`` and validators do not run again. Only the
fields are kept (for pydantic models also the fields set, the extra fields and the private attributes); a
stored state whose fields are not exactly the class's current fields (the class changed since it was
written) is a `SerializationError`, hence a miss.

pydantic is never imported here: models are recognised by ``model_fields`` and ``model_dump``.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from cachelayers.errors import ConfigError, SerializationError

__all__ = ["ClassSpec", "allowed_types", "class_spec", "class_table", "types_in"]


class ClassSpec(NamedTuple):
    """How one class is stored: its stable name, and functions from an instance to its state and back."""

    cls: type
    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


def _is_pydantic_model(cls: type) -> bool:
    return hasattr(cls, "model_fields") and hasattr(cls, "model_dump")


def _is_named_tuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields") and hasattr(cls, "_make")


def _is_storable(cls: type) -> bool:
    return (issubclass(cls, enum.Enum) or _is_named_tuple(cls) or dataclasses.is_dataclass(cls)
            or _is_pydantic_model(cls))


def _check_fields(cls: type, state: Any, names: frozenset[str]) -> None:
    if type(state) is not dict or state.keys() != names:
        raise SerializationError(f"stored fields of {cls.__module__}.{cls.__qualname__} do not match the class "
                                 f"(it changed since the entry was written)")


def _dataclass_spec(cls: type, name: str) -> ClassSpec:
    fields = tuple(f.name for f in dataclasses.fields(cls))
    names = frozenset(fields)
    new: Any = cls.__new__
    setattr_ = object.__setattr__  # frozen and slotted dataclasses too

    def encode(obj: Any) -> Any:
        return {f: getattr(obj, f) for f in fields}

    def decode(state: Any) -> Any:
        _check_fields(cls, state, names)
        obj = new(cls)
        for f in fields:
            setattr_(obj, f, state[f])
        return obj

    return ClassSpec(cls, name, encode, decode)


def _named_tuple_spec(cls: type, name: str) -> ClassSpec:
    fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    names = frozenset(fields)
    make: Callable[[Iterable[Any]], Any] = cls._make  # type: ignore[attr-defined]

    def encode(obj: Any) -> Any:
        return dict(zip(fields, obj, strict=True))

    def decode(state: Any) -> Any:
        _check_fields(cls, state, names)
        return make([state[f] for f in fields])

    return ClassSpec(cls, name, encode, decode)


def _pydantic_spec(cls: type, name: str) -> ClassSpec:
    fields = tuple(cls.model_fields)  # type: ignore[attr-defined]
    names = frozenset(fields)
    new: Any = cls.__new__

    def encode(obj: Any) -> Any:
        # pydantic's pickle state: fields, fields set, extra fields, private attributes (unset ones left out).
        state = obj.__getstate__()
        values = state["__dict__"]
        if values.keys() != names:  # a cached_property lands in __dict__: keep the fields only
            values = {f: values[f] for f in fields}
        fields_set = state["__pydantic_fields_set__"]
        return [values, None if fields_set == names else sorted(fields_set),
                state.get("__pydantic_extra__"), state.get("__pydantic_private__")]

    def decode(state: Any) -> Any:
        values, fields_set, extra, private = state
        _check_fields(cls, values, names)
        obj = new(cls)
        obj.__setstate__({"__dict__": values, "__pydantic_fields_set__": set(names if fields_set is None
                                                                             else fields_set),
                          "__pydantic_extra__": extra, "__pydantic_private__": private})
        return obj

    return ClassSpec(cls, name, encode, decode)


def _enum_spec(cls: type[enum.Enum], name: str) -> ClassSpec:
    return ClassSpec(cls, name, lambda member: member.value, cls)


def class_spec(cls: object) -> ClassSpec | None:
    """Return how ``cls`` is stored without registration, or ``None`` when it cannot be.

    Args:
        cls: Any object; only classes have a spec.

    Returns:
        The spec of an enum, ``NamedTuple``, dataclass or pydantic v2 model (stored as ``module.qualname``);
        ``None`` for any other class.
    """
    if not isinstance(cls, type):
        return None
    name = f"{cls.__module__}.{cls.__qualname__}"
    if issubclass(cls, enum.Enum):
        return _enum_spec(cls, name)
    if _is_named_tuple(cls):
        return _named_tuple_spec(cls, name)
    if dataclasses.is_dataclass(cls):
        return _dataclass_spec(cls, name)
    if _is_pydantic_model(cls):
        return _pydantic_spec(cls, name)
    return None


def class_table(classes: Iterable[object]) -> dict[str, ClassSpec]:
    """Build a codec's table of allowed classes, by stored name.

    Args:
        classes: Enums, ``NamedTuple`` classes, dataclasses and pydantic v2 models.

    Returns:
        Their specs by stable name.

    Raises:
        ConfigError: A class is none of these kinds, or two classes share one ``module.qualname``
            (register one of them with `register_codec` under another name).
    """
    table: dict[str, ClassSpec] = {}
    for cls in classes:
        spec = class_spec(cls)
        if spec is None:
            raise ConfigError("types", cls, "not a dataclass, pydantic model, NamedTuple or Enum: "
                                            "register it with register_codec()")
        other = table.setdefault(spec.name, spec)
        if other.cls is not cls:
            raise ConfigError("types", spec.name, "two allowed classes share this name: register one of "
                                                  "them with register_codec(name=...)")
    return table


# -- which classes an annotation names --------------------------------------------------------------------


def _resolve(annotation: object, globalns: dict[str, Any] | None) -> object:
    """Evaluate an annotation's strings and forward references (``list["Model"]`` too) in ``globalns``.

    A string that cannot be evaluated (a ``TYPE_CHECKING`` import, a local class) names nothing we can use:
    ``None``. Any other annotation that cannot be is returned as it is, to walk what it does name.
    """
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation
    holder = types.SimpleNamespace(__annotations__={"a": annotation})
    try:
        return typing.get_type_hints(holder, globalns=globalns or {}, include_extras=True)["a"]
    except Exception:
        return None if isinstance(annotation, str | typing.ForwardRef) else annotation


def _class_annotations(cls: type) -> Iterator[object]:
    """The annotations of a class's fields, each resolved in the module that wrote it."""
    if _is_pydantic_model(cls):  # pydantic has resolved them already, Annotated metadata moved aside
        for field in cls.model_fields.values():  # type: ignore[attr-defined]
            yield field.annotation
        return
    for base in reversed(cls.__mro__):
        own = inspect.get_annotations(base)  # its own, unevaluated
        module = sys.modules.get(base.__module__)
        globalns: dict[str, Any] = vars(module) if module is not None else {}
        if globalns.get(base.__name__) is not base:  # a local class may name itself
            globalns = {**globalns, base.__name__: base}
        for annotation in own.values():
            yield _resolve(annotation, globalns)


def _args(tp: object) -> Iterator[object]:
    """What an annotation that is not a class refers to (``None`` when nothing)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        yield tp.__origin__  # type: ignore[attr-defined]  # the metadata is not a type of the value
    elif origin is typing.Literal or origin is typing.ClassVar:
        return
    elif origin is not None:
        yield origin
        yield from typing.get_args(tp)
    elif isinstance(tp, list | tuple):  # Callable[[A, B], R] lists its parameters
        yield from tp
    elif isinstance(tp, typing.NewType):
        yield tp.__supertype__
    elif hasattr(tp, "__value__") and not isinstance(tp, type):  # a `type X = ...` alias (3.12)
        yield tp.__value__


def types_in(annotation: object) -> frozenset[type]:
    """Return the classes an annotation names that the codec stores without registration.

    Walks unions, ``Optional``, generics (``list[Model]``, ``dict[str, Model]``, ``tuple[A, B]``),
    ``Annotated`` (its type, not its metadata), ``NewType`` and the fields of the dataclasses, pydantic models,
    ``NamedTuple`` and ``TypedDict`` classes it meets, recursively. String annotations inside classes are
    resolved in their module; names that cannot be resolved are skipped.

    Args:
        annotation: A type annotation (already evaluated).

    Returns:
        The enums, ``NamedTuple`` classes, dataclasses and pydantic v2 models found (not ``TypedDict``
        classes: their values are plain dicts).
    """
    found: set[type] = set()
    seen: set[object] = set()
    stack = [annotation]
    while stack:
        tp = stack.pop()
        try:
            if tp in seen:
                continue
            seen.add(tp)
        except TypeError:  # unhashable metadata somewhere inside: walk it, cycles cannot go through it
            pass
        if not isinstance(tp, type) or typing.get_origin(tp) is not None:  # list[int] is a type on 3.11
            stack.extend(_args(tp))
        elif typing.is_typeddict(tp):
            stack.extend(_class_annotations(tp))
        elif _is_storable(tp):
            found.add(tp)
            if not issubclass(tp, enum.Enum):
                stack.extend(_class_annotations(tp))
    return frozenset(found)


def allowed_types(fn: Callable[..., Any]) -> frozenset[type]:
    """Return the classes a function's results may hold, from its return annotation (see `types_in`).

    The annotation must name the concrete classes: a function annotated ``-> BaseModel`` or ``-> Any`` that
    returns a ``ChatCompletion`` does not allow it. A string annotation (``from __future__ import
    annotations``) is resolved in the function's module; one naming a local class or a ``TYPE_CHECKING``
    import cannot be, and allows nothing.

    Args:
        fn: The decorated function (sync or async); ``functools.wraps`` wrappers are followed for globals.

    Returns:
        The classes to pass to `Codec.with_types`; empty when there is no usable annotation.
    """
    annotations = getattr(fn, "__annotations__", None)
    if not isinstance(annotations, dict) or "return" not in annotations:
        return frozenset()
    target: Any = fn
    while hasattr(target, "__wrapped__"):
        target = target.__wrapped__
    return types_in(_resolve(annotations["return"], getattr(target, "__globals__", None)))
