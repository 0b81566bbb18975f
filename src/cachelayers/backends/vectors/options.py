"""The ``vector_index`` URL: its schemes, its options and the graph options of every index it makes."""

from __future__ import annotations

from typing import Final, NamedTuple

from cachelayers.backends.base import BackendURL
from cachelayers.backends.redis.options import validate_redis_url
from cachelayers.backends.vectors.index import DTYPES
from cachelayers.durations import parse_duration
from cachelayers.errors import ConfigError

__all__ = ["IndexOptions", "int_option", "parse_vector_index"]


class IndexOptions(NamedTuple):
    """Graph options of every index of a semantic store (``None``: usearch's default)."""

    dtype: str = "f32"
    connectivity: int | None = None
    expansion_add: int | None = None
    expansion_search: int | None = None


_INDEX_OPTIONS: Final = frozenset({"dtype", "connectivity", "expansion_add", "expansion_search"})
_MODE_OPTIONS: Final = {"memory": frozenset(), "usearch": frozenset({"save_every"}),
                        "redis": frozenset({"sync_interval", "stream_maxlen"}),
                        "rediss": frozenset({"sync_interval", "stream_maxlen"}),
                        "redis+cluster": frozenset({"sync_interval", "stream_maxlen"})}


def int_option(url: BackendURL, name: str) -> int | None:
    """The positive integer option ``name`` of ``url``, or ``None`` when absent.

    Raises:
        ConfigError: The option is not a positive integer.
    """
    raw = url.options.get(name)
    if raw is None:
        return None
    if not raw.isdecimal() or int(raw) <= 0:
        raise ConfigError(url.option_field(name), raw, "expected a positive integer")
    return int(raw)


def parse_vector_index(url: str, field: str = "vector_index") -> tuple[BackendURL, IndexOptions]:
    """Parse and check a ``vector_index`` URL (``memory://``, ``usearch:///dir``, ``redis://host:port/db``).

    Options: ``dtype``, ``connectivity``, ``expansion_add``, ``expansion_search``; ``save_every`` for
    ``usearch://``; ``sync_interval`` and ``stream_maxlen`` for ``redis://`` (and ``rediss://``,
    ``redis+cluster://``). Nothing is imported or opened.

    Raises:
        ConfigError: Unknown scheme or option, a bad option value, ``usearch://`` without a path, or a Redis URL
            without a host or with a path that is not a database number (not 0 on a cluster).
    """
    parsed = BackendURL.parse(url, field)
    known = _MODE_OPTIONS.get(parsed.scheme)
    if known is None:
        raise ConfigError(field, url, "expected 'memory://', 'usearch:///path' or 'redis://host:port/db'")
    unknown = sorted(set(parsed.options) - known - _INDEX_OPTIONS)
    if unknown:
        raise ConfigError(parsed.option_field(unknown[0]), url,
                          f"unknown option (known: {', '.join(sorted(known | _INDEX_OPTIONS))})")
    dtype = parsed.options.get("dtype", "f32")
    if dtype not in DTYPES:
        raise ConfigError(parsed.option_field("dtype"), dtype, f"expected one of {', '.join(DTYPES)}")
    if parsed.scheme == "usearch" and (parsed.host or not parsed.path or parsed.path == "/"):
        raise ConfigError(field, url, "expected usearch:///absolute/path/to/a/directory")
    if parsed.scheme == "memory" and (parsed.host or parsed.path not in ("", "/")):
        raise ConfigError(field, url, "memory:// takes no host or path")
    if parsed.scheme in ("redis", "rediss", "redis+cluster"):
        validate_redis_url(parsed)  # a host, a database number in the path (0 on a cluster), sound options
    int_option(parsed, "save_every")
    int_option(parsed, "stream_maxlen")
    if "sync_interval" in parsed.options:
        parse_duration(parsed.options["sync_interval"], parsed.option_field("sync_interval"), allow_zero=True)
    options = IndexOptions(dtype, int_option(parsed, "connectivity"), int_option(parsed, "expansion_add"),
                           int_option(parsed, "expansion_search"))
    return parsed, options
