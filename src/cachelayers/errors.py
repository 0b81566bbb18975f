"""Exceptions raised by cachelayers.

Every exception the library raises on purpose derives from `CacheLayersError`::

    CacheLayersError
    ├── ConfigError                 bad configuration, raised when it is given (also a ValueError)
    │   └── MissingDependencyError  an optional driver is not installed (also an ImportError)
    ├── UnkeyableArgumentError      an argument cannot be turned into a cache key (also a TypeError)
    ├── SerializationError          a value cannot be encoded or decoded
    │   └── IntegrityError          a stored entry is corrupt, truncated, foreign or wrongly signed
    └── BackendError                a tier failed; the driver's exception is kept as ``__cause__``

Cache failures never reach the caller of a decorated function unless strict mode asks for it: they are
counted, logged once per change of state, and the call goes on uncached.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CacheLayersError",
    "ConfigError",
    "IntegrityError",
    "MissingDependencyError",
    "SerializationError",
    "UnkeyableArgumentError",
]


class CacheLayersError(Exception):
    """Root of every exception raised by cachelayers."""


class ConfigError(CacheLayersError, ValueError):
    """Configuration is invalid. The message names the field and the bad value.

    Attributes:
        field: Dotted name of the offending setting or parameter (for example ``"tiers[0]"``).
        value: The value that was rejected.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class MissingDependencyError(ConfigError, ImportError):
    """An optional driver needed by the configuration is not installed.

    The message names the extra to install, e.g. ``pip install 'cachelayers[redis]'``.
    """

    def __init__(self, field: str, value: object, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            field,
            value,
            f"needs the package {package!r}, which is not installed; "
            f"install it with: pip install 'cachelayers[{extra}]'",
        )


class UnkeyableArgumentError(CacheLayersError, TypeError):
    """A call argument cannot be turned into a stable cache key.

    Attributes:
        argument: The parameter name, with a path into containers (e.g. ``"messages[0]['meta']"``).
    """

    def __init__(self, function: str, argument: str, value: object) -> None:
        self.function = function
        self.argument = argument
        super().__init__(
            f"cannot build a cache key for {function}(): argument {argument!r} of type "
            f"{type(value).__module__}.{type(value).__qualname__} is not keyable. Pass key=... to the "
            f"decorator, list the argument in ignore=..., or give the type a __cache_key__() method."
        )


class SerializationError(CacheLayersError):
    """A value could not be encoded for storage, or a payload could not be decoded."""


class IntegrityError(SerializationError):
    """A stored entry failed its integrity check (checksum, signature, format or key binding)."""


class BackendError(CacheLayersError):
    """A storage tier failed. The driver's exception is available as ``__cause__``."""
