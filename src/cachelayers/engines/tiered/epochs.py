"""Invalidations that are never silently lost: epochs every process checks entries against, and an outbox.

An invalidation goes to every tier below memory (deleting what it covers) and, with a tier that has
`EpochSupport` (Redis), also takes a sequence number there, recorded for its *fields* and published on the
invalidation channel in the same atomic step. A field is what an invalidation covers: ``"c"`` (everything),
``"n:<namespace>"`` (a namespace tag), ``"t:<slot>"`` (a user tag, hashed to one of `SLOTS` slots) or
``"k:<slot>"`` (a storage key, likewise). Every entry written to the tiers below memory carries a *stamp*:
the last sequence number its writer had heard. An entry read from a tier below memory is refused (a miss)
when one of its fields was invalidated after its stamp, so neither an entry whose deletion did not land nor
old bytes written back later (a replay) is served again. Two tags (or keys) sharing a slot only cost an
extra miss, never a wrong value. The memory tier is not checked (its hits cost nothing more): its entries
are dropped by the channel's messages, and all of them when the channel was lost.

Whatever did not land within the tier timeout is queued in the `Invalidations` outbox and replayed in the
background until it lands (and, without epochs, before the tier is read again); the call raises
`InvalidationError`. Meanwhile this process refuses lower-tier entries of the fields it could not invalidate.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio

from cachelayers.backends.base import EpochSupport, PubSubSupport
from cachelayers.engines.background import BackgroundTasks
from cachelayers.engines.tiered.events import Events
from cachelayers.engines.tiered.tags import NAMESPACE_TAG
from cachelayers.engines.tiered.tier import Tier
from cachelayers.errors import InvalidationError
from cachelayers.loops import current_loop_token

__all__ = ["SLOTS", "Epochs", "Invalidations", "fields_of"]

SLOTS: Final = 16384
"""Slots user tags and storage keys are hashed to (the epochs hash holds at most two fields per slot)."""
_MASK: Final = SLOTS - 1
_EPOCHS: Final = "~epochs"  # the name of the epoch tier's step in an outbox entry (a tier name never is)
_CHANNEL: Final = "~channel"  # the publish of an engine without epochs
_REPLAY_MAX_BACKOFF: Final = 2.0
_KINDS: Final = {"t": "tags", "k": "keys", "c": "clear"}


def fields_of(kind: str, items: Iterable[str]) -> list[str]:
    """The epoch fields an invalidation covers: ``kind`` ``"t"`` (tags), ``"k"`` (storage keys) or ``"c"``."""
    if kind == "c":
        return ["c"]
    out: set[str] = set()
    for item in items:
        if kind == "t" and item.startswith(NAMESPACE_TAG):
            out.add("n:" + item[len(NAMESPACE_TAG):])
        else:
            out.add(f"{kind}:{zlib.crc32(item.encode()) & _MASK}")
    return sorted(out)


class Epochs:
    """What this process knows of the invalidation epochs: the last sequence number of each field, the
    fields of its own invalidations that have not landed yet, and the stamp it gives the entries it writes."""

    __slots__ = ("last", "pending", "ready", "stamp")

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        """Fields of this process's invalidations not (yet) recorded in the epoch tier, with their count."""
        self.stamp = 0
        """The last sequence number heard on the channel (in order) or loaded: every invalidation up to it is
        known here, so an entry written now with it is refused by every later invalidation of its fields."""
        self.ready = False
        """Whether the epochs were loaded from the epoch tier since the channel was last subscribed."""

    def loaded(self, table: dict[str, int]) -> None:
        """Merge the epochs hash read just after subscribing (messages after it arrive on the channel)."""
        last = self.last
        for name, seq in table.items():
            if name == "*":
                self.stamp = max(self.stamp, seq)
            elif last.get(name, 0) < seq:
                last[name] = seq
        self.ready = True

    def heard(self, seq: int, fields: Iterable[str]) -> None:
        """An invalidation arrived on the channel (they arrive in sequence order)."""
        self.landed(seq, fields)
        if seq > self.stamp:
            self.stamp = seq

    def landed(self, seq: int, fields: Iterable[str]) -> None:
        """Record ``seq`` for ``fields`` (an invalidation of this process landed, or one was heard of)."""
        last = self.last
        for name in fields:
            if last.get(name, 0) < seq:
                last[name] = seq

    def hold(self, fields: Iterable[str]) -> None:
        """Refuse entries of ``fields`` until `release` (an invalidation of ours is on its way)."""
        pending = self.pending
        for name in fields:
            pending[name] = pending.get(name, 0) + 1

    def release(self, fields: Iterable[str]) -> None:
        pending = self.pending
        for name in fields:
            left = pending.get(name, 0) - 1
            if left > 0:
                pending[name] = left
            else:
                pending.pop(name, None)

    def admits(self, storage_key: str, tags: Sequence[str], stamp: int) -> bool:
        """Whether an entry read from a tier below memory may be served: no invalidation of its fields came
        after its stamp, and none of ours is pending."""
        last = self.last
        pending = self.pending
        if not last and not pending:
            return True
        names = [f"k:{zlib.crc32(storage_key.encode()) & _MASK}", "c"]
        for tag in tags:
            names.append("n:" + tag[len(NAMESPACE_TAG):] if tag.startswith(NAMESPACE_TAG)
                         else f"t:{zlib.crc32(tag.encode()) & _MASK}")
        get = last.get
        for name in names:  # noqa: SIM110 - a loop, not any(): this runs on every read below memory
            if get(name, 0) > stamp or name in pending:
                return False
        return True


