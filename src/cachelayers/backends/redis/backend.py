"""`RedisBackend`: the Redis tier, on redis-py's asyncio client.

Entries are plain Redis strings under their storage keys with a native TTL (``PX``) taken from the entry's
absolute expiry; a tag is a Redis set of the keys carrying it, named by the tag itself (the engine names tags
inside the key prefix), so invalidating a tag pops its members and unlinks them without ``KEYS`` or ``SCAN``.
Reads and writes are auto-pipelined: the reads of one event-loop tick are one ``MGET`` (`autopipeline`), the
writes one ``MULTI`` transaction (`writes`; on a cluster, a pipeline), so an entry and its tag memberships
appear together and a burst of writes needs a few connections, not one each. One connection pool per backend
instance and event loop: the pool is made on first use in a loop and closed by `RedisBackend.aclose`; a pool
left behind by a loop that has ended is dropped with its sockets. The pool waits for a free connection rather
than failing when all are in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

from cachelayers.backends.base import (
    Backend,
    BackendURL,
    ClearPrefixSupport,
    Clock,
    DeadlineSupport,
    EpochSupport,
    LockSupport,
    PubSubSupport,
    StoreItem,
)
from cachelayers.backends.redis import locks
from cachelayers.backends.redis.autopipeline import LoopState, abandon, fair_timeout, read_many
from cachelayers.backends.redis.options import OPTIONS, client_kwargs, close_client, make_client, validate_redis_url
from cachelayers.backends.redis.pubsub import subscription
from cachelayers.backends.redis.writes import MAX_WRITERS, write_many
from cachelayers.errors import BackendError
from cachelayers.loops import running_asyncio_loop

__all__ = ["RedisBackend"]

_CHUNK: Final = 1000  # keys per UNLINK / members per SPOP, to keep single commands short


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# Takes the next invalidation sequence number (microseconds of the server's clock, or one more than the last
# one taken, whichever is larger: it grows even if the hash is lost), records it for the fields and publishes
# the message prefixed with it, atomically: subscribers receive sequence numbers in increasing order.
_EPOCH_SCRIPT: Final = """
local t = redis.call('TIME')
local seq = math.max(tonumber(redis.call('HGET', KEYS[1], '*') or '0') + 1,
                     tonumber(t[1]) * 1000000 + tonumber(t[2]))
