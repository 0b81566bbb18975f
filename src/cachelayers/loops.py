"""Which event loop is running: the helpers every floor shares (asyncio, and trio where a part allows it)."""

from __future__ import annotations

import asyncio

__all__ = ["current_loop_token", "loop_alive", "running_asyncio_loop"]


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


def loop_alive(token: object) -> bool:
    """Whether the event loop ``token`` (from `current_loop_token`) is running now, in this or another thread:
    an asyncio loop that runs, a trio run that has not finished."""
    if isinstance(token, asyncio.AbstractEventLoop):
        return token.is_running() and not token.is_closed()
    try:
        token.run_sync_soon(lambda: None)  # type: ignore[attr-defined]
    except Exception:  # trio.RunFinishedError: the run is over
        return False
    return True