class InvalidationHost(Protocol):
    """What `Invalidations` needs of its engine (a `TieredCache`)."""

    background: BackgroundTasks
    channel: str
    sender: bytes
    tiers: list[Tier]
    events: Events

    def tier_tags(self, tags: Iterable[str]) -> tuple[str, ...]:
        """The names tags have in the tiers below memory."""
        ...


@dataclass
class _Pending:
    """An invalidation (or several of one kind, merged) and the steps of it that have not landed."""

    kind: str
    items: dict[str, None]
    left: set[str]
    held: list[str] = field(default_factory=list)
    """Fields held in `Epochs.pending` for it until its epoch step lands."""


class Invalidations:
    """Carries the engine's invalidations to every tier and keeps those that did not land until they do.

    Args:
        host: The engine.
        pubsub: The tier whose channel tells other processes (``None``: no other process to tell).
        prefix: The engine's key prefix (``clear`` removes what is under it).
    """

    def __init__(self, host: InvalidationHost, pubsub: Tier | None, prefix: str) -> None:
        self.host = host
        self.pubsub = pubsub
        self.prefix = prefix
        self.epoch_tier = pubsub if pubsub is not None and isinstance(pubsub.backend, EpochSupport) else None
        self.epochs = Epochs() if self.epoch_tier is not None else None
        self.hash_key = prefix + _EPOCHS
        self.outbox: dict[str, _Pending] = {}
        """Invalidations that did not land everywhere, by kind (later ones are merged into them)."""
        self.blocked: set[str] = set()
        """Tiers not to read before the outbox is replayed to them (only without epochs, which cover them)."""
        self._draining = False
        self._replayed: list[_Pending] = []
        """The invalidations taken out of the outbox by the replay running now."""
        self._replaying: object | None = None
        """The event loop the background replay runs in, if one runs."""

    @property
    def queued(self) -> int:
        """Invalidations (merged by kind) waiting to be replayed, or being replayed."""
        return len(self.outbox) + len(self._replayed)

    async def run(self, kind: str, items: Sequence[str]) -> None:
        """Invalidate ``items`` (tags, storage keys, or nothing for a clear) in every tier and tell the others.

        Raises:
            InvalidationError: A step did not land within the tier timeout (it is queued and replayed).
        """
        names = {tier.name for tier in self.host.tiers}
        if self.epoch_tier is not None:
            names.add(_EPOCHS)
        elif self.pubsub is not None:
            names.add(_CHANNEL)
        op = _Pending(kind, dict.fromkeys(items), names)
        if self.epochs is not None:
            op.held = fields_of(kind, items)
            self.epochs.hold(op.held)
        await self._attempt(op)
        if not op.left:
            return
        self._queue(op)
        if self.epochs is not None and _EPOCHS not in op.left:
            return  # every process refuses what it covers: only the deletions are left to replay
        raise InvalidationError(_KINDS[kind], tuple(items), self._tier_names(op.left))

    def _tier_names(self, steps: set[str]) -> tuple[str, ...]:
        """The tiers behind steps (the epoch and channel steps are those of the Redis tier)."""
        names = {self.pubsub.name if step in (_EPOCHS, _CHANNEL) and self.pubsub is not None else step
                 for step in steps}
        return tuple(sorted(names))

    async def before_read(self, tier: Tier) -> bool:
        """Replay what ``tier`` missed before reading it (only needed without epochs); whether it may be read."""
        if tier.name not in self.blocked:
            return True
        await self.replay()
        return tier.name not in self.blocked

    async def replay(self) -> None:
        """Try every queued invalidation again (one replay at a time; a concurrent caller returns at once)."""
        if self._draining:
            return
        self._draining = True
        # Taken out, so that invalidations queued meanwhile are merged into a new entry, not into one whose
        # items this replay has already sent.
        self._replayed, self.outbox = list(self.outbox.values()), {}
        try:
            for op in self._replayed:
                await self._attempt(op)
        finally:
            for op in self._replayed:
                if op.left:
                    self._merge(op)
            self._replayed = []
            self._update_blocked()
            self._draining = False

    def _merge(self, op: _Pending) -> None:
        queued = self.outbox.get(op.kind)
        if queued is None:
            self.outbox[op.kind] = op
        else:
            queued.items.update(op.items)
            queued.left |= op.left
            queued.held += op.held

    def _queue(self, op: _Pending) -> None:
        self._merge(op)
        self._update_blocked()
        loop = current_loop_token()
        if self._replaying is not loop:  # none running in this event loop (one that ended took its own along)
            self._replaying = loop
            self.host.background.start_soon(self._drain)

    def _update_blocked(self) -> None:
        ops = [*self.outbox.values(), *self._replayed]
        self.blocked = set() if self.epochs is not None else {n for op in ops for n in op.left}

    async def _drain(self) -> None:
        """Replay the outbox in the background, backing off, until it is empty."""
        loop = current_loop_token()
        backoff = 0.05
        try:
            while self.outbox:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _REPLAY_MAX_BACKOFF)
                await self.replay()
        finally:
            if self._replaying is loop:
                self._replaying = None

    async def _attempt(self, op: _Pending) -> None:
        """Run the steps of ``op`` that have not landed; remove those that land from ``op.left``."""
        host = self.host
        items = list(op.items)
        steps: list[Callable[[], Coroutine[Any, Any, None]]] = []
        for tier in host.tiers:
            if tier.name in op.left:
                steps.append(self._deleting(op, tier, items))
        announce = self._announcing(op, items)
        if op.kind == "c" or self.epoch_tier is None:
            # A clear may remove the epochs hash itself: its epoch comes after. Without epochs, other
            # processes are told once the entries are gone, or they could read them back.
            await _together(steps)
            await _together([announce] if announce is not None else [])
        else:
            await _together(steps + ([announce] if announce is not None else []))

    def _deleting(self, op: _Pending, tier: Tier, items: list[str]) -> Callable[[], Coroutine[Any, Any, None]]:
        async def step() -> None:
            if op.kind == "t":
                done = await tier.delete_tags(self.host.tier_tags(items))
            elif op.kind == "k":
                done = await tier.delete(items)
            else:
                done = await tier.clear(self.prefix)
            if done:
                op.left.discard(tier.name)
        return step

    def _announcing(self, op: _Pending, items: list[str]) -> Callable[[], Coroutine[Any, Any, None]] | None:
        host = self.host
        payload = host.events.seal(op.kind, items)  # signed here: the script publishes it as it is
        epoch_tier, epochs = self.epoch_tier, self.epochs
        if epoch_tier is not None and epochs is not None and _EPOCHS in op.left:
            backend = epoch_tier.backend
            assert isinstance(backend, EpochSupport)
            names = fields_of(op.kind, items)

            async def bump() -> int | None:
                return await backend.bump_epochs(self.hash_key, names, host.channel, payload)

            async def announce_epoch() -> None:
                seq = await epoch_tier.call(bump, None)
                if seq is not None:
                    epochs.landed(seq, names)
                    epochs.release(op.held)
                    op.held = []
                    op.left.discard(_EPOCHS)
            return announce_epoch
        pubsub = self.pubsub
        if pubsub is not None and _CHANNEL in op.left:
            publisher = pubsub.backend
            assert isinstance(publisher, PubSubSupport)

            async def publish() -> bool:
                await publisher.publish(host.channel, payload)
                return True

            async def announce() -> None:
                if await pubsub.call(publish, False):
                    op.left.discard(_CHANNEL)
            return announce
        return None


async def _together(steps: list[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    if len(steps) == 1:
        await steps[0]()
    elif steps:
        async with anyio.create_task_group() as tg:
            for step in steps:
                tg.start_soon(step)
