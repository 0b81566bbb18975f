"""A TCP proxy for tests that can cut a process off its server by resetting its connections.

It runs an asyncio server on a loopback port in a thread of its own and relays bytes to the target port.
`ResettingProxy.cut` resets (RST) every relayed connection and every new one until `ResettingProxy.restore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading

from tests.redis_server import free_port

__all__ = ["ResettingProxy"]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ResettingProxy:
    """Relays ``127.0.0.1:<port>`` to ``127.0.0.1:<target>``, resetting every connection while cut.

    Args:
        target: The port of the server behind it.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.cutting = False
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resetting-proxy", daemon=True)
        self._thread.start()
        self._started.wait(10)

    @property
    def url(self) -> str:
        """A Redis URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # aborted transports close their sockets on later turns of the loop

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.cutting:
                _reset(writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                _reset(writer)
                return
            pair = (writer, up_writer)
            self._pairs.add(pair)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                self._pairs.discard(pair)
        finally:
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    def cut(self) -> None:
        """Reset every relayed connection now, and every new one until `restore`."""
        self.cutting = True
        done = threading.Event()

        def reset_all() -> None:
            for client, upstream in list(self._pairs):
                _reset(client)
                upstream.transport.abort()
            done.set()

        self._loop.call_soon_threadsafe(reset_all)
        done.wait(10)

    def restore(self) -> None:
        """Relay new connections again."""
        self.cutting = False

    def close(self) -> None:
        """Stop the proxy."""
        self.cut()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
