"""Which event loop is running: the helpers every floor shares (asyncio, and trio where a part allows it)."""

from __future__ import annotations

import asyncio

__all__ = ["current_loop_token", "running_asyncio_loop"]


def current_loop_token() -> object:
    """An object that identifies the running event loop: the asyncio loop itself, or the trio run's token.

    It is the same object for every call within one run (compare it with ``is``).

    Raises:
        RuntimeError: No event loop is running.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token()


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio event loop, or ``None`` outside one (or under trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
