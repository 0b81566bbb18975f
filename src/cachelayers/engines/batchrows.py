"""What a batch function may return: checked before any of it is served to a caller or stored.

Both batch forms, ``@batched`` (`cachelayers.engines.batcher`) and ``multilevel_cached(batch=...)``
(`cachelayers.engines.tiered.batch`), give item *i* the *i*-th element of the function's result. That is right
only for an ordered container holding exactly one result per item, so the result must be one of:

* a ``list`` or a ``tuple`` (or a subclass);
* a numpy array whose first dimension is the number of items (item *i* gets row *i*, copied);
* any other `collections.abc.Sequence` (``range``, ``collections.UserList``, ...), except ``str``, ``bytes``,
  ``bytearray`` and ``memoryview``, which are single values whose elements are characters or bytes;

of exactly as many elements as items were passed. Anything else is a `BatchError` naming the function, the type
(and both lengths when they differ): a mapping (iterating it gives its keys, not the results for the items), a
set (no order), a string or bytes, a generator or iterator (unknown length), ``None``, a scalar, a 0-d array,
or the wrong length. The error goes to every caller of the batch and nothing of the result is cached: no
caller ever gets an element meant for another item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any, Final

import numpy as np

from cachelayers.errors import BatchError

__all__ = ["batch_rows", "type_name"]

_NOT_ROWS: Final = (str, bytes, bytearray, memoryview)
_EXPECTED: Final = "expected a list, a tuple or an array with one result per item, in order"


def type_name(value: object) -> str:
    """The name of ``value``'s type as a user reads it: ``dict``, ``numpy.ndarray``, ``mymodule.Results``."""
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    if cls.__module__.startswith("numpy"):
        return f"numpy.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _a(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _hint(result: object) -> str:
    if isinstance(result, Mapping):
        return " (a mapping's elements are its keys, not the results of the items; return [results[item] " \
               "for item in items])"
    if isinstance(result, Set):
        return " (a set has no order, and merges equal results)"
    if isinstance(result, _NOT_ROWS):
        return " (one value, whose elements are characters or bytes)"
    if hasattr(result, "__next__") or hasattr(result, "__anext__"):
        return " (its length is unknown until it is consumed; return a list)"
    return ""


def batch_rows(result: object, count: int, function: str) -> Sequence[Any]:
    """Check what a batch function returned for ``count`` items; return one row per item, in order.

    Args:
        result: What the batch function returned.
        count: How many items it was given.
        function: The function's name, for the error.

    Returns:
        ``result`` itself when it is a list or a tuple; otherwise a new list of its elements (an array's rows
        copied, so that no result keeps the whole batch's array alive).

    Raises:
        BatchError: ``result`` is not a list, a tuple, an array or another sequence of results (see the module),
            or does not hold exactly ``count`` of them.
    """
    if isinstance(result, list | tuple):
        rows: Sequence[Any] = result
    elif isinstance(result, np.ndarray):
        if result.ndim == 0 or result.shape[0] != count:
            raise BatchError(function, count, f"returned a numpy.ndarray of shape {result.shape}; expected "
                                              f"{count} row{'s' if count != 1 else ''}, one per item, in order")
        return [row.copy() for row in result] if result.ndim > 1 else list(result)
    elif isinstance(result, Sequence) and not isinstance(result, _NOT_ROWS):
        try:
            rows = list(result)
        except Exception as exc:
            error = BatchError(function, count, f"returned {_a(type_name(result))} that could not be read: "
                                                f"{type(exc).__name__}: {exc}")
            raise error from exc
    else:
        raise BatchError(function, count, f"returned {_a(type_name(result))}{_hint(result)}; {_EXPECTED}")
    if len(rows) != count:
        raise BatchError(function, count, f"returned {_a(type_name(result))} of {len(rows)} "
                                          f"result{'s' if len(rows) != 1 else ''}; expected {count}, one per "
                                          f"item, in order")
    return rows
