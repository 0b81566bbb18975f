"""Parsing of durations (``"90s"``, ``"1h"``, ``5``) and byte sizes (``"64MiB"``)."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Final

from cachelayers.errors import ConfigError

__all__ = ["LONGEST", "LONGEST_TEXT", "parse_duration", "parse_size", "parse_ttl"]

LONGEST: Final = 1000 * 365 * 86400.0
"""The longest lifetime of anything stored: a TTL, a ``stale=`` grace period, a lock's lease, a limit's window.

1000 years of 365 days (31,536,000,000 s). Every tier holds it, twice over (a TTL plus its ``stale=`` grace):
memory and the disk tier (SQLite ``REAL``) keep the expiry as a float; memcached is given no expiry beyond 30
days (it would read the number as a date) and expires the entry itself; Redis takes milliseconds as 64-bit
integers (``PX``, ``PEXPIRE``), and a Lua script writes a number of 1e14 or more in exponent notation when it
makes text of it. A TTL of 1e30 s made Redis refuse every write (``value is not an integer or out of range``);
a limit's window of 4000 years made the limiter's Redis scripts answer ``1.24416e+14`` where an integer was
read."""

LONGEST_TEXT: Final = "1000 years, 31536000000 s"
"""`LONGEST` in words, for messages."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0,
                   "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g|tb|tib|t)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4,
               "tib": 1024**4}


def parse_duration(value: object, field: str, *, allow_zero: bool = False, stored: bool = False) -> float:
    """Return a duration in seconds.

    Args:
        value: Seconds as an int or float, a `datetime.timedelta`, or a string such as ``"250ms"``,
            ``"90s"``, ``"5m"``, ``"1h"``, ``"2d"``.
        field: Name of the setting, used in the error message.
        allow_zero: Whether zero is acceptable.
        stored: The duration is a lifetime in the tiers (a grace period, a lease): at most `LONGEST`.

    Returns:
        The duration in seconds, finite and positive (or zero when allowed).

    Raises:
        ConfigError: The value is negative, not finite, of the wrong type or malformed (or, with ``stored``,
            longer than `LONGEST`).
    """
    if isinstance(value, bool):
        raise ConfigError(field, value, "expected a duration (seconds or a string like '90s'), got a bool")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(field, value, "malformed duration; use seconds or a string like "
                                            "'250ms', '90s', '5m', '1h', '2d'")
        unit = match.group(2).lower() if match.group(2) else None
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    else:
        raise ConfigError(field, value, f"expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds):
        raise ConfigError(field, value, "duration must be finite")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(field, value, "duration must be positive" if not allow_zero
                          else "duration must not be negative")
    if stored and seconds > LONGEST:
        raise ConfigError(field, value, f"longer than every tier keeps exactly (at most {LONGEST_TEXT})")
    return seconds


def parse_ttl(value: object, field: str = "ttl") -> float:
    """Return a TTL in seconds: a duration as `parse_duration` reads it, of at most `LONGEST`.

    Raises:
        ConfigError: The value is not a positive duration, or is longer than any tier can store (the message
            says to use ``None`` for entries that never expire).
    """
    seconds = parse_duration(value, field)
    if seconds > LONGEST:
        raise ConfigError(field, value, f"longer than every tier keeps exactly (at most {LONGEST_TEXT}); use "
                                        f"{field}=None for entries that never expire")
    return seconds


def parse_size(value: object, field: str) -> int:
    """Return a size in bytes from an int or a string such as ``"512KiB"``, ``"64MiB"``, ``"1GB"``.

    Raises:
        ConfigError: The value is not a positive size.
    """
    if isinstance(value, bool):
        raise ConfigError(field, value, "expected a size in bytes, got a bool")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ConfigError(field, value, "malformed size; use bytes or a string like '512KiB', '64MiB'")
        unit = match.group(2).lower() if match.group(2) else None
        try:
            size = int(float(match.group(1)) * _SIZE_UNITS[unit])
        except OverflowError:  # hundreds of digits: float() is infinite
            raise ConfigError(field, value, "size too large") from None
    else:
        raise ConfigError(field, value, f"expected a size in bytes, got {type(value).__name__}")
    if size <= 0:
        raise ConfigError(field, value, "size must be positive")
    return size
