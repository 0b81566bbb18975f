"""Per-call control of cached calls: `bypass` and `refresh` blocks, and the switch the compiled hit path reads.

`WATCHING` (``WATCHING[0]``) counts the `bypass`, `refresh` and `cachelayers.explain` blocks open in the
process. When it leaves or returns to zero, the callbacks given to `on_switch` are told, and each cached
function's callers switch between its compiled hit path, which checks nothing, and the path's *watched*
twin, which reads the context (a context variable read costs more than a whole memory hit, so the hit path
never does it). While access sampling is on (``Settings.audit_sample_rate`` > 0) the switch counts as one
more open block, so the sampled records cost nothing when it is off.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final, Literal

from cachelayers import audit

__all__ = ["WATCHING", "Mode", "Trace", "bypass", "current_mode", "on_switch", "only_sampling", "refresh", "report",
           "set_reporter", "switch_now", "unwatch", "watch"]

Mode = Literal["bypass", "refresh"]

WATCHING: Final[list[int]] = [0]
"""How many `bypass`/`refresh`/explain blocks are open in the process (a one-item list: the hit path keeps the
list in a closure cell and reads item 0)."""

_count_lock: Final = threading.Lock()
_mode: contextvars.ContextVar[Mode | None] = contextvars.ContextVar("cachelayers_cache_mode", default=None)
Reporter = Callable[[str, str, "str | None", str, "str | None"], None]
_reporter: list[Reporter | None] = [None]
_switches: list[Callable[[bool], None]] = []


def on_switch(callback: Callable[[bool], None]) -> None:
    """Call ``callback(True)`` when the first block opens in the process, ``callback(False)`` when the last
    one closes (under a lock: blocks opened meanwhile wait)."""
    _switches.append(callback)


def switch_now(callback: Callable[[bool], None]) -> None:
    """Call ``callback`` with whether a block is open now (under the lock that `on_switch` callbacks run
    under, so that a function made meanwhile misses no switch)."""
    with _count_lock:
        callback(WATCHING[0] > 0)


def watch() -> None:
    """Count one more open block: calls leave the compiled hit path until `unwatch`."""
    with _count_lock:
        WATCHING[0] += 1
        if WATCHING[0] == 1:
            for switch in _switches:
                switch(True)


def unwatch() -> None:
    """Count one block less."""
    with _count_lock:
        WATCHING[0] -= 1
        if WATCHING[0] == 0:
            for switch in _switches:
                switch(False)


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


def only_sampling() -> bool:
    """Whether access sampling is the one reason calls are watched (no block open anywhere): then a call
    not drawn for a record can skip reporting altogether."""
    return WATCHING[0] == 1 and audit.SAMPLING[0] > 0


def _sampling(on: bool) -> None:
    (watch if on else unwatch)()


audit.on_sampling(_sampling)


class Trace:
    """Reports how one call under a control block was answered (see `report`), as soon as that is known, and
    makes its sampled access record (`audit.access`) when sampling is on."""

    __slots__ = ("digest", "identity", "mode", "namespace")

    def __init__(self, identity: str, digest: str, mode: Mode | None, namespace: str | None = None) -> None:
        """``namespace``: the function's, when the call was drawn for an access record (`audit.sampled`)."""
        self.identity, self.digest, self.mode, self.namespace = identity, digest, mode, namespace

    def hit(self, tier: str) -> None:
        """A tier answered."""
        report(self.identity, "exact", tier, self.digest)
        if self.namespace is not None:
            audit.access(self.namespace, tier, "multilevel_cached", function=self.identity, tier=tier)

    def computing(self) -> None:
        """The function runs now (before it does, so that lookups of calls it makes come after this one)."""
        level = "uncached" if self.mode == "bypass" else "computed"
        report(self.identity, level, None, self.digest, self.mode)
        if self.namespace is not None:
            audit.access(self.namespace, level, "multilevel_cached", function=self.identity)
