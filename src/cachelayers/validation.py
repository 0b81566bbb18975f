"""Validation of the values every part of the configuration shares: counts, similarities, switches, limits.

Each function returns the value in its canonical type or raises `ConfigError` naming the field. Durations
and sizes are parsed by `cachelayers.durations`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import numpy as np

from cachelayers.durations import LONGEST, LONGEST_TEXT
from cachelayers.errors import ConfigError

__all__ = ["LIMIT_UNITS", "LimitWindow", "check_options", "flag", "limit_windows", "optional_positive_int",
           "positive_int", "probability", "similarity"]

LIMIT_UNITS: Final = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 30 * 86400,
                      "year": 12 * 30 * 86400}
"""The units of a limit's window in seconds, as the limits library counts them (a month is 30 days, a year 12
months)."""
_LIMIT_PART: Final = re.compile(r"\s*([0-9]+)\s*(?:/|\s*per\s*)\s*([0-9]+)?\s*([a-z]+)\s*", re.IGNORECASE)
_LIMIT_SEPARATOR: Final = re.compile(r"[,;|]")
_LIMIT_HINT: Final = "not a limit; expected e.g. '3500/minute', '10 per 2 seconds' or '10/second;500/minute'"


class LimitWindow(NamedTuple):
    """One window of a limit text: ``amount`` units per ``seconds``."""

    amount: int
    seconds: int


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
    if text and isinstance(value, str) and value.strip().isdecimal():
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


def limit_windows(value: object, field: str) -> tuple[LimitWindow, ...]:
    """Check a limit text such as ``"3500/minute"``, ``"10 per 2 seconds"`` or ``"10/second;500/minute"``.

    The text is read as the limits library's ``parse_many`` reads it (windows joined by ``;``, ``,`` or ``|``),
    and every check the rate limiter makes is made here, so a named limit fails when the settings are made
    exactly as an inline one fails at decoration.

    Returns:
        The windows, in order.

    Raises:
        ConfigError: ``value`` is not a limit text, a window allows nothing (``"0/minute"``), lasts no time
            (``"10 per 0 second"``, which limits would read as 1 second) or is longer than `LONGEST`.
    """
    if not isinstance(value, str):
        raise ConfigError(field, value, "expected a limit like '3500/minute' or '10 per 2 seconds'")
    windows = []
    for part in _LIMIT_SEPARATOR.split(value):
        match = _LIMIT_PART.fullmatch(part)
        unit = match.group(3).lower() if match else ""
        unit = unit[:-1] if unit.endswith("s") and unit[:-1] in LIMIT_UNITS else unit
        if match is None or unit not in LIMIT_UNITS:
            raise ConfigError(field, value, _LIMIT_HINT)
        amount, multiples = int(match.group(1)), int(match.group(2) or 1)
        if amount < 1:
            raise ConfigError(field, value, "a limit must allow at least 1 unit per window")
        if multiples < 1:
            raise ConfigError(field, value, f"a window must last at least 1 {unit}, not 0")
        if multiples * LIMIT_UNITS[unit] > LONGEST:
            raise ConfigError(field, value, f"a window must not be longer than every tier counts exactly "
                                            f"(at most {LONGEST_TEXT})")
        windows.append(LimitWindow(amount, multiples * LIMIT_UNITS[unit]))
    return tuple(windows)


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
