"""Validation of the values every part of the configuration shares: counts, similarities and switches.

Each function returns the value in its canonical type or raises `ConfigError` naming the field. Durations
and sizes are parsed by `cachelayers.durations`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cachelayers.errors import ConfigError

__all__ = ["check_options", "flag", "optional_positive_int", "positive_int", "probability", "similarity"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def positive_int(value: object, field: str, *, text: bool = False) -> int:
    """Return ``value`` as an integer of at least 1.

    Args:
        value: The value to check.
        field: The name given in the error.
        text: Also accept a string of digits (from a URL option or an environment variable).

    Raises:
        ConfigError: ``value`` is not a positive integer (``True`` and ``False`` are not integers here).
    """
    if text and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, value, "expected a positive integer")
    return value


def optional_positive_int(value: object, field: str) -> int | None:
    """Return ``None`` for ``None``, else ``value`` as a positive integer.

    Raises:
        ConfigError: ``value`` is neither ``None`` nor a positive integer.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, value, "expected a positive integer or None")
    return value


def similarity(value: object, field: str = "threshold") -> float:
    """Return ``value`` (a Python or numpy number, not a bool) as a float in [0, 1] (a cosine similarity).

    Raises:
        ConfigError: ``value`` is not a number in [0, 1] (NaN is not).
    """
    return _unit_interval(value, field, "a similarity")


def probability(value: object, field: str) -> float:
    """Return ``value`` (a Python or numpy number, not a bool) as a float in [0, 1].

    Raises:
        ConfigError: ``value`` is not a number in [0, 1] (NaN is not).
    """
    return _unit_interval(value, field, "a probability")


def _unit_interval(value: object, field: str, what: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating)
            or not 0.0 <= float(value) <= 1.0):
        raise ConfigError(field, value, f"expected {what} in [0, 1]")
    return float(value)


def flag(value: object, field: str) -> bool:
    """Return ``value`` as a bool; strings such as ``"true"``, ``"0"`` or ``"off"`` are read as switches.

    Raises:
        ConfigError: ``value`` is neither a bool nor a recognised switch string.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(field, value, "expected true or false")


def check_options(options: Mapping[str, Any], declared: Any, owner: str) -> None:
    """Refuse keyword options that the ``TypedDict`` ``declared`` does not declare.

    Decorators and engines take their options as ``**options: Unpack[SomeOptions]``; type checkers catch a
    misspelt option, and this catches it at run time.

    Args:
        options: The keyword arguments given.
        declared: The ``TypedDict`` class declaring the options.
        owner: The name of the decorator or engine, used in the error.

    Raises:
        TypeError: An option is not declared; the message names it and lists the known ones.
    """
    known = declared.__required_keys__ | declared.__optional_keys__
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}; "
                        f"known: {', '.join(sorted(known))}")
