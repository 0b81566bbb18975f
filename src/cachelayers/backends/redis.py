"""The Redis tier, on redis-py's asyncio client: ``redis://``, ``rediss://``, ``redis+cluster://``, ``unix://``.

Entries are plain Redis strings under their storage keys with a native TTL (``PX``) taken from the entry's
absolute expiry; a tag is a Redis set of the keys carrying it, named by the tag itself (the engine names tags
inside the key prefix), so invalidating a tag pops its members and unlinks them without ``KEYS`` or ``SCAN``.

Reads are *auto-pipelined*: every read issued in one event-loop tick, by any number of concurrent callers,
goes to Redis as one ``MGET``. Writes of a batch go in one pipeline (a ``MULTI`` transaction on a single
server, so an entry and its tag memberships appear together).

The tier is **asyncio-only**: redis-py's asyncio client cannot run under trio. Under trio every operation
raises `BackendError`, which the engine treats like any failing tier (a miss, counted, logged once).

One connection pool per backend instance and event loop: the pool is made on first use in a loop and closed
by `RedisBackend.aclose`; a pool left behind by a loop that has ended is dropped with its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import anyio

from cachelayers.backends.base import (
    Backend,
    BackendURL,
    ClearPrefixSupport,
    Clock,
    DeadlineSupport,
    LockSupport,
    PubSubSupport,
    StoreItem,
)
from cachelayers.durations import parse_duration
from cachelayers.errors import BackendError, ConfigError
from cachelayers.loops import running_asyncio_loop

__all__ = ["RedisBackend"]

DEFAULT_PORT: Final = 6379
DEFAULT_TIMEOUT: Final = 5.0
_CHUNK: Final = 1000  # keys per UNLINK / members per SPOP, to keep single commands short
_MAX_READERS: Final = 16  # dedicated read connections per event loop; more batches in flight use the pool
_SSL_OPTIONS: Final = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})
_CERT_REQS: Final = frozenset({"none", "optional", "required"})

# Adds an entry to a tag's set and keeps the set alive as long as its longest-lived member: a new set takes
# the entry's TTL, an existing one is only ever extended, and an entry that never expires makes it persistent.
# It touches one key, so it is valid on a cluster too.
_TAG_SCRIPT: Final = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SADD', KEYS[1], ARGV[1])
local ms = tonumber(ARGV[2])
if ms < 0 then
  redis.call('PERSIST', KEYS[1])
elseif existed == 0 then
  redis.call('PEXPIRE', KEYS[1], ms)
else
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl >= 0 and ttl < ms then redis.call('PEXPIRE', KEYS[1], ms) end
end
return 1
"""
_EXTEND_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Release and notify in one step, so a waiter woken by the message finds the lock already free. The message
# goes out even when the lease had run out: the value was written all the same.
_RELEASE_SCRIPT: Final = """
local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) held = 1 end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return held
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _pack_mget(keys: Sequence[str]) -> bytes:
    parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
    for key in keys:
        raw = key.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _ProtocolError(ConnectionError):
    """The reply was not what MGET answers: the connection is dropped."""


async def _mget_on(conn: Any, keys: Sequence[str], seconds: float,
                   loop: asyncio.AbstractEventLoop) -> list[bytes | None]:
    """Send ``MGET keys`` on a connected redis-py connection and parse the reply, within ``seconds``.

    The reply is read straight from the connection's stream and parsed in bulk (RESP2 or RESP3): redis-py's
    general parser spends several awaits and calls per element, which for a 100-key read costs more than the
    round trip. Falls back to redis-py's own reading if the connection does not expose its streams.
    """
    reader: asyncio.StreamReader | None = getattr(conn, "_reader", None)
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    if reader is None or writer is None:
        await conn.send_packed_command(conn.pack_command("MGET", *keys), check_health=False)
        reply = await conn.read_response(timeout=seconds)
        if reply is None:  # redis-py's way of saying the read timed out; the reply is still due
            raise TimeoutError(f"Redis did not answer within {seconds:g}s")
        return list(reply)
    writer.write(_pack_mget(keys))
    if writer.transport.get_write_buffer_size() > 1 << 16:
        await writer.drain()
    # The deadline fails the stream itself: cheaper than a cancel scope, and the connection is dropped after.
    timer = loop.call_later(seconds, reader.set_exception, TimeoutError(f"Redis did not answer within {seconds:g}s"))
    try:
        head = await reader.readuntil(b"\r\n")
        if head[:1] == b"-":
            from redis.exceptions import ResponseError

            raise ResponseError(head[1:-2].decode(errors="replace"))
        if head[:1] != b"*":
            raise _ProtocolError(f"unexpected reply to MGET: {head[:40]!r}")
        count = int(head[1:-2])
        buf = b""
        pos = 0
        values: list[bytes | None] = []
        append = values.append
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            while end < 0:
                more = await reader.read(1 << 16)
                if not more:
                    raise asyncio.IncompleteReadError(buf[pos:], None)
                buf = buf[pos:] + more
                pos = 0
                end = buf.find(b"\r\n")
            tag = buf[pos]
            if tag == 36:  # $<length>: a bulk string, or $-1 (RESP2 nil)
                length = int(buf[pos + 1:end])
                if length < 0:
                    append(None)
                    pos = end + 2
                    continue
                start = end + 2
                stop = start + length
                while len(buf) < stop + 2:
                    more = await reader.read(max(1 << 16, stop + 2 - len(buf)))
                    if not more:
                        raise asyncio.IncompleteReadError(buf, stop + 2)
                    buf += more
                append(buf[start:stop])
                pos = stop + 2
            elif tag == 95:  # _ : RESP3 null
                append(None)
                pos = end + 2
            else:
                raise _ProtocolError(f"unexpected element in an MGET reply: {buf[pos:pos + 20]!r}")
        if pos != len(buf):
            raise _ProtocolError("bytes after the MGET reply")  # never trust this connection again
        return values
    finally:
        timer.cancel()


class _Redo(Exception):
    """The caller that was sending a read batch was cancelled: its followers send their keys again."""


class _ReadBatch:
    """Reads issued in one event-loop tick, sent together as one ``MGET`` by the first of them."""

    __slots__ = ("keys", "waiters")

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys: list[str] = list(keys)
        self.waiters: list[tuple[int, asyncio.Future[list[bytes | None]]]] = []


class _LoopState:
    """What the backend holds for one event loop: the client (and its pool), idle read connections, the open
    read batch."""

    __slots__ = ("batch", "client", "crowded", "in_flight", "loop", "readers")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any) -> None:
        self.loop = loop
        self.client = client
        self.batch: _ReadBatch | None = None
        self.readers: list[Any] = []
        self.in_flight = 0  # read batches being sent or awaited
        self.crowded = False  # whether the last batch had more than one caller


class RedisBackend(Backend, DeadlineSupport, ClearPrefixSupport, PubSubSupport, LockSupport):
    """Redis tier (asyncio only).

    URLs::

        redis://[[user]:password@]host[:port][/db][?options]
        rediss://...                      (TLS)
        redis+cluster://host[:port][?options]   (any node of the cluster; db 0 only)
        unix:///path/to/redis.sock[?db=0&options]

    Options: ``timeout`` (socket timeout, default 5s), ``connect_timeout`` (default: ``timeout``),
    ``max_connections`` (pool size per event loop), ``health_check_interval``, ``client_name``; with TLS
    (``rediss://``, or ``redis+cluster://…?ssl=true``) also ``ssl_cert_reqs`` (none/optional/required),
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``; ``db`` for ``unix://``. An unknown option or a bad
    value raises `ConfigError` naming it when the settings are made.

    Besides the storage contract it offers `PubSubSupport` (cross-process invalidation) and `LockSupport`
    (leased locks for single-flight across processes).
    """

    schemes = ("redis", "rediss", "redis+cluster", "unix")
    options = frozenset({"timeout", "connect_timeout", "max_connections", "health_check_interval", "client_name",
                         "db", "ssl", *_SSL_OPTIONS})

    def __init__(self, url: BackendURL | str, *, clock: Clock = time.time) -> None:
        parsed = BackendURL.parse(url) if isinstance(url, str) else url
        super().__init__(parsed, clock=clock)
        self.validate_url(parsed)
        self.cluster = parsed.scheme == "redis+cluster"
        self._kwargs = self._client_kwargs(parsed)
        self._state: _LoopState | None = None

    # -- configuration ------------------------------------------------------------------------------------

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Check the address, database number and options without importing anything or connecting."""
        super().validate_url(url)
        opts = url.options
        if url.scheme == "unix":
            if url.host or not url.path.startswith("/"):
                raise ConfigError(url.field, url.redacted(), "expected unix:///absolute/path/to/redis.sock")
            if "db" in opts and not opts["db"].isdigit():
                raise ConfigError(url.option_field("db"), opts["db"], "expected a database number (0, 1, ...)")
        else:
            if not url.host:
                raise ConfigError(url.field, url.redacted(), f"needs a host, e.g. {url.scheme}://localhost:6379/0")
            db = url.path.strip("/")
            if db and not db.isdigit():
                raise ConfigError(url.field, url.redacted(), f"the path must be a database number, got {db!r}")
            if "db" in opts:
                raise ConfigError(url.option_field("db"), opts["db"], "put the database number in the path: /0")
            if url.scheme == "redis+cluster" and db not in ("", "0"):
                raise ConfigError(url.field, url.redacted(), "a Redis cluster has database 0 only")
        for name in ("timeout", "connect_timeout"):
            if name in opts and parse_duration(opts[name], url.option_field(name)) <= 0:
                raise ConfigError(url.option_field(name), opts[name], "must be positive")
        if "health_check_interval" in opts:
            parse_duration(opts["health_check_interval"], url.option_field("health_check_interval"))
        raw = opts.get("max_connections")
        if raw is not None and (not raw.isdigit() or int(raw) <= 0):
            raise ConfigError(url.option_field("max_connections"), raw, "expected a positive integer")
        if "ssl" in opts:
            if url.scheme != "redis+cluster":
                raise ConfigError(url.option_field("ssl"), opts["ssl"], "use rediss:// for TLS")
            if opts["ssl"].lower() not in ("true", "false", "1", "0"):
                raise ConfigError(url.option_field("ssl"), opts["ssl"], "expected true or false")
        tls = url.scheme == "rediss" or opts.get("ssl", "").lower() in ("true", "1")
        for name in sorted(_SSL_OPTIONS & set(opts)):
            if not tls:
                raise ConfigError(url.option_field(name), opts[name], "TLS options need rediss:// (or ?ssl=true)")
        if "ssl_cert_reqs" in opts and opts["ssl_cert_reqs"] not in _CERT_REQS:
            raise ConfigError(url.option_field("ssl_cert_reqs"), opts["ssl_cert_reqs"],
                              f"expected one of {', '.join(sorted(_CERT_REQS))}")

    @staticmethod
    def _client_kwargs(url: BackendURL) -> dict[str, Any]:
        opts = url.options
        timeout = parse_duration(opts["timeout"], "timeout") if "timeout" in opts else DEFAULT_TIMEOUT
        kwargs: dict[str, Any] = {
            "username": url.username,
            "password": url.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": (parse_duration(opts["connect_timeout"], "connect_timeout")
                                       if "connect_timeout" in opts else timeout),
            # One immediate retry: a pooled connection that died with a restarted server is replaced at once;
            # anything longer is the engine's business (tier timeout, circuit breaker).
            "retries": 1,
            "decode_responses": False,
        }
        if "health_check_interval" in opts:
            kwargs["health_check_interval"] = parse_duration(opts["health_check_interval"], "health_check_interval")
        if "client_name" in opts:
            kwargs["client_name"] = opts["client_name"]
        if "max_connections" in opts:
            kwargs["max_connections"] = int(opts["max_connections"])
        if url.scheme == "unix":
            kwargs["path"] = url.path
            kwargs["db"] = int(opts.get("db", "0"))
        else:
            kwargs["host"] = url.host
            kwargs["port"] = url.port or DEFAULT_PORT
            if url.scheme != "redis+cluster":
                kwargs["db"] = int(url.path.strip("/") or 0)
        if url.scheme == "rediss" or opts.get("ssl", "").lower() in ("true", "1"):
            kwargs["ssl"] = True
            for name in _SSL_OPTIONS & set(opts):
                kwargs[name] = opts[name]
        return kwargs

    # -- one client per event loop --------------------------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise BackendError("the Redis tier runs on asyncio only (redis-py's asyncio client); "
                               "it is skipped under other event loops") from None
        state = self._state
        if state is not None and state.loop is loop:
            return state
        if state is not None:
            self._state = None
            self._abandon(state)
        state = self._state = _LoopState(loop, self._make_client(self._kwargs, cluster=self.cluster))
        return state

    @staticmethod
    def _make_client(kwargs: dict[str, Any], *, cluster: bool) -> Any:
        # redis-py is imported here, not at module level: validating a URL must not load the driver.
        import redis.asyncio as aredis
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        kwargs = dict(kwargs)
        kwargs["retry"] = Retry(NoBackoff(), kwargs.pop("retries"))
        if cluster:
            kwargs.pop("max_connections", None)
            kwargs.pop("health_check_interval", None)
            return RedisCluster(**kwargs)
        if "path" in kwargs:
            kwargs.pop("ssl", None)
            pool = aredis.ConnectionPool(connection_class=aredis.UnixDomainSocketConnection, **kwargs)
        elif kwargs.pop("ssl", False):
            pool = aredis.ConnectionPool(connection_class=aredis.SSLConnection, **kwargs)
        else:
            pool = aredis.ConnectionPool(**kwargs)
        return aredis.Redis(connection_pool=pool)

    def _abandon(self, state: _LoopState) -> None:
        """Drop the client of an event loop we no longer use, closing its sockets the way that loop allows.

        A pool is bound to the loop it was made in. When that loop has ended (``asyncio.run`` returned) its
        transports can no longer be closed through it, so the sockets are closed directly; otherwise the
        transports are closed in their own loop.
        """
        pool = getattr(state.client, "connection_pool", None)
        connections = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ()),
                       *state.readers]
        loop = state.loop
        for conn in connections:
            writer = getattr(conn, "_writer", None)
            if writer is None:
                continue
            transport = writer.transport
            if loop.is_closed():
                sock = getattr(transport, "_sock", None)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
                    transport._sock = None
                transport._closing = True  # so the stream writer does not warn about the closed loop either
            elif loop.is_running() and loop is not running_asyncio_loop():
                loop.call_soon_threadsafe(transport.close)
            else:
                transport.close()
            conn._reader = conn._writer = None
        state.readers.clear()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            self._state = None
            with contextlib.suppress(Exception):
                self._abandon(state)

    async def aclose(self) -> None:
        """Close the connection pool of the current event loop (and forget any other)."""
        state, self._state = self._state, None
        if state is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if state.loop is not current:
            self._abandon(state)
            return
        for conn in state.readers:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        await self._close_client(state.client)

    # -- the storage contract -------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the entries under ``keys``; reads of one event-loop tick share one ``MGET``."""
        return await self.get_many_within(keys, self._kwargs["socket_timeout"])

    async def get_many_within(self, keys: Sequence[str], seconds: float) -> list[bytes | None]:
        """Like `get_many`, raising `TimeoutError` after ``seconds``.

        Auto-pipelining: the first read of a tick opens a batch; every read issued while it is open joins it,
        and the first sends them all as one ``MGET`` on a connection of its own and hands each its share. It
        yields once to let the tick's reads join only when other reads are in flight (or the last batch had
        company): a lone caller pays no extra event-loop turn. If the sending caller is cancelled, the others
        send again; if it fails or times out, they fail with it.
        """
        if not keys:
            return []
        state = self._loop_state()
        while True:
            batch = state.batch
            if batch is None:
                break
            future: asyncio.Future[list[bytes | None]] = state.loop.create_future()
            batch.keys.extend(keys)
            batch.waiters.append((len(keys), future))
            try:
                return await future
            except _Redo:
                continue
        batch = state.batch = _ReadBatch(keys)
        state.in_flight += 1
        try:
            try:
                if state.in_flight > 1 or state.crowded:
                    await asyncio.sleep(0)  # let the reads of this tick join
            finally:
                if state.batch is batch:
                    state.batch = None
            state.crowded = bool(batch.waiters)
            values = await self._mget(state, batch.keys, seconds)
        except Exception as exc:
            for _, future in batch.waiters:
                if not future.done():
                    error = TimeoutError(*exc.args) if isinstance(exc, TimeoutError) else BackendError(str(exc))
                    error.__cause__ = exc
                    future.set_exception(error)
            raise
        except BaseException:
            for _, future in batch.waiters:
                if not future.done():
                    future.set_exception(_Redo())
            raise
        finally:
            state.in_flight -= 1
        start = len(keys)
        for count, future in batch.waiters:
            if not future.done():
                future.set_result(values[start:start + count])
            start += count
        return values[:len(keys)]

    async def _mget(self, state: _LoopState, keys: list[str], seconds: float) -> list[bytes | None]:
        if self.cluster:
            async with asyncio.timeout(seconds):
                return await state.client.mget_nonatomic(keys)  # type: ignore[no-any-return]
        from redis.exceptions import ConnectionError as RedisConnectionError

        # A connection of our own rather than the client's execute_command: no pool lock, no retry wrapper, no
        # per-command bookkeeping, and a reply parser made for MGET. That is most of what a GET costs in
        # redis-py, and it pays for the engine.
        conn = state.readers.pop() if state.readers else state.client.connection_pool.make_connection()
        reusable = False
        try:
            for attempt in range(2):
                fresh = not conn.is_connected
                try:
                    if fresh:
                        async with asyncio.timeout(seconds):
                            await conn.connect()
                    values = await _mget_on(conn, keys, seconds, state.loop)
                except (RedisConnectionError, ConnectionError, asyncio.IncompleteReadError) as exc:
                    await conn.disconnect(nowait=True)
                    if fresh or attempt:
                        raise BackendError(f"{type(exc).__name__}: {exc}") from exc
                    continue  # a pooled connection that died with a restarted server: one more try, reconnected
                reusable = True
                return values
            raise AssertionError("unreachable")
        finally:
            if reusable and len(state.readers) < _MAX_READERS:
                state.readers.append(conn)
            else:
                # A reply may still be on its way: this connection can never be trusted again.
                await conn.disconnect(nowait=True)

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store the entries with ``PX`` from their expiry and record them under their tags, in one round trip."""
        if not items:
            return
        client = self._loop_state().client
        now = self.clock()
        if len(items) == 1 and not items[0].tags:
            item = items[0]
            ms = self._ttl_ms(item, now)
            if ms is None:
                await client.execute_command("SET", item.key, item.blob)
            elif ms > 0:
                await client.execute_command("SET", item.key, item.blob, "PX", ms)
            else:
                await client.execute_command("UNLINK", item.key)
            return
        pipe = client.pipeline(transaction=not self.cluster)
        for item in items:
            ms = self._ttl_ms(item, now)
            if ms is not None and ms <= 0:
                pipe.unlink(item.key)  # already expired: drop an older copy rather than store a dead one
                continue
            if ms is None:
                pipe.set(item.key, item.blob)
            else:
                pipe.set(item.key, item.blob, px=ms)
            for tag in item.tags:
                pipe.eval(_TAG_SCRIPT, 1, tag, item.key, -1 if ms is None else ms)
        await pipe.execute()

    @staticmethod
    def _ttl_ms(item: StoreItem, now: float) -> int | None:
        if item.expires_at is None:
            return None
        return math.ceil((item.expires_at - now) * 1000)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Unlink the keys."""
        client = self._loop_state().client
        for start in range(0, len(keys), _CHUNK):
            await client.unlink(*keys[start:start + _CHUNK])

    async def delete_tags(self, tags: Sequence[str]) -> None:
        """Pop the members of each tag's set and unlink them.

        ``SPOP`` takes members atomically, so an entry tagged while this runs is either removed now or stays
        in the set for the next invalidation; none is left untracked.
        """
        client = self._loop_state().client
        pending = list(dict.fromkeys(tags))
        while pending:
            pipe = client.pipeline(transaction=False)
            for tag in pending:
                pipe.spop(tag, _CHUNK)
            popped: list[list[bytes]] = await pipe.execute()
            members = [m for batch in popped for m in batch or ()]
            for start in range(0, len(members), _CHUNK):
                await client.unlink(*members[start:start + _CHUNK])
            pending = [tag for tag, batch in zip(pending, popped, strict=True) if batch and len(batch) == _CHUNK]

    async def clear_prefix(self, prefix: str) -> None:
        """Unlink every key that starts with ``prefix`` (found with ``SCAN``: this is the one operation that scans)."""
        client = self._loop_state().client
        found: list[bytes] = []
        async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=_CHUNK):
            found.append(key)
            if len(found) >= _CHUNK:
                await client.unlink(*found)
                found = []
        if found:
            await client.unlink(*found)

    async def clear(self) -> None:
        """Remove every key of the database this URL selects (the engine uses `clear_prefix` instead)."""
        await self.clear_prefix("")

    # -- PubSubSupport -----------------------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        """``PUBLISH`` the message."""
        await self._loop_state().client.publish(channel, message)

    def subscribe(self, channel: str) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Subscribe on a connection of its own that never reconnects silently (a lost connection raises)."""
        return self._subscription(channel)

    @contextlib.asynccontextmanager
    async def _subscription(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        self._loop_state()  # asyncio only
        # A client of its own: no read timeout (it waits for messages) and no silent reconnect, so that a lost
        # connection ends the subscription and the engine knows it may have missed messages. On a cluster it
        # talks to the node of the URL: PUBLISH reaches every node.
        kwargs = {k: v for k, v in self._kwargs.items() if k not in ("max_connections", "health_check_interval")}
        kwargs.update(socket_timeout=None, retries=0)
        client = self._make_client(kwargs, cluster=False)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            while True:  # the confirmation: from here on no published message is missed
                reply = await pubsub.get_message(timeout=None)
                if reply is not None and reply["type"] == "subscribe":
                    break
            yield self._messages(pubsub)
        finally:
            # The subscriber is usually cancelled (the engine closing): close the connection all the same.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await self._close_client(client)

    @staticmethod
    async def _close_client(client: Any) -> None:
        with contextlib.suppress(Exception):
            if hasattr(client, "connection_pool"):
                await client.aclose(close_connection_pool=True)
            else:
                await client.aclose()

    @staticmethod
    async def _messages(pubsub: Any) -> AsyncIterator[bytes]:
        while True:
            reply = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if reply is not None and reply["type"] == "message":
                yield reply["data"]

    # -- LockSupport -------------------------------------------------------------------------------------------

    async def acquire_lock(self, name: str, token: str, lease: float) -> bool:
        """``SET name token NX PX lease``."""
        client = self._loop_state().client
        return bool(await client.set(name, token, nx=True, px=max(1, math.ceil(lease * 1000))))

    async def extend_lock(self, name: str, token: str, lease: float) -> bool:
        """Reset the lease if we still hold the lock."""
        client = self._loop_state().client
        return bool(await client.eval(_EXTEND_SCRIPT, 1, name, token, max(1, math.ceil(lease * 1000))))

    async def release_lock(self, name: str, token: str, notify: tuple[str, bytes] | None = None) -> bool:
        """Delete the lock if we hold it and publish ``notify``, atomically."""
        client = self._loop_state().client
        channel, message = notify if notify is not None else ("", b"")
        return bool(await client.eval(_RELEASE_SCRIPT, 1, name, token, channel, message))
