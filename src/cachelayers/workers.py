"""Worker threads running native code (usearch graph builds and snapshots) that the interpreter must not cut off.

A thread killed inside usearch at interpreter exit aborts the process (``terminate called without an active
exception``). Such threads are started here, as non-daemon threads, which the interpreter joins at exit. One may
still start after that join, from the daemon thread of the sync decorators' event loop (`cachelayers.engines.sync`);
so at exit, `join_at_exit` also refuses new workers and joins the ones started since. A refused worker is work
that can be skipped: a graph rebuild or an early snapshot.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["join_at_exit", "start_worker"]

_lock = threading.Lock()
_running: set[threading.Thread] = set()
_exiting = False


def start_worker(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread | None:
    """Start ``target(*args)`` in a non-daemon thread joined at exit; ``None`` once the interpreter is exiting."""
    with _lock:
        if _exiting:
            return None
        for done in [t for t in _running if not t.is_alive()]:
            _running.discard(done)
        thread = threading.Thread(target=target, args=args, name=name, daemon=False)
        _running.add(thread)
        thread.start()
        return thread


def join_at_exit() -> None:
    """Refuse new workers and wait for the running ones (registered with `atexit`)."""
    global _exiting
    with _lock:
        _exiting = True
        running = list(_running)
    for thread in running:
        thread.join()


atexit.register(join_at_exit)
