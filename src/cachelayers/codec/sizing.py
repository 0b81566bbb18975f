"""Estimates of the live size of a value: the bytes its Python object graph takes in this process.

The memory tier in first place holds live objects, so it charges their estimated live size against its
``max_bytes``, not their encoded size: a list of small dicts takes five to ten times its msgpack length in
objects (a dict's hash table, each int and str object, their headers and pointers). `live_size` walks what
results are made of — dicts, lists, tuples, sets, strings, bytes, numbers, numpy arrays, dataclasses, pydantic
models and other objects with a ``__dict__`` or ``__slots__`` — adding `sys.getsizeof` of each object.

The walk is bounded: a container of more than `SAMPLE` items is sized from `SAMPLE` of them, evenly spread,
scaled to its length; a graph deeper than `MAX_DEPTH` or with more than `MAX_NODES` objects sized is charged
`FALLBACK_FACTOR` times its encoded size instead. A scalar, string or
bytes value is sized from its header and length, without a walk. Objects shared with the rest of the program
(small ints, strings interned as dict keys) are counted as if the value owned them, except that the string
keys of the dicts of one value are counted once: an estimate on the high side, never below the encoded size.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Final

import numpy as np

__all__ = ["ENTRY_OVERHEAD", "FALLBACK_FACTOR", "MAX_DEPTH", "MAX_NODES", "SAMPLE", "live_entry_size", "live_size"]

SAMPLE: Final = 8
"""Items of a container sized one by one; a longer container is sized from this many, evenly spread."""
MAX_DEPTH: Final = 24
"""Nesting walked; a deeper value is charged `FALLBACK_FACTOR` times its encoded size."""
MAX_NODES: Final = 4096
"""Objects sized per value; past this the value is charged `FALLBACK_FACTOR` times its encoded size."""
FALLBACK_FACTOR: Final = 8
"""Live bytes assumed per encoded byte for a value the walk gives up on (lists of small dicts take 5 to 8)."""

_getsizeof: Final = sys.getsizeof  # a method lookup and call: the walk computes the common sizes instead
_STR_HEADER: Final = _getsizeof("")  # an ASCII str: header + one byte a character
_BYTES_HEADER: Final = _getsizeof(b"")
_TUPLE_HEADER: Final = _getsizeof(())  # + one pointer an item
_INT_SIZE: Final = _getsizeof(1 << 29)  # an int of one 30-bit digit
_FLOAT_SIZE: Final = _getsizeof(1.0)
_SMALL_INT: Final = 1 << 30
_DICT_SIZES: Final = tuple(_getsizeof(dict.fromkeys(range(n))) for n in range(17))  # a dict by its length
_ATOMS: Final[frozenset[type]] = frozenset({str, bytes, int, float, bool, type(None), complex, bytearray})


def _atom_size(obj: Any, tp: type) -> int:
    """The size of a scalar, string or bytes object from its header and length, or -1 for any other object.

    ``None`` and booleans are singletons: the pointer to them, counted by their container, is all they cost.
    """
    if tp is str:
        return _STR_HEADER + len(obj) if obj.isascii() else _getsizeof(obj)
    if tp is int:
        return _INT_SIZE if -_SMALL_INT < obj < _SMALL_INT else _getsizeof(obj)
    if tp is float:
        return _FLOAT_SIZE
    if tp is bytes:
        return _BYTES_HEADER + len(obj)
    if obj is None or tp is bool:
        return 0
    if tp is complex or tp is bytearray:
        return _getsizeof(obj)
    return -1


class _GiveUp(Exception):
    """The walk went past `MAX_DEPTH` or `MAX_NODES`."""


class _Walk:
    """One estimate: the objects sized so far and the string keys already counted."""

    __slots__ = ("keys", "nodes")

    def __init__(self) -> None:
        self.nodes = 0
        self.keys: set[int] = set()

    def size(self, obj: Any, depth: int) -> int:
        """The live size of ``obj`` and what it holds (sampled past `SAMPLE` items)."""
        tp = type(obj)
        size = _atom_size(obj, tp)
        if size >= 0:
            return size
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            raise _GiveUp
        depth += 1
        if tp is dict:
            n = len(obj)
            return (_DICT_SIZES[n] if n <= 16 else _getsizeof(obj)) + self.items(obj, depth)
        if isinstance(obj, dict):
            return _getsizeof(obj) + self.items(obj, depth)
        if tp is tuple:
            return _TUPLE_HEADER + 8 * len(obj) + self.elements(obj, depth)
        if tp is list or isinstance(obj, (list, tuple, set, frozenset)):
            return _getsizeof(obj) + self.elements(obj, depth)
        if isinstance(obj, np.ndarray):
            return _getsizeof(obj) + (obj.nbytes if obj.base is not None else 0)
        return self.instance(obj, depth)

    def many(self, objects: Iterable[Any], depth: int) -> int:
        """The summed live size of ``objects``: scalars and strings inline (most of what values hold)."""
        total = 0
        for obj in objects:
            tp = type(obj)
            if tp is str:
                total += _STR_HEADER + len(obj) if obj.isascii() else _getsizeof(obj)
            elif tp is int and -_SMALL_INT < obj < _SMALL_INT:
                total += _INT_SIZE
            elif tp is float:
                total += _FLOAT_SIZE
            elif obj is not None and tp is not bool:
                total += self.size(obj, depth)
        return total

    def elements(self, items: Any, depth: int) -> int:
        n = len(items)
        if n <= SAMPLE:
            return self.many(items, depth)
        if not isinstance(items, (list, tuple)):
            items = list(items)
        step = n / SAMPLE
        return self.many([items[int(i * step)] for i in range(SAMPLE)], depth) * n // SAMPLE

    def items(self, mapping: dict[Any, Any], depth: int) -> int:
        n = len(mapping)
        keys: Any = mapping
        values: Any = mapping.values()
        if n > SAMPLE:
            step = n / SAMPLE
            listed = list(mapping)
            keys = [listed[int(i * step)] for i in range(SAMPLE)]
            values = [mapping[key] for key in keys]
        total = 0
        seen = self.keys
        for key in keys:
            if type(key) is not str:
                total += self.size(key, depth)
            elif id(key) not in seen:  # the keys of a value's dicts are shared (literals, json, msgpack intern them)
                seen.add(id(key))
                total += _STR_HEADER + len(key) if key.isascii() else _getsizeof(key)
        total += self.many(values, depth)
        return total if n <= SAMPLE else total * n // SAMPLE

    def instance(self, obj: Any, depth: int) -> int:
        """An object of a class: its header, its ``__dict__`` (pydantic's extras too) and its ``__slots__``."""
        total = _getsizeof(obj)
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            total += _getsizeof(attributes) + self.items(attributes, depth)
        for name in _slot_names(type(obj)):
            value = getattr(obj, name, None)
            if value is not None:
                total += self.size(value, depth)
        return total


_SLOT_NAMES: Final[dict[type, tuple[str, ...]]] = {}


def _slot_names(cls: type) -> tuple[str, ...]:
    """The attributes ``cls`` keeps in ``__slots__`` (of every class of its MRO), remembered by class."""
    known = _SLOT_NAMES.get(cls)
    if known is not None:
        return known
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend((slots,) if isinstance(slots, str) else slots)
    known = _SLOT_NAMES[cls] = tuple(name for name in names if name not in ("__dict__", "__weakref__"))
    return known


def live_size(value: object, encoded_size: int) -> int:
    """Estimate the bytes ``value``'s object graph takes in this process (see the module docstring).

    Args:
        value: A value about to be held live (a cached result).
        encoded_size: Its encoded size: the estimate is never below it, and a value the walk gives up on is
            charged `FALLBACK_FACTOR` times it.

    Cheap enough for every miss: one `sys.getsizeof` for a scalar, string or bytes value; at most
    `MAX_NODES` objects sized for any other.
    """
    size = _atom_size(value, type(value))
    if size >= 0:
        return size if size > encoded_size else encoded_size
    walk = _Walk()
    try:
        size = walk.size(value, 0)
    except Exception:  # _GiveUp, or a class whose attributes raise: charged by its encoding
        return encoded_size * FALLBACK_FACTOR
    return size if size > encoded_size else encoded_size



ENTRY_OVERHEAD: Final = 160
"""Bytes a memory slot takes beyond its key and its value: the slot tuple and its share of the LRU dict."""


def live_entry_size(key: object, value: object, encoded_size: int) -> int:
    """Estimate the bytes an entry of the memory tier holds: `live_size` of ``value``, the key and the slot.

    A local key ``(token, *arguments)`` is charged its tuple and arguments (the token is the function's, shared
    by all its entries); any other key is walked like a value.
    """
    tp = type(value)  # ints and ASCII strings inline: this runs on every miss
    if tp is int and -_SMALL_INT < value < _SMALL_INT:  # type: ignore[operator]
        size = _INT_SIZE
    elif tp is str and value.isascii():  # type: ignore[attr-defined]
        size = _STR_HEADER + len(value)  # type: ignore[arg-type]
    else:
        size = _atom_size(value, tp)
        if size < 0:
            size = live_size(value, encoded_size)
    if size < encoded_size:
        size = encoded_size
    if type(key) is not tuple:
        return size + live_size(key, 0) + ENTRY_OVERHEAD
    size += _TUPLE_HEADER + 8 * len(key) + ENTRY_OVERHEAD
    for part in key[1:]:
        tp = type(part)
        if tp is int and -_SMALL_INT < part < _SMALL_INT:
            size += _INT_SIZE
        else:
            part_size = _atom_size(part, tp)
            size += part_size if part_size >= 0 else live_size(part, 0)
    return size
