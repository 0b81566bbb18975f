"""The invalidation channel: one pub/sub subscription per event loop that keeps memory tiers in step.

Messages are msgpack ``[sender, kind, items]`` on ``<prefix>~events`` (signed with ``Settings.secret``:
see `events`), with kind ``"k"`` (storage keys), ``"t"`` (tags), ``"c"`` (clear) or ``"l"`` (a lock was
released). Refused messages are counted and never applied; other processes' clears are coalesced. An
invalidation published with its epoch (see `epochs`) is prefixed with ``#<sequence number>:``; they arrive
in sequence order.

Once subscribed, the listener loads the epochs (messages published meanwhile wait on the subscription) and
only then calls itself subscribed. When the subscription is lost the memory tier is cleared at once and again
when it is back (messages may have been missed in between), and the epochs are loaded again.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final, Protocol, cast

import anyio

from cachelayers import audit
from cachelayers.backends.base import EpochSupport, LocalTier, PubSubSupport
from cachelayers.engines.background import BackgroundTasks
from cachelayers.engines.tiered.epochs import Epochs, Invalidations, fields_of
from cachelayers.engines.tiered.events import ClearGate, Events
from cachelayers.engines.tiered.tier import Tier
from cachelayers.loops import current_loop_token, loop_alive
from cachelayers.metrics import StateLog

__all__ = ["Listener", "ListenerHost"]

LISTEN_MAX_BACKOFF: Final = 5.0


class ListenerHost(Protocol):
    """What a `Listener` needs of the engine it serves (a `TieredCache`)."""

    background: BackgroundTasks
    channel: str
    log: StateLog
    sender: bytes
    epochs: Epochs | None
    invalidations: Invalidations
    events: Events
    clears: ClearGate

    @property
    def local(self) -> LocalTier | None:
        """The memory tier, if there is one."""

    def invalidated(self, kind: str, items: list[str]) -> None:
        """Apply an invalidation to the memory tier."""


class Listener:
    """Follows the invalidation channel of a `PubSubSupport` tier, one subscription per event loop.

    It drops from this process's memory tier what other processes invalidated, and wakes callers waiting for
    a distributed lock. Entries stored in memory before the subscription was active are dropped when it
    becomes active; after a lost subscription the whole memory tier is, since messages may have been missed.
    """

    __slots__ = ("backend", "cache", "loop", "lost", "ready", "subscribed", "tier", "unsynced", "waiters")

    def __init__(self, cache: ListenerHost, tier: Tier) -> None:
        self.cache = cache
        self.tier = tier
        self.backend = cast(PubSubSupport, tier.backend)
        self.loop: object | None = None
        self.subscribed = False
        self.lost = False
        self.ready: anyio.Event | None = None
        self.unsynced: set[Hashable] = set()
        self.waiters: dict[str, anyio.Event] = {}

    async def start(self) -> None:
        """Start listening in the current event loop, waiting (up to the tier timeout) until subscribed."""
        token = current_loop_token()
        if self.loop is token:
            ready = self.ready  # started by another caller: wait as it does, or this caller's entries are dropped
            if not self.subscribed and ready is not None and not ready.is_set():
                with anyio.move_on_after(self.tier.timeout):
                    await ready.wait()
            return
        self.loop = token
        self.subscribed = False
        self.lost = False
        if self.cache.epochs is not None:
            self.cache.epochs.ready = False  # loaded in another run: load them again before relying on them
        self.waiters = {}
        ready = self.ready = anyio.Event()
        self.cache.background.start_soon(self._run, token)
        with anyio.move_on_after(self.tier.timeout):
            await ready.wait()

    async def follow(self) -> None:
        """Make sure the channel is heard: start listening in this loop, unless the listener runs (or retries)
        in another loop that is still running, such as the library's loop of the plain functions, or the
        application's. One subscription per process: moving it at every call from the other loop would leave
        the old one open each time."""
        token = current_loop_token()
        if self.loop is token:
            if not self.subscribed:
                await self.start()
        elif self.loop is None or not loop_alive(self.loop):
            await self.start()

    def here(self) -> bool:
        """Whether the channel is heard in the running loop (its events can be awaited here)."""
        return self.subscribed and self.loop is current_loop_token()

    def stop(self) -> None:
        """Forget the subscription (the engine is closing)."""
        self.loop = None
        self.subscribed = False
        if self.cache.epochs is not None:
            self.cache.epochs.ready = False

    def waiter(self, lock_name: str) -> anyio.Event:
        """An event set when a release of ``lock_name`` is announced."""
        event = self.waiters.get(lock_name)
        if event is None or event.is_set():
            event = self.waiters[lock_name] = anyio.Event()
        return event

    async def _run(self, token: object) -> None:
        what = f"invalidation channel on {self.tier.name!r}"
        backoff = 0.05
        try:
            while self.loop is token:
                try:
                    async with self.backend.subscribe(self.cache.channel) as messages:
                        await self._load_epochs()
                        self._on_subscribed()
                        self.cache.log.recovered(what)
                        backoff = 0.05
                        async for message in messages:
                            self._on_message(message)
                except Exception as exc:
                    self.cache.log.failure(what, exc)
                    if self.ready is not None:
                        self.ready.set()  # whoever waits in start() goes on without: entries stay unsynced
                self._unsubscribed()
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_MAX_BACKOFF)
        finally:  # also when cancelled, as when the event loop it ran in ends: a later run must start again
            if self.loop is token:
                self.loop = None
                self._unsubscribed()

    def _unsubscribed(self) -> None:
        if self.subscribed:
            self.subscribed = False
            self.lost = True
            self.cache.invalidated("c", [])  # what was missed from here on is not known: drop it all now
        if self.cache.epochs is not None:
            self.cache.epochs.ready = False

    async def _load_epochs(self) -> None:
        epochs = self.cache.epochs
        if epochs is None:
            return
        tier = self.tier
        key = self.cache.invalidations.hash_key
        backend = tier.backend
        assert isinstance(backend, EpochSupport)

        async def load() -> dict[str, int] | None:
            return await backend.load_epochs(key, tier.timeout)  # a crowded loop is not a silent Redis

        table = await tier.call(load, None, scoped=False, write=False)
        if table is None:
            raise ConnectionError(f"loading the invalidation epochs from tier {tier.name!r} failed")
        epochs.loaded(table)
        if self.cache.invalidations.outbox:  # what this process could not invalidate: now is a good time
            self.cache.background.start_soon(self.cache.invalidations.replay)

    def _on_subscribed(self) -> None:
        cache = self.cache
        if self.lost:
            cache.invalidated("c", [])  # messages may have been missed while disconnected
        elif cache.local is not None:
            for key in self.unsynced:
                cache.local.remove(key)
        self.unsynced.clear()
        self.lost = False
        self.subscribed = True
        if self.ready is not None:
            self.ready.set()

    def _on_message(self, data: bytes) -> None:
        seq = 0
        events = self.cache.events
        try:
            if data[:1] == b"#":
                head, _, data = data.partition(b":")
                seq = int(head[1:])
            opened = events.open(data)
        except Exception as exc:
            self.cache.log.failure("decoding invalidation messages", exc)
            return
        if opened is None:  # unsigned, forged, expired or replayed (with a secret): counted, never applied
            dropped = events.stats.events_dropped
            self.cache.log.failure("authenticating invalidation messages", f"{dropped} refused so far")
            audit.integrity_failure("channel", self.cache.channel, reason="invalidation message refused",
                                    count=dropped)
            return
        sender, kind, items = opened
        epochs = self.cache.epochs
        if seq and epochs is not None and kind in ("k", "t", "c"):
            epochs.heard(seq, fields_of(kind, items))  # before the memory tier drops them: see `Epochs`
        if sender == self.cache.sender:
            return
        if kind == "l":
            event = self.waiters.pop(items, None)
            if event is not None:
                event.set()
        elif kind == "c":
            self.cache.clears.clear()
        elif kind in ("k", "t"):
            self.cache.invalidated(kind, items)
