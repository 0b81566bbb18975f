"""`MemcachedBackend`: the memcached tier, on aiocache's memcached cache (aiomcache underneath).

Memcached stores values under short ASCII keys and forgets them when it likes; it has no sets, no key scans
and no transactions. The tier keeps the storage contract with two kinds of small tokens it stores itself:

- the **generation** record of the store (one key per ``namespace``): a generation token and a token per
  key prefix cleared on its own; every entry records the tokens that apply to its key when it was written,
  and `clear` / `clear_prefix` replace them, so every older entry stops being returned at once;
- a **version** token per tag: every entry records the versions of its tags, and `delete_tags` removes the
  tags' tokens, so every entry written under an older version stops being returned.

A read fetches the generation with the entries (one ``get`` of many keys) and, when entries carry tags, their
tags' versions (a second one). A token that memcached evicted reads as missing, which invalidates the
entries that depended on it: eviction can cost hits, never serve an invalidated entry. Entries that are no
longer current are left for memcached's LRU to reclaim; each also has memcached's own expiry (its TTL,
rounded up to the second), and the tier checks the exact expiry itself on every read.

Every operation runs in a task of its own that the caller's cancellation does not interrupt (aiomcache would
otherwise put a connection back in its pool halfway through a reply); the engine's tier timeout still bounds
the caller's wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from cachelayers.backends.base import Backend, BackendURL, ClearPrefixSupport, Clock, StoreItem
from cachelayers.backends.memcached import entries
from cachelayers.errors import BackendError, ConfigError, MissingDependencyError
from cachelayers.loops import running_asyncio_loop

__all__ = ["MemcachedBackend"]

T = TypeVar("T")

_RELATIVE_LIMIT: Final = 30 * 24 * 3600  # memcached reads a larger exptime as a Unix time
_DEFAULT_PORT: Final = 11211


class _LoopClient:
    """The aiocache client of one event loop (aiomcache's connections belong to the loop that opened them)."""

    __slots__ = ("cache", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop, cache: Any) -> None:
        self.loop = loop
        self.cache = cache
        self.pending: set[asyncio.Future[Any]] = set()


def _abandon(state: _LoopClient) -> None:
    """Drop the client of a loop we no longer use, closing its sockets the way that loop still allows."""
    pool = getattr(getattr(state.cache, "client", None), "_pool", None)
    queue = getattr(pool, "_pool", None)
    connections = list(getattr(pool, "_in_use", ()))
    while queue is not None and not queue.empty():
        connections.append(queue.get_nowait())
    for conn in connections:
        transport = conn.writer.transport
        if state.loop.is_closed():
            sock = getattr(transport, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
                transport._sock = None
            transport._closing = True  # so the stream writer does not warn about the closed loop either
        elif state.loop.is_running() and state.loop is not running_asyncio_loop():
            state.loop.call_soon_threadsafe(transport.close)
        else:
            transport.close()


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failure the caller stopped waiting for is not logged as lost


class MemcachedBackend(Backend, ClearPrefixSupport):
    """Memcached tier (asyncio only), through aiocache.

    URL::

        memcached://[host][:port][?namespace=cl&pool_size=4]

    Options: ``namespace`` (what this tier's memcached keys start with, 1 to 32 of ``A-Z a-z 0-9 _ . -``; default
    ``cl``), ``pool_size`` (connections per event loop, default 4).

    Besides the storage contract it offers `ClearPrefixSupport` (the engine's ``clear()`` removes only its
    key prefix's entries). Differences from the Redis tier: no cross-process invalidation messages (other
    processes' memory tiers keep invalidated entries until they expire), no locks, and an entry larger than
    the server's item size limit (memcached's ``-I``, 1 MiB by default) fails to store and is counted as a
    tier error.
    """

    schemes = ("memcached",)
    options = frozenset({"namespace", "pool_size"})

    def __init__(self, url: BackendURL | str, *, clock: Clock = time.time) -> None:
        parsed = BackendURL.parse(url) if isinstance(url, str) else url
        super().__init__(parsed, clock=clock)
        self.validate_url(parsed)
        self.host = parsed.host or "127.0.0.1"
        self.port = parsed.port or _DEFAULT_PORT
        self.namespace = parsed.options.get("namespace", "cl")
        self.pool_size = int(parsed.options.get("pool_size", "4"))
        self._generation_key = entries.generation_key(self.namespace).decode()
        self._state: _LoopClient | None = None

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Check the address and options without importing the driver or connecting. Raises `ConfigError`."""
        super().validate_url(url)
        if importlib.util.find_spec("aiocache") is None:  # the registry checked aiomcache, the other driver
            raise MissingDependencyError(url.field, url.redacted(), "aiocache", "memcached")
        if url.path not in ("", "/"):
            raise ConfigError(url.field, url.redacted(), "memcached:// takes no path (memcached has no databases)")
        if url.username is not None or url.password is not None:
            raise ConfigError(url.field, url.redacted(), "memcached:// takes no user or password (no SASL support)")
        namespace = url.options.get("namespace", "cl")
        if not entries.valid_namespace(namespace):
            raise ConfigError(url.option_field("namespace"), namespace,
                              "expected 1 to 32 of the characters A-Z a-z 0-9 _ . -")
        pool_size = url.options.get("pool_size", "4")
        if not pool_size.isdecimal() or not 1 <= int(pool_size) <= 1024:
            raise ConfigError(url.option_field("pool_size"), pool_size, "expected a whole number from 1 to 1024")

    # -- one client per event loop --------------------------------------------------------------------------

    def _client(self) -> _LoopClient:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise BackendError("the memcached tier runs on asyncio only (aiocache and aiomcache); "
                               "it is skipped under other event loops") from None
        state = self._state
        if state is not None and state.loop is loop:
            return state
        if state is not None:
            self._state = None
            _abandon(state)
        from aiocache.backends.memcached import MemcachedCache
        from aiocache.serializers import NullSerializer

        cache = MemcachedCache(serializer=NullSerializer(encoding=None), endpoint=self.host, port=self.port,
                               pool_size=self.pool_size, timeout=None)
        state = self._state = _LoopClient(loop, cache)
        return state

    async def _run(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(cache)`` in a task that the caller's cancellation leaves to finish its exchange."""
        state = self._client()
        task = asyncio.ensure_future(op(state.cache))
        state.pending.add(task)
        task.add_done_callback(state.pending.discard)
        task.add_done_callback(_consume)
        return await asyncio.shield(task)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            self._state = None
            with contextlib.suppress(Exception):
                _abandon(state)

    async def aclose(self) -> None:
        """Close the connections of the current event loop (and forget any other's)."""
        state, self._state = self._state, None
        if state is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if state.loop is not current:
            _abandon(state)
            return
        if state.pending:
            await asyncio.wait(list(state.pending), timeout=1.0)
        _abandon(state)
        with contextlib.suppress(Exception):
            await state.cache.close()

    # -- tokens ---------------------------------------------------------------------------------------------

    def _tag_key(self, tag: str) -> str:
        return entries.tag_key(self.namespace, tag).decode()

    def _data_key(self, key: str) -> str:
        return entries.data_key(self.namespace, key).decode()

    @staticmethod
    async def _get_all(cache: Any, keys: Sequence[str]) -> dict[str, bytes | None]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        values = await cache.multi_get(unique)
        return dict(zip(unique, values, strict=True))

    async def _current_tokens(self, cache: Any, keys: Sequence[str]) -> dict[str, bytes]:
        """The generation record and tag tokens under ``keys``, creating the missing ones (``add`` is atomic:
        one creator wins, the others read its token)."""
        found = await self._get_all(cache, keys)
        for _ in range(3):
            missing = [key for key, value in found.items() if value is None]
            if not missing:
                return {key: value for key, value in found.items() if value is not None}

            async def create(key: str) -> None:
                fresh = entries.Record.fresh().encode() if key == self._generation_key else entries.new_token()
                with contextlib.suppress(ValueError):  # aiocache: someone else created it first
                    await cache.add(key, fresh, ttl=0)

            await asyncio.gather(*(create(key) for key in missing))
            found.update(await self._get_all(cache, missing))
        raise BackendError("memcached keeps evicting the tier's tokens: the server is too small")

    # -- the storage contract -------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the current entries under ``keys``: one multi-key ``get``, two when entries carry tags."""
        if not keys:
            return []
        return await self._run(lambda cache: self._read(cache, keys))

    async def _read(self, cache: Any, keys: Sequence[str]) -> list[bytes | None]:
        found, framed = await self._current(cache, keys)
        for key, parts in framed.items():
            found[key] = parts.envelope
        return [found.get(key) for key in keys]

    async def _current(self, cache: Any, keys: Sequence[str]) -> tuple[dict[str, bytes], dict[str, entries.Frame]]:
        """The values under ``keys`` that are not frames, and the frames that are current (generation, prefix
        and tag tokens, expiry)."""
        names = {key: self._data_key(key) for key in keys}
        values = await self._get_all(cache, [self._generation_key, *names.values()])
        stored = values.pop(self._generation_key)
        record = entries.Record.decode(stored) if stored is not None else None
        if record is None:
            return {}, {}
        now = self.clock()
        foreign: dict[str, bytes] = {}
        framed: dict[str, entries.Frame] = {}
        for key, name in names.items():
            value = values[name]
            if value is None:
                continue
            parts = entries.unframe(value)
            if parts is None:
                foreign[key] = value  # not a frame: handed to the codec, which counts it as corrupt
            elif parts.stamp == record.stamp(key) and (parts.expires_at is None or parts.expires_at > now):
                framed[key] = parts
        tags = {tag for parts in framed.values() for tag, _ in parts.tags}
        versions = await self._get_all(cache, [self._tag_key(tag) for tag in tags]) if tags else {}
        current = {key: parts for key, parts in framed.items()
                   if all(versions.get(self._tag_key(tag)) == token for tag, token in parts.tags)}
        return foreign, current

    # -- what the tier holds (for ``cachelayers stats``) ----------------------------------------------------

    async def _dump_names(self) -> list[str]:
        """Every key memcached holds (``lru_crawler metadump all``), on a connection of its own."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(b"lru_crawler metadump all\r\n")
            await writer.drain()
            names: list[str] = []
            while (line := await reader.readline()) not in (b"END\r\n", b""):
                if line.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")):
                    raise BackendError(f"memcached refused to list its keys: {line.decode(errors='replace').strip()}")
                first = line.split(b" ", 1)[0]
                if first.startswith(b"key="):
                    names.append(urllib.parse.unquote(first[4:].decode("ascii", "replace")))
            return names
        finally:
            writer.close()

    async def tag_usage(self, tag_prefix: str) -> dict[str, tuple[int, int]]:
        """Current entries and their bytes per tag that starts with ``tag_prefix`` (a slow scan of every key:
        for ``cachelayers stats`` and ``invalidate``, not for the hot path). Entries stored under a digest are
        not seen (their storage key cannot be read back)."""
        readable = f"{self.namespace}:"
        keys = [name[len(readable):] for name in await self._dump_names() if name.startswith(readable)]
        usage: dict[str, tuple[int, int]] = {}
        for start in range(0, len(keys), 200):
            chunk = keys[start:start + 200]
            _, current = await self._run(lambda cache, chunk=chunk: self._current(cache, chunk))  # type: ignore[misc]
            for parts in current.values():
                for tag, _ in parts.tags:
                    if tag.startswith(tag_prefix):
                        entries_, size = usage.get(tag, (0, 0))
                        usage[tag] = (entries_ + 1, size + len(parts.envelope))
        return usage

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store the entries with the current generation and tag versions, and memcached's own expiry."""
        if items:
            await self._run(lambda cache: self._write(cache, items))

    async def _write(self, cache: Any, items: Sequence[StoreItem]) -> None:
        now = self.clock()
        live = [item for item in items if item.expires_at is None or item.expires_at > now]
        dead = [self._data_key(item.key) for item in items if item.expires_at is not None and item.expires_at <= now]
        tags = sorted({tag for item in live for tag in item.tags})
        tag_keys = {tag: self._tag_key(tag) for tag in tags}
        tokens = await self._current_tokens(cache, [self._generation_key, *tag_keys.values()]) if live else {}
        record = entries.Record.decode(tokens[self._generation_key]) if live else None
        if live and record is None:
            raise BackendError(f"the value under {self._generation_key!r} is not this tier's generation record")

        async def store(item: StoreItem) -> None:
            assert record is not None
            stamped = tuple((tag, tokens[tag_keys[tag]]) for tag in dict.fromkeys(item.tags))
            value = entries.frame(record.stamp(item.key), item.expires_at, stamped, item.blob)
            if not await cache.set(self._data_key(item.key), value, ttl=self._exptime(item.expires_at, now)):
                raise BackendError(f"memcached did not store {item.key!r}")

        await asyncio.gather(*(store(item) for item in live), *(cache.delete(name) for name in dead))

    @staticmethod
    def _exptime(expires_at: float | None, now: float) -> int:
        """Memcached's expiry of an entry: whole seconds from now, rounded up; ``0`` (never) beyond 30 days,
        where memcached would read the number as a date (the tier's own check still expires the entry)."""
        if expires_at is None:
            return 0
        seconds = math.ceil(expires_at - now) + 1
        return seconds if seconds < _RELATIVE_LIMIT else 0

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete the keys (memcached deletes one key per command; they go out together)."""
        if keys:
            names = list(dict.fromkeys(self._data_key(key) for key in keys))
            await self._run(lambda cache: asyncio.gather(*(cache.delete(name) for name in names)))

    async def delete_tags(self, tags: Sequence[str]) -> None:
        """Remove the tags' version tokens: every entry written under them stops being returned."""
        if tags:
            names = list(dict.fromkeys(self._tag_key(tag) for tag in tags))
            await self._run(lambda cache: asyncio.gather(*(cache.delete(name) for name in names)))

    async def clear_prefix(self, prefix: str) -> None:
        """Give ``prefix`` a new token in the generation record: every entry under it stops being returned.

        The record is replaced with ``cas``, so concurrent clears of different prefixes all take effect.
        """
        key = self._generation_key.encode()

        async def replace(cache: Any) -> None:
            for _ in range(20):
                stored, cas = await cache.raw("gets", key)
                record = entries.Record.decode(stored) if stored is not None else None
                if record is None:
                    return  # no record: nothing stored is current anyway
                if await cache.raw("cas", key, record.with_prefix_cleared(prefix).encode(), cas):
                    return
            raise BackendError("the generation record kept changing under clear_prefix")

        if prefix:
            await self._run(replace)
        else:
            await self.clear()

    async def clear(self) -> None:
        """Replace the generation record: every entry of the namespace stops being returned."""

        async def replace(cache: Any) -> None:
            if not await cache.set(self._generation_key, entries.Record.fresh().encode(), ttl=0):
                raise BackendError("memcached did not store the new generation")

        await self._run(replace)
