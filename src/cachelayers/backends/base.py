"""The storage contract every tier implements, and the parsed form of a backend URL.

A backend only stores: it never encodes, decides expiry or retries. The engine hands it sealed envelopes
(bytes) with their absolute expiry and tags, and asks for them back in batches. Five operations make the
contract; a backend may add optional abilities through small separate interfaces.
"""

from __future__ import annotations

import abc
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple

from cachelayers.errors import BackendError, ConfigError, redact_urls

__all__ = ["MISSING", "Backend", "BackendBusyError", "BackendURL", "ClearPrefixSupport", "Clock", "DeadlineSupport",
           "EpochSupport", "LocalTier", "LockSupport", "PubSubSupport", "StoreItem"]

Clock = Callable[[], float]
"""A source of wall-clock time in seconds since the epoch (``time.time`` or a fake for tests)."""


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _Missing()


def _find_nothing(key: Hashable) -> Any:
    return MISSING
"""What a `LocalTier` lookup returns on a miss (``None`` is a cacheable value)."""


class StoreItem(NamedTuple):
    """One entry to store: an envelope, its absolute expiry (``None`` = never) and its tags."""

    key: str
    blob: bytes
    expires_at: float | None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, repr=False)
class BackendURL:
    """A backend URL split into its parts; options are the query string, one value each.

    Its ``repr`` and ``str`` hide the password (``redis://:***@host:6379/0``); ``url`` and ``password`` keep it
    for the driver.

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
        authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]  # as written: urlsplit drops tabs
        userinfo, at, host = authority.rpartition("@")
        if at and ("@" in userinfo or any(c.isspace() for c in userinfo)):
            # redis-py would take such a password whole; messages, logs and reprs could not hide all of it
            raise ConfigError(field, f"{parts.scheme}://***@{host}",
                              "the user or password holds '@' or a space: percent-encode it (%40, %20)")
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
        return redact_urls(self.url)

    def __repr__(self) -> str:
        return (f"BackendURL({self.redacted()!r}, scheme={self.scheme!r}, host={self.host!r}, port={self.port!r}, "
                f"path={self.path!r}, username={self.username!r}, "
                f"password={None if self.password is None else '***'!r}, options={dict(self.options)!r}, "
                f"field={self.field!r})")

    def __str__(self) -> str:
        return self.redacted()


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

    def within(self, seconds: float) -> AbstractContextManager[object]:
        """The scope the engine runs one operation of this tier in, given its tier timeout.

        The default is a cancel scope that raises `TimeoutError` after ``seconds``. A backend whose operations
        can tell a stuck store from a congested one overrides it (the disk tier's deadline counts its progress,
        not the clock), raising `TimeoutError` when the store stops answering and `BackendBusyError` when it
        was busy with other callers for too long.
        """
        import anyio

        return anyio.fail_after(seconds)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted()!r})"


class ClearPrefixSupport(abc.ABC):
    """Optional ability of a shared backend: remove only the keys of one key prefix.

    Several applications (or settings with different ``key_prefix``) may share one store; the engine's
    ``clear()`` then removes its own keys and leaves the others'.
    """

    @abc.abstractmethod
    async def clear_prefix(self, prefix: str) -> None:
        """Remove every key that starts with ``prefix``, with any tag and lock bookkeeping under it."""


class BackendBusyError(BackendError):
    """A write was not made because the backend was congested (no connection free within the time allowed).

    Raised by `DeadlineSupport.set_many_within`. It is not a failure of the tier: the engine counts the write
    as ``skipped`` without counting a failure or moving the circuit breaker.
    """


class DeadlineSupport(abc.ABC):
    """Optional ability: operations that fail by themselves after a timeout.

    The engine bounds every tier operation by the tier timeout. A generic cancel scope around each read costs,
    on asyncio, a good part of a Redis round trip; a backend that already waits on a socket with a timeout can
    enforce the engine's at no extra cost, and the engine then calls it without a scope. Writes go through
    `set_many_within`, which by default runs `Backend.set_many` under a cancel scope.
    """

    @abc.abstractmethod
    async def get_many_within(self, keys: Sequence[str], seconds: float) -> list[bytes | None]:
        """Like `Backend.get_many`, raising `TimeoutError` when no answer came within ``seconds``."""

    async def set_many_within(self, items: Sequence[StoreItem], seconds: float) -> None:
        """Like `Backend.set_many`, within ``seconds`` of waiting for the backend and ``seconds`` of I/O.

        Args:
            items: The entries to store.
            seconds: The engine's tier timeout.

        Raises:
            TimeoutError: The backend did not answer within ``seconds``.
            BackendBusyError: The write was not made because the backend had no connection free for it
                within ``seconds`` (congestion, not a failure of the tier).
        """
        import anyio

        assert isinstance(self, Backend)
        with anyio.fail_after(seconds):
            await self.set_many(items)


class PubSubSupport(abc.ABC):
    """Optional ability of a shared backend: broadcast small messages to every process that uses it.

    The engine uses it to tell other processes' memory tiers which entries were invalidated and to wake
    processes waiting for a distributed lock. Delivery is at most once: a subscriber that loses its connection
    gets an exception from the iterator and must assume it missed messages.
    """

    @abc.abstractmethod
    async def publish(self, channel: str, message: bytes) -> None:
        """Send ``message`` to every current subscriber of ``channel``."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Subscribe to ``channel``.

        Entering the context returns once the subscription is active, so no message published afterwards is
        missed; iterating yields messages. Losing the connection raises from the iterator.
        """


class EpochSupport(abc.ABC):
    """Optional ability of a shared backend with `PubSubSupport`: invalidation epochs that every process sees.

    The engine keeps, in one hash, a sequence number per invalidated field (a namespace, a slot of tags or of
    keys, everything) and stamps every entry it writes with the last sequence number it heard; an entry
    stamped before a later invalidation of one of its fields is refused when read (see the invalidation
    guide). Sequence numbers grow strictly across every process, even if the hash is lost.
    """

    @abc.abstractmethod
    async def bump_epochs(self, key: str, fields: Sequence[str], channel: str, message: bytes) -> int:
        """In one atomic step: take the next sequence number, record it for ``fields`` in the hash ``key``
        and publish ``b"#<seq>:" + message`` on ``channel``. Returns the sequence number."""

    @abc.abstractmethod
    async def load_epochs(self, key: str, seconds: float | None = None) -> dict[str, int]:
        """The whole hash ``key``: field -> sequence number (``"*"``: the last one taken).

        With ``seconds``, raise `TimeoutError` if the backend does not answer within that time; a backend
        may count only time its event loop was free to notice the answer (a burst of callers is not an outage).
        """


class LockSupport(abc.ABC):
    """Optional ability of a shared backend: leased locks, so that processes missing one key compute it once.

    A lock is held by whoever knows its ``token`` and expires by itself after ``lease`` seconds, so a holder
    that crashed never blocks the others for longer than the lease.
    """

    @abc.abstractmethod
    async def acquire_lock(self, name: str, token: str, lease: float) -> bool:
        """Take the lock ``name`` for ``lease`` seconds unless someone holds it; return whether we got it."""

    @abc.abstractmethod
    async def extend_lock(self, name: str, token: str, lease: float) -> bool:
        """Extend a lock we hold to ``lease`` seconds from now; ``False`` when we no longer hold it."""

    @abc.abstractmethod
    async def release_lock(self, name: str, token: str, notify: tuple[str, bytes] | None = None) -> bool:
        """Release a lock we hold and, in the same step, publish ``notify = (channel, message)`` if given.

        Returns whether we still held it.
        """


class LocalTier(abc.ABC):
    """Optional ability: serve as the in-process first tier, holding live objects under local keys.

    The engine reads it on every call, so the read is `peek`, a plain function that the engine keeps in a
    closure cell; it knows nothing else of how entries are kept. Entries have an absolute expiry (``clock()``
    time), tags, and optionally the storage key the other tiers name them by.
    """

    peek: Callable[[Hashable], Any]
    """``peek(key)``: the value under ``key`` if it has not expired (marking it recently used), else `MISSING`.
    An expired entry is left in place, for `peek_stale`."""

    INLINE_PEEK: ClassVar[str] = "{value} = {p0}({key})\n"
    """`peek` as statements an engine may compile into its hit path instead of calling it.

    They assign to ``{value}`` what ``peek({key})`` returns, reading only ``{p0}``, ``{p1}``, … (the objects
    `peek_parts` gives), ``{missing}`` (`MISSING`) and ``{tmp}`` (a local of theirs). The default calls `peek`;
    a tier overrides it to save that call on every hit, keeping its layout to itself."""

    def peek_parts(self) -> tuple[Any, ...]:
        """The objects `INLINE_PEEK` reads as ``{p0}``, ``{p1}``, …, bound to this tier."""
        return (self.peek,)

    @classmethod
    def idle_peek_parts(cls) -> tuple[Any, ...]:
        """Objects for `INLINE_PEEK` with which it finds nothing (an engine bound to no tier)."""
        return (_find_nothing,)

    bytes_used: int
    """Bytes charged by the entries held."""
    evictions: int
    """Entries evicted to keep the bounds so far."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of entries held."""

    @abc.abstractmethod
    def lookup(self, key: Hashable) -> Any:
        """Like `peek`, but an expired entry found is removed."""

    @abc.abstractmethod
    def peek_stale(self, key: Hashable, grace: float) -> Any:
        """The value under ``key`` if it expired less than ``grace`` seconds ago (marking it recently used),
        else `MISSING`."""

    @abc.abstractmethod
    def store(self, key: Hashable, value: Any, size: int, expires_at: float | None,
              tags: tuple[str, ...] = (), storage_key: str | None = None) -> bool:
        """Store ``value`` under ``key``, charging ``size`` bytes; return ``False`` when it cannot be held.

        Args:
            key: The local key.
            value: What `peek` returns.
            size: Bytes to charge against the tier's bound (the value's encoded size).
            expires_at: Absolute expiry (``clock()`` time), or ``None``.
            tags: Tags `remove_tags` finds the entry by.
            storage_key: The name other tiers give the entry, for `remove_storage_keys`.
        """

    @abc.abstractmethod
    def remove(self, key: Hashable) -> bool:
        """Remove ``key``; return whether it was there."""

    @abc.abstractmethod
    def remove_storage_keys(self, storage_keys: Sequence[str]) -> int:
        """Remove the entries stored under these storage keys; return how many were removed."""

    @abc.abstractmethod
    def remove_tags(self, tags: Sequence[str]) -> int:
        """Remove every entry carrying any of ``tags``; return how many were removed."""

    @abc.abstractmethod
    def remove_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key satisfies ``predicate`` (a scan); return how many were removed."""

    @abc.abstractmethod
    def clear_now(self) -> None:
        """Remove everything, synchronously."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what the tier holds."""
