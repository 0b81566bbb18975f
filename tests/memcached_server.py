"""A real memcached process for tests: started on a free loopback port, killed and restarted at will."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from tests.redis_server import free_port

__all__ = ["MemcachedServer", "memcached_available"]


def memcached_available() -> bool:
    """Whether a memcached binary is on PATH."""
    return shutil.which("memcached") is not None


class MemcachedServer:
    """One memcached on 127.0.0.1 (TCP only).

    Args:
        port: Port to listen on; a free one when omitted. Restarts reuse it.
        memory_mb: Item memory in megabytes.
        max_item_size: Largest item memcached accepts (``-I``); 2 MiB so that the contract's 1 MiB blob fits
            with its frame.
    """

    def __init__(self, port: int | None = None, memory_mb: int = 64, max_item_size: str = "2m") -> None:
        self.port = port or free_port()
        self.memory_mb = memory_mb
        self.max_item_size = max_item_size
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``memcached://127.0.0.1:<port>``."""
        return f"memcached://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MemcachedServer:
        """Start the server and wait until it answers ``version``."""
        if self.process is not None and self.process.poll() is None:
            return self
        args = ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", str(self.memory_mb),
                "-I", self.max_item_size, "-t", "2"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root without being told
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"memcached exited with {self.process.returncode} on port {self.port}")
            time.sleep(0.02)
        raise RuntimeError(f"memcached did not answer on port {self.port} within {timeout}s")

    def command(self, line: str) -> bytes:
        """Send one text-protocol command and return the reply: up to ``END`` for commands that list (``get``,
        ``stats``, ``lru_crawler metadump``), else its first line."""
        lists = line.split(" ", 1)[0] in ("get", "gets", "stats", "lru_crawler")
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(line.encode() + b"\r\n")
            reply = b""
            while not (reply.endswith((b"END\r\n", b"ERROR\r\n")) if lists else reply.endswith(b"\r\n")):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def ping(self) -> bool:
        """Whether the server answers now."""
        try:
            return self.command("version").startswith(b"VERSION")
        except OSError:
            return False

    def flush(self) -> None:
        """Drop every item."""
        self.command("flush_all")

    def kill(self) -> None:
        """SIGKILL the server."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def close(self) -> None:
        """Stop the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
