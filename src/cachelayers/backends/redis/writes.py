"""Coalesced writes of the Redis tier: the writes of one event-loop tick go to Redis as one transaction.

The first write of a tick opens a `WriteBatch` and starts a task that sends it; every write issued while the
batch is open joins it. The batch stays open until its task holds one of the loop's write slots (at most
`MAX_WRITERS` batches in flight per event loop, each on a connection of its own), so under a burst the writes
that arrive meanwhile join the waiting batch instead of each waiting for a connection: 10,000 concurrent
writes are a handful of transactions on a handful of connections. A batch takes new entries until it holds
`MAX_BATCH`; the next write opens another.

A batch is sent as ``SCRIPT LOAD`` (when an entry has tags), ``MULTI``, each entry's ``SET ... PX`` and tag
updates, ``EXEC``, written at once and its replies parsed in bulk; an entry and its tag memberships appear
together. Each caller waits for its own entries: a caller whose command failed gets the error, the others
succeed. The sending runs in a task of its own, so a caller that is cancelled does not take the batch with it.

Deadlines, both ``seconds`` (the engine's tier timeout), counted so that a busy event loop does not pass for a
slow Redis (see `FairTimer` and `ReplyDeadline`): a batch waits for a write slot up to ``seconds``, then its
callers get `BackendBusyError` (the tier is congested, not failing, and nothing was written); once sent, Redis
has ``seconds`` without progress before they get `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from typing import Any, Final

from cachelayers.backends.base import BackendBusyError, StoreItem
from cachelayers.backends.redis.autopipeline import (
    LoopState,
    ProtocolError,
    ReplyDeadline,
    connect_within,
    fair_timeout,
)
from cachelayers.errors import BackendError

__all__ = ["MAX_BATCH", "MAX_WRITERS", "TAG_SCRIPT", "WriteBatch", "exec_on", "flush", "item_commands", "pack_batch",
           "send_pipeline", "send_writes", "write_many"]

MAX_WRITERS: Final = 4  # write batches in flight per event loop (fewer if max_connections is lower)
MAX_BATCH: Final = 4096  # entries a write batch takes before the next write opens another

# Adds an entry to a tag's set and keeps the set alive as long as its longest-lived member: a new set takes
# the entry's TTL, an existing one is only ever extended, and an entry that never expires makes it persistent.
# It touches one key, so it is valid on a cluster too.
TAG_SCRIPT: Final = """
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
_SCRIPT: Final = TAG_SCRIPT.encode()
_SHA: Final = hashlib.sha1(_SCRIPT).hexdigest().encode()
_MULTI: Final = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC: Final = b"*1\r\n$4\r\nEXEC\r\n"

Command = tuple[bytes, ...]
"""A command as sent: its name and arguments, as bytes."""


def item_commands(item: StoreItem, now: float) -> list[Command]:
    """The commands that store ``item`` at wall-clock time ``now``: ``SET`` with ``PX`` from its expiry and one
    tag-script call per tag; ``UNLINK`` for an entry already expired (drop an older copy, store no dead one)."""
    key = item.key.encode()
    if item.expires_at is None:
        ms = b"-1"
        commands: list[Command] = [(b"SET", key, item.blob)]
    else:
        left = math.ceil((item.expires_at - now) * 1000)
        if left <= 0:
            return [(b"UNLINK", key)]
        ms = b"%d" % left
        commands = [(b"SET", key, item.blob, b"PX", ms)]
    for tag in item.tags:
        commands.append((b"EVALSHA", _SHA, b"1", tag.encode(), key, ms))
    return commands


class WriteBatch:
    """Writes issued while it is open, sent together as one transaction by the task `flush`."""

    __slots__ = ("commands", "entries", "owners", "seconds", "tagged", "waiters")

    def __init__(self, seconds: float) -> None:
        self.commands: list[Command] = []
        self.owners: list[int] = []
        """The index in `waiters` of the caller of each command."""
        self.waiters: list[asyncio.Future[None]] = []
        self.seconds = seconds
        self.entries = 0
        self.tagged = False

    def add(self, items: Sequence[StoreItem], now: float, future: asyncio.Future[None]) -> None:
        """Take the commands of ``items``; ``future`` is settled when they are done."""
        owner = len(self.waiters)
        self.waiters.append(future)
        commands = self.commands
        before = len(commands)
        for item in items:
            commands.extend(item_commands(item, now))
            self.tagged = self.tagged or bool(item.tags)
        self.owners.extend([owner] * (len(commands) - before))
        self.entries += len(items)