local text = string.format('%d', seq)
redis.call('HSET', KEYS[1], '*', text)
for i = 3, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], text) end
redis.call('PUBLISH', ARGV[1], '#' .. text .. ':' .. ARGV[2])
return seq
"""


class RedisBackend(Backend, DeadlineSupport, ClearPrefixSupport, PubSubSupport, LockSupport, EpochSupport):
    """Redis tier (asyncio only).

    URLs::

        redis://[[user]:password@]host[:port][/db][?options]
        rediss://...                      (TLS)
        redis+cluster://host[:port][?options]   (any node of the cluster; db 0 only)
        unix:///path/to/redis.sock[?db=0&options]

    Options: ``timeout`` (socket timeout, default 5s), ``connect_timeout`` (default: ``timeout``),
    ``max_connections`` (pool size per event loop, default 100; a command waits for a free connection),
    ``health_check_interval``, ``client_name``; with TLS
    (``rediss://``, or ``redis+cluster://…?ssl=true``) also ``ssl_cert_reqs`` (none/optional/required),
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``; ``db`` for ``unix://``. An unknown option or a bad
    value raises `ConfigError` naming it when the settings are made.

    Besides the storage contract it offers `PubSubSupport` (cross-process invalidation), `EpochSupport`
    (invalidation epochs every process checks entries against) and `LockSupport` (leased locks for
    single-flight across processes).
    """

    schemes = ("redis", "rediss", "redis+cluster", "unix")
    options = OPTIONS

    def __init__(self, url: BackendURL | str, *, clock: Clock = time.time) -> None:
        parsed = BackendURL.parse(url) if isinstance(url, str) else url
        super().__init__(parsed, clock=clock)
        self.validate_url(parsed)
        self.cluster = parsed.scheme == "redis+cluster"
        self._kwargs = client_kwargs(parsed)
        self._state: LoopState | None = None
        """The pool of the loop of the last call (the fast path); all of them are in ``_states``."""
        self._states: dict[asyncio.AbstractEventLoop, LoopState] = {}

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Check the address, database number and options without importing anything or connecting."""
        super().validate_url(url)
        validate_redis_url(url)

    # -- one client per event loop --------------------------------------------------------------------------

    def _loop_state(self) -> LoopState:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise BackendError("the Redis tier runs on asyncio only (redis-py's asyncio client); "
                               "it is skipped under other event loops") from None
        state = self._state
        if state is not None and state.loop is loop:
            return state
        # Another loop than the last call's: the library's loop of plain functions and the application's
        # loop take turns in one process. Each keeps its pool; a pool of a loop that has ended is dropped.
        state = self._states.get(loop)
        if state is None:
            self._drop(lambda other: other.is_closed())
            writers = min(MAX_WRITERS, self._kwargs["max_connections"])
            state = self._states[loop] = LoopState(loop, make_client(self._kwargs, cluster=self.cluster),
                                                   max_writers=writers)
        self._state = state
        return state

    def _drop(self, which: Callable[[asyncio.AbstractEventLoop], bool]) -> None:
        """Abandon the pools of the loops ``which`` selects."""
        for loop in [loop for loop in self._states if which(loop)]:
            abandon(self._states.pop(loop))

    def __del__(self) -> None:
        states = getattr(self, "_states", {})
        self._state, self._states = None, {}
        for state in states.values():
            with contextlib.suppress(Exception):
                abandon(state)

    async def aclose(self) -> None:
        """Close the connection pool of the current event loop, and drop those of loops that have ended (a loop
        still running elsewhere keeps its pool until `aclose` is awaited there)."""
        self._state = None
        current = running_asyncio_loop()
        state = None if current is None else self._states.pop(current, None)
        self._drop(lambda other: current is None or other.is_closed())
        if state is None:
            return
        if state.flushes:  # writes being sent: let them finish (each is bounded by its deadlines)
            await asyncio.wait(list(state.flushes))
        for conn in [*state.readers, *state.writers]:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        await close_client(state.client)

    # -- the storage contract -------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the entries under ``keys``; reads of one event-loop tick share one ``MGET``."""
        return await self.get_many_within(keys, self._kwargs["socket_timeout"])

    async def get_many_within(self, keys: Sequence[str], seconds: float) -> list[bytes | None]:
        """Like `get_many`, raising `TimeoutError` after ``seconds`` (auto-pipelined: see `read_many`)."""
        if not keys:
            return []
        return await read_many(self._loop_state(), keys, seconds, cluster=self.cluster)

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store the entries with ``PX`` from their expiry and record them under their tags (see `set_many_within`;
        the socket timeout bounds the wait)."""
        await self.set_many_within(items, self._kwargs["socket_timeout"])

    async def set_many_within(self, items: Sequence[StoreItem], seconds: float) -> None:
        """Store the entries; the writes of one event-loop tick share one ``MULTI`` transaction.

        Auto-pipelined like reads (see `cachelayers.backends.redis.writes`): concurrent writes join the batch
        that is waiting for a write connection, so a burst needs a few transactions, not a connection each.

        Raises:
            BackendBusyError: No write connection was free within ``seconds``; nothing was written.
            TimeoutError: Redis did not answer within ``seconds`` of the transaction being sent.
            BackendError: Redis failed or refused the write.
        """
        if not items:
            return
        await write_many(self._loop_state(), items, self.clock(), seconds, cluster=self.cluster)

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
        async with subscription(self._kwargs, channel) as messages:
            yield messages

    # -- EpochSupport ------------------------------------------------------------------------------------------

    async def bump_epochs(self, key: str, fields: Sequence[str], channel: str, message: bytes) -> int:
        """Take the next sequence number, record it for ``fields`` and publish the message, in one script."""
        client = self._loop_state().client
        seq = await client.eval(_EPOCH_SCRIPT, 1, key, channel, message, *fields)
        return int(seq)

    async def load_epochs(self, key: str, seconds: float | None = None) -> dict[str, int]:
        """``HGETALL`` of the epochs hash, within ``seconds`` of a responsive loop (see `fair_timeout`)."""
        state = self._loop_state()
        raw: dict[bytes, bytes]
        if seconds is None:
            raw = await state.client.hgetall(key)
        else:
            async with fair_timeout(seconds, state.loop):
                raw = await state.client.hgetall(key)
        return {k.decode(): int(v) for k, v in raw.items()}

    # -- LockSupport -------------------------------------------------------------------------------------------

    async def acquire_lock(self, name: str, token: str, lease: float) -> bool:
        """``SET name token NX PX lease``."""
        return await locks.acquire_lock(self._loop_state().client, name, token, lease)

    async def extend_lock(self, name: str, token: str, lease: float) -> bool:
        """Reset the lease if we still hold the lock."""
        return await locks.extend_lock(self._loop_state().client, name, token, lease)

    async def release_lock(self, name: str, token: str, notify: tuple[str, bytes] | None = None) -> bool:
        """Delete the lock if we hold it and publish ``notify``, atomically."""
        return await locks.release_lock(self._loop_state().client, name, token, notify)
