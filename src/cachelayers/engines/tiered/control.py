"""Per-call control of cached calls: `bypass` and `refresh` blocks, and the switch the compiled hit path reads.

The hit path of every cached function reads one cell, `WATCHING` (``WATCHING[0]``): zero unless a `bypass`,
`refresh` or `cachelayers.explain` block is open somewhere in the process. Only then does a call leave the
compiled path to look at the context (a context variable read costs more than the whole check, so it is not
done on every hit).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final, Literal

__all__ = ["WATCHING", "Mode", "bypass", "current_mode", "refresh", "report", "set_reporter", "unwatch", "watch"]

Mode = Literal["bypass", "refresh"]

WATCHING: Final[list[int]] = [0]
"""How many `bypass`/`refresh`/explain blocks are open in the process (a one-item list: the hit path keeps the
list in a closure cell and reads item 0)."""

_count_lock: Final = threading.Lock()
_mode: contextvars.ContextVar[Mode | None] = contextvars.ContextVar("cachelayers_cache_mode", default=None)
Reporter = Callable[[str, str, "str | None", str, "str | None"], None]
_reporter: list[Reporter | None] = [None]


def watch() -> None:
    """Count one more open block: calls leave the compiled hit path until `unwatch`."""
    with _count_lock:
        WATCHING[0] += 1


def unwatch() -> None:
    """Count one block less."""
    with _count_lock:
        WATCHING[0] -= 1


@contextmanager
def _block(mode: Mode) -> Iterator[None]:
    token = _mode.set(mode)
    watch()
    try:
        yield
    finally:
        unwatch()
        _mode.reset(token)


def bypass() -> AbstractContextManager[None]:
    """Skip the cache for `multilevel_cached` calls made in this block: they neither read nor store entries.

    The block covers the calls of this task or thread and of tasks it starts (it travels with the context).
    The function runs for every call, exactly as if it were not decorated; the calls are counted in
    ``FunctionCache.bypassed``.

    Returns:
        A context manager (``with cachelayers.bypass(): ...``).
    """
    return _block("bypass")


def refresh() -> AbstractContextManager[None]:
    """Recompute `multilevel_cached` calls made in this block and overwrite their entries in every tier.

    Like `bypass` it covers this task or thread and the tasks it starts. Meanwhile, callers of the same key
    outside the block get the old entry, or, finding none, wait for the refresh (single flight). The calls are
    counted in ``FunctionCache.refreshed``.

    Returns:
        A context manager (``with cachelayers.refresh(): ...``).
    """
    return _block("refresh")



def current_mode() -> Mode | None:
    """``"bypass"`` or ``"refresh"`` inside such a block, else ``None``."""
    return _mode.get()


def set_reporter(reporter: Reporter) -> None:
    """Install what `report` calls (the lookups of `cachelayers.explain` install theirs on import)."""
    _reporter[0] = reporter


def report(function: str, level: str, tier: str | None, partition: str, reason: str | None = None) -> None:
    """Report how an exact call was answered to the open explain block and `last_lookup`, if any listens.

    Args:
        function: The function's identity.
        level: ``"exact"`` (answered from a tier), ``"computed"`` or ``"uncached"`` (bypassed).
        tier: The tier that answered (``"memory"``, a tier name, ``"in-flight"``, ``"stale"``), or ``None``.
        partition: Hex digest of the call's key.
        reason: Why the call was uncached or recomputed, or ``None``.
    """
    reporter = _reporter[0]
    if reporter is not None:
        reporter(function, level, tier, partition, reason)
