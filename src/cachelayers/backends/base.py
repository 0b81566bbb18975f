"""The storage contract every tier implements, and the parsed form of a backend URL.

A backend only stores: it never encodes, decides expiry or retries. The engine hands it sealed envelopes
(bytes) with their absolute expiry and tags, and asks for them back in batches. Five operations make the
contract; a backend may add optional abilities through small separate interfaces.
"""

from __future__ import annotations

import abc
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from cachelayers.errors import ConfigError

__all__ = ["Backend", "BackendURL", "Clock", "StoreItem"]

Clock = Callable[[], float]
"""A source of wall-clock time in seconds since the epoch (``time.time`` or a fake for tests)."""


class StoreItem(NamedTuple):
    """One entry to store: an envelope, its absolute expiry (``None`` = never) and its tags."""

    key: str
    blob: bytes
    expires_at: float | None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A backend URL split into its parts; options are the query string, one value each.

    Attributes:
        field: Name of the setting the URL came from, used in error messages.
    """

    url: str
    scheme: str
    host: str | None
    port: int | None
    path: str
    username: str | None
    password: str | None
    options: Mapping[str, str] = field(default_factory=dict)
    field: str = "url"

    @classmethod
    def parse(cls, url: str, field: str = "url") -> BackendURL:
        """Split ``url``; raise `ConfigError` naming ``field`` when it is malformed."""
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(field, url, "expected a URL such as 'memory://' or 'redis://localhost:6379/0'")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(field, url, f"malformed URL: {exc}") from None
        options: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name in options:
                raise ConfigError(f"{field}?{name}", url, "option given twice")
            options[name] = value
        if parts.fragment:
            raise ConfigError(field, url, "URL must not have a #fragment")
        return cls(url=url, scheme=parts.scheme.lower(), host=parts.hostname, port=port,
                   path=urllib.parse.unquote(parts.path), username=parts.username, password=parts.password,
                   options=options, field=field)

    def option_field(self, name: str) -> str:
        """The name of option ``name`` in error messages, e.g. ``tiers['memory']?max_bytes``."""
        return f"{self.field}?{name}"

    def redacted(self) -> str:
        """The URL with any password replaced by ``***``."""
        if self.password is None:
            return self.url
        return self.url.replace(f":{self.password}@", ":***@", 1)


class Backend(abc.ABC):
    """A storage tier: stores sealed entries by key, in batches.

    Subclasses declare their ``schemes``, the ``options`` their URL accepts, and implement the five
    operations. ``validate_url`` runs at configuration time and must not import the driver or connect.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, url: BackendURL, *, clock: Clock = time.time) -> None:
        self.url = url
        self.clock = clock

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Reject unknown options; subclasses check values too. Raises `ConfigError`."""
        unknown = sorted(set(url.options) - cls.options)
        if unknown:
            raise ConfigError(url.option_field(unknown[0]), url.redacted(),
                              f"unknown option for {url.scheme}:// (known: {', '.join(sorted(cls.options)) or 'none'})")

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the stored envelope of each key, ``None`` where there is none (or it expired)."""

    @abc.abstractmethod
    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store every item, replacing what was there; record each key under its tags."""

    @abc.abstractmethod
    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the keys; missing keys are ignored."""

    @abc.abstractmethod
    async def delete_tags(self, tags: Sequence[str]) -> None:
        """Remove every key recorded under any of the tags."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Remove everything this backend stored."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files. The default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted()!r})"