async def write_many(state: LoopState, items: Sequence[StoreItem], now: float, seconds: float, *,
                     cluster: bool) -> None:
    """Store ``items`` (not empty) in the open write batch of ``state``, or open one; see the module."""
    loop = state.loop
    batch = state.write_batch
    if batch is None or batch.entries >= MAX_BATCH:
        batch = state.write_batch = WriteBatch(seconds)
        task = loop.create_task(flush(state, batch, cluster=cluster))
        state.flushes.add(task)
        task.add_done_callback(state.flushes.discard)
    future: asyncio.Future[None] = loop.create_future()
    batch.add(items, now, future)
    await future


async def flush(state: LoopState, batch: WriteBatch, *, cluster: bool) -> None:
    """Wait for a write slot (the batch stays open meanwhile), send the batch and settle its callers."""
    failed: dict[int, BaseException] = {}
    error: BaseException | None = None
    try:
        try:
            async with fair_timeout(batch.seconds, state.loop):
                await state.write_slots.acquire()
        except TimeoutError:
            raise BackendBusyError(f"no Redis write connection free within {batch.seconds:g}s "
                                   f"({batch.entries} entries not written)") from None
        finally:
            if state.write_batch is batch:
                state.write_batch = None
        try:
            if cluster:
                failed = await send_pipeline(state, batch, transaction=False)
            else:
                failed = await send_writes(state, batch)
        finally:
            state.write_slots.release()
    except Exception as exc:
        error = exc
    except BaseException:
        _settle(batch, {}, BackendError("the Redis write was cancelled"))
        raise
    _settle(batch, failed, error)


def _settle(batch: WriteBatch, failed: dict[int, BaseException], error: BaseException | None) -> None:
    """Hand each caller still waiting its outcome: ``error`` (the batch failed), its own failure, or done."""
    for index, future in enumerate(batch.waiters):
        if future.done():  # the caller was cancelled
            continue
        exc = error if error is not None else failed.get(index)
        if exc is None:
            future.set_result(None)
            continue
        if isinstance(exc, (TimeoutError, BackendBusyError)):
            own: BaseException = type(exc)(*exc.args)
        else:
            own = BackendError(f"{type(exc).__name__}: {exc}")
        own.__cause__ = exc
        future.set_exception(own)


def _pack(command: Command) -> bytes:
    return b"*%d\r\n" % len(command) + b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in command])


def pack_batch(batch: WriteBatch) -> bytes:
    """The bytes of the batch's transaction: ``SCRIPT LOAD`` when it has tags, ``MULTI``, commands, ``EXEC``."""
    parts = [_pack((b"SCRIPT", b"LOAD", _SCRIPT))] if batch.tagged else []
    parts.append(_MULTI)
    parts.extend([_pack(command) for command in batch.commands])
    parts.append(_EXEC)
    return b"".join(parts)


class _Lines:
    """Reply lines read from a stream in chunks. Every reply a write batch gets is one line, but for the
    ``SCRIPT LOAD`` reply (two)."""

    __slots__ = ("buf", "deadline", "pos", "reader")

    def __init__(self, reader: asyncio.StreamReader, deadline: ReplyDeadline) -> None:
        self.reader = reader
        self.deadline = deadline
        self.buf = b""
        self.pos = 0

    def take(self) -> bytes | None:
        """The next line if it has fully arrived, else ``None``."""
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            return None
        line = self.buf[self.pos:end]
        self.pos = end + 2
        return line

    async def next(self) -> bytes:
        """The next line, read from the stream if needed."""
        while True:
            line = self.take()
            if line is not None:
                return line
            more = await self.reader.read(1 << 16)
            if not more:
                raise asyncio.IncompleteReadError(self.buf[self.pos:], None)
            self.deadline.got += len(more)
            self.buf = self.buf[self.pos:] + more
            self.pos = 0


async def exec_on(conn: Any, payload: bytes, batch: WriteBatch,
                  loop: asyncio.AbstractEventLoop) -> dict[int, BaseException]:
    """Send the batch's transaction on a connected redis-py connection and read its replies, failing with
    `TimeoutError` when Redis makes no progress for ``batch.seconds`` (see `ReplyDeadline`).

    Returns the failure of each caller one of whose commands failed, by index in `WriteBatch.waiters`.
    Raises `ResponseError` when the transaction was refused as a whole (nothing was written).
    """
    reader: asyncio.StreamReader = conn._reader
    writer: asyncio.StreamWriter = conn._writer
    writer.write(payload)  # not drained: the replies cannot come before the request is sent
    deadline = ReplyDeadline(loop, reader, writer.transport, batch.seconds)
    try:
        return await _read_replies(_Lines(reader, deadline), batch)
    finally:
        deadline.cancel()


