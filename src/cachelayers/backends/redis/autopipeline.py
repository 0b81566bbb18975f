"""Auto-pipelined reads of the Redis tier: the reads of one event-loop tick go to Redis as one ``MGET``.

One `LoopState` per backend and event loop holds the client, the idle read connections and the open read
batch. A batch is sent on a connection of its own, its reply parsed in bulk (`mget_on`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

from cachelayers.errors import BackendError
from cachelayers.loops import running_asyncio_loop

__all__ = ["MAX_READERS", "FairTimer", "LoopState", "ProtocolError", "ReadBatch", "Redo", "ReplyDeadline", "abandon",
           "connect_within", "fair_timeout", "mget_on", "pack_mget", "read_many", "send_mget"]

MAX_READERS: Final = 16  # dedicated read connections per event loop; more batches in flight use the pool


def pack_mget(keys: Sequence[str]) -> bytes:
    parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
    for key in keys:
        raw = key.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class ProtocolError(ConnectionError):
    """The reply was not what MGET answers: the connection is dropped."""


class ReplyDeadline:
    """Fails ``reader`` with `TimeoutError` once Redis has made no progress for ``seconds``: no byte of the
    reply arrived and none of the request left the write buffer.

    Under a burst the event loop can be busy with thousands of callers for longer than the tier timeout and
    run a plain timer before the reply that came in time: a healthy tier would be counted as failing (and its
    breaker opened). When this one fires it looks for progress — bytes the parser took (`got`), bytes waiting
    in the stream's buffer, request bytes sent since — and re-arms if there was any, so only a server that
    stalls (hung, unreachable) times out, ``seconds`` after its last sign of life.
    """

    __slots__ = ("got", "handle", "loop", "reader", "seconds", "seen", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader,
                 transport: asyncio.BaseTransport, seconds: float) -> None:
        self.loop = loop
        self.reader = reader
        self.transport = transport
        self.seconds = seconds
        self.got = 0
        """Bytes of the reply the parser has taken from the stream."""
        self.seen = self._progress()
        self.handle = loop.call_later(seconds, self._check)

    def _progress(self) -> int:
        buffered = len(getattr(self.reader, "_buffer", b""))
        unsent = self.transport.get_write_buffer_size() if isinstance(self.transport, asyncio.WriteTransport) else 0
        return self.got + buffered - unsent

    def _check(self) -> None:
        progress = self._progress()
        if progress != self.seen:
            self.seen = progress
            self.handle = self.loop.call_later(self.seconds, self._check)
        else:
            self.reader.set_exception(TimeoutError(f"Redis did not answer within {self.seconds:g}s"))

    def cancel(self) -> None:
        """Stop watching (the reply is in, or the request failed)."""
        self.handle.cancel()


async def mget_on(conn: Any, keys: Sequence[str], seconds: float,
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
    writer.write(pack_mget(keys))  # not drained: the reply cannot come before the request is sent
    # The deadline fails the stream itself: cheaper than a cancel scope, and the connection is dropped after.
    deadline = ReplyDeadline(loop, reader, writer.transport, seconds)
    try:
        head = await reader.readuntil(b"\r\n")
        deadline.got += len(head)
        if head[:1] == b"-":
            from redis.exceptions import ResponseError

            raise ResponseError(head[1:-2].decode(errors="replace"))
        if head[:1] != b"*":
            raise ProtocolError(f"unexpected reply to MGET: {head[:40]!r}")
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
                deadline.got += len(more)
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
                    deadline.got += len(more)
                    buf += more
                append(buf[start:stop])
                pos = stop + 2
            elif tag == 95:  # _ : RESP3 null
                append(None)
                pos = end + 2
            else:
                raise ProtocolError(f"unexpected element in an MGET reply: {buf[pos:pos + 20]!r}")
        if pos != len(buf):
            raise ProtocolError("bytes after the MGET reply")  # never trust this connection again
        return values
    finally:
        deadline.cancel()


class FairTimer:
    """Calls ``expire`` once the event loop has been responsive for ``seconds``: time the loop was too busy to
    run its timers (an iteration running late by a `STEP` or more, as under a burst of callers) is not counted.

    For the connection handshake, which runs inside redis-py and shows no progress to watch (see
    `ReplyDeadline` for replies): on a responsive loop it fires after ``seconds``; while thousands of callers
    hold the loop, it waits for the loop to have had time to notice the answer.
    """

    STEP: Final = 0.01

    __slots__ = ("due", "expire", "handle", "left", "loop", "since")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, expire: Callable[[], object]) -> None:
        self.loop = loop
        self.expire = expire
        self.left = seconds
        self.since = loop.time()
        self.due = self.since + min(self.STEP, seconds)
        self.handle = loop.call_at(self.due, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        # An interval counts fully when the timer ran on time, only as far as it was due (plus a step) when late.
        self.left -= min(now - self.since, self.due - self.since + self.STEP)
        if self.left <= 0:
            self.expire()
            return
        self.since = now
        self.due = now + min(self.STEP, self.left)
        self.handle = self.loop.call_at(self.due, self._tick)

    def cancel(self) -> None:
        """Stop counting."""
        self.handle.cancel()


@contextlib.asynccontextmanager
async def fair_timeout(seconds: float, loop: asyncio.AbstractEventLoop) -> AsyncIterator[None]:
    """Like ``asyncio.timeout(seconds)``, counting only time the loop was responsive (see `FairTimer`)."""
    async with asyncio.timeout(None) as scope:
        timer = FairTimer(loop, seconds, lambda: scope.reschedule(loop.time()))
        try:
            yield
        finally:
            timer.cancel()


async def connect_within(conn: Any, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
    """Connect a redis-py connection, raising `TimeoutError` once the loop was responsive for ``seconds``."""
    async with fair_timeout(seconds, loop):
        await conn.connect()


class Redo(Exception):
    """The caller that was sending a read batch was cancelled: its followers send their keys again."""


class ReadBatch:
    """Reads issued in one event-loop tick, sent together as one ``MGET`` by the first of them."""

    __slots__ = ("keys", "waiters")

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys: list[str] = list(keys)
        self.waiters: list[tuple[int, asyncio.Future[list[bytes | None]]]] = []


class LoopState:
    """What the backend holds for one event loop: the client (and its pool), idle read connections, the open
    read batch; for writes (see `writes`), idle write connections, the slots that bound them, the open write
    batch and the tasks sending write batches."""

    __slots__ = ("batch", "client", "crowded", "flushes", "in_flight", "loop", "readers", "write_batch",
                 "write_slots", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any, *, max_writers: int = 1) -> None:
        self.loop = loop
        self.client = client
        self.batch: ReadBatch | None = None
        self.readers: list[Any] = []
        self.in_flight = 0  # read batches being sent or awaited
        self.crowded = False  # whether the last batch had more than one caller
        self.write_batch: Any = None  # the open `writes.WriteBatch`, if any
        self.writers: list[Any] = []
        self.write_slots = asyncio.Semaphore(max_writers)  # write batches sent at once
        self.flushes: set[asyncio.Task[None]] = set()


async def read_many(state: LoopState, keys: Sequence[str], seconds: float, *, cluster: bool) -> list[bytes | None]:
    """Read ``keys`` (not empty) in the open batch of ``state``, or open one; `TimeoutError` after ``seconds``.

    Auto-pipelining: the first read of a tick opens a batch; every read issued while it is open joins it,
    and the first sends them all as one ``MGET`` on a connection of its own and hands each its share. It
    yields once to let the tick's reads join only when other reads are in flight (or the last batch had
    company): a lone caller pays no extra event-loop turn. If the sending caller is cancelled, the others
    send again; if it fails or times out, they fail with it.
    """
    while True:
        batch = state.batch
        if batch is None:
            break
        future: asyncio.Future[list[bytes | None]] = state.loop.create_future()
        batch.keys.extend(keys)
        batch.waiters.append((len(keys), future))
        try:
            return await future
        except Redo:
            continue
    batch = state.batch = ReadBatch(keys)
    state.in_flight += 1
    try:
        try:
            if state.in_flight > 1 or state.crowded:
                await asyncio.sleep(0)  # let the reads of this tick join
        finally:
            if state.batch is batch:
                state.batch = None
        state.crowded = bool(batch.waiters)
        values = await send_mget(state, batch.keys, seconds, cluster=cluster)
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
                future.set_exception(Redo())
        raise
    finally:
        state.in_flight -= 1
    start = len(keys)
    for count, future in batch.waiters:
        if not future.done():
            future.set_result(values[start:start + count])
        start += count
    return values[:len(keys)]


async def send_mget(state: LoopState, keys: list[str], seconds: float, *, cluster: bool) -> list[bytes | None]:
    """Send one ``MGET`` of ``keys`` (on a cluster, redis-py's non-atomic MGET), within ``seconds``."""
    if cluster:
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
                    await connect_within(conn, seconds, state.loop)
                values = await mget_on(conn, keys, seconds, state.loop)
            except (RedisConnectionError, ConnectionError, asyncio.IncompleteReadError) as exc:
                await conn.disconnect(nowait=True)
                if fresh or attempt:
                    raise BackendError(f"{type(exc).__name__}: {exc}") from exc
                continue  # a pooled connection that died with a restarted server: one more try, reconnected
            reusable = True
            return values
        raise AssertionError("unreachable")
    finally:
        if reusable and len(state.readers) < MAX_READERS:
            state.readers.append(conn)
        else:
            # A reply may still be on its way: this connection can never be trusted again.
            await conn.disconnect(nowait=True)


def abandon(state: LoopState) -> None:
    """Drop the client of an event loop we no longer use, closing its sockets the way that loop allows.

    A pool is bound to the loop it was made in. When that loop has ended (``asyncio.run`` returned) its
    transports can no longer be closed through it, so the sockets are closed directly; otherwise the
    transports are closed in their own loop.
    """
    pool = getattr(state.client, "connection_pool", None)
    connections = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ()),
                   *state.readers, *state.writers]
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
    state.writers.clear()