async def _read_replies(lines: _Lines, batch: WriteBatch) -> dict[int, BaseException]:
    from redis.exceptions import ResponseError

    if batch.tagged:
        head = await lines.next()
        if head[:1] == b"-":
            raise ResponseError(head[1:].decode(errors="replace"))
        if head[:1] != b"$":
            raise ProtocolError(f"unexpected reply to SCRIPT LOAD: {head[:40]!r}")
        await lines.next()
    head = await lines.next()
    if head != b"+OK":
        raise ProtocolError(f"unexpected reply to MULTI: {head[:40]!r}")
    count = len(batch.commands)
    for _ in range(count):  # +QUEUED, or an error that makes EXEC refuse the transaction
        line = lines.take()
        if line is None:
            line = await lines.next()
        if line[:1] not in (b"+", b"-"):
            raise ProtocolError(f"unexpected reply to a queued command: {line[:40]!r}")
    head = await lines.next()
    if head[:1] == b"-":
        raise ResponseError(head[1:].decode(errors="replace"))
    if head != b"*%d" % count:
        raise ProtocolError(f"unexpected reply to EXEC: {head[:40]!r}")
    failed: dict[int, BaseException] = {}
    owners = batch.owners
    for index in range(count):
        line = lines.take()
        if line is None:
            line = await lines.next()
        tag = line[:1]
        if tag == b"-":
            failed.setdefault(owners[index], ResponseError(line[1:].decode(errors="replace")))
        elif tag not in (b"+", b":"):
            raise ProtocolError(f"unexpected element in an EXEC reply: {line[:40]!r}")
    if lines.pos != len(lines.buf):
        raise ProtocolError("bytes after the EXEC reply")  # never trust this connection again
    return failed


async def send_writes(state: LoopState, batch: WriteBatch) -> dict[int, BaseException]:
    """Send the batch on a write connection of the loop (connecting within ``batch.seconds``).

    A connection of our own, as for reads: the transaction's replies are parsed in bulk, which for thousands
    of entries is most of what redis-py's pipeline would cost. A pooled connection that died with a restarted
    server is replaced once (resending is harmless: every command of a batch is idempotent).
    """
    from redis.exceptions import ConnectionError as RedisConnectionError

    conn = state.writers.pop() if state.writers else state.client.connection_pool.make_connection()
    if not hasattr(conn, "_reader"):  # a connection without asyncio streams: redis-py's own pipeline then
        return await send_pipeline(state, batch, transaction=True)
    payload = pack_batch(batch)
    reusable = False
    try:
        for attempt in range(2):
            fresh = not conn.is_connected
            try:
                if fresh:
                    await connect_within(conn, batch.seconds, state.loop)
                failed = await exec_on(conn, payload, batch, state.loop)
            except (RedisConnectionError, ConnectionError, asyncio.IncompleteReadError) as exc:
                await conn.disconnect(nowait=True)
                if fresh or attempt:
                    raise BackendError(f"{type(exc).__name__}: {exc}") from exc
                continue
            reusable = True
            return failed
        raise AssertionError("unreachable")
    finally:
        if reusable and len(state.writers) < MAX_WRITERS:
            state.writers.append(conn)
        else:
            # A reply may still be on its way: this connection can never be trusted again.
            await conn.disconnect(nowait=True)


async def send_pipeline(state: LoopState, batch: WriteBatch, *, transaction: bool) -> dict[int, BaseException]:
    """Send the batch through redis-py's pipeline (a cluster's, which routes each key to its node), within
    ``batch.seconds``. Returns the failure of each caller one of whose commands failed."""
    pipe = state.client.pipeline(transaction=transaction)
    for command in batch.commands:
        if command[0] == b"EVALSHA":  # the script is loaded on no particular node: send it whole
            pipe.execute_command("EVAL", TAG_SCRIPT, *command[2:])
        else:
            pipe.execute_command(command[0].decode(), *command[1:])
    async with asyncio.timeout(batch.seconds):
        replies = await pipe.execute(raise_on_error=False)
    failed: dict[int, BaseException] = {}
    for index, reply in enumerate(replies):
        if isinstance(reply, Exception):
            failed.setdefault(batch.owners[index], reply)
    return failed
