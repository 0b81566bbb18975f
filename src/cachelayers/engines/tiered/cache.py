"""`TieredCache`: the tiers of one configuration, with a key/value API and the read/write path cached functions share.

Rules kept here, each tested: an entry's expiry is absolute and travels with it (back-filling keeps the
remaining lifetime); a tier that fails is a miss on read and skipped on write; an entry that fails its
integrity check is a miss, deleted and counted; invalidation removes from every tier and, through the
invalidation channel, from other processes' memory tiers, and is never silently lost: with a tier that keeps
invalidation epochs, an entry read below memory that an invalidation came after is a miss, and what did not
land is queued, replayed and raised as `InvalidationError` (see `epochs`). Tags live under
``<prefix>~tag:<tag>`` in the shared tiers, locks under ``<prefix>~lock:<key>``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeAlias, cast

import anyio

from cachelayers import audit
from cachelayers.backends import Backend, StoreItem, create_backend
from cachelayers.backends.base import MISSING, Clock, LockSupport, PubSubSupport
from cachelayers.backends.memory import MemoryBackend
from cachelayers.codec import Codec
from cachelayers.codec.sizing import live_entry_size
from cachelayers.durations import parse_ttl
from cachelayers.engines.background import BackgroundTasks
from cachelayers.engines.flight import Flight
from cachelayers.engines.tiered.channel import Listener
from cachelayers.engines.tiered.epochs import Invalidations
from cachelayers.engines.tiered.events import ClearGate, Events
from cachelayers.engines.tiered.guard import InvalidationGuard
from cachelayers.engines.tiered.tags import NAMESPACE_TAG, covered_since, namespace_tag, user_tags
from cachelayers.engines.tiered.tier import Stale, Tier
from cachelayers.errors import SerializationError
from cachelayers.metrics import FunctionStats, StateLog, TierStats, register_stats_source
from cachelayers.settings import PerSettings, Settings, get_settings

__all__ = ["Follower", "TieredCache", "default_cache"]

_RECENT_INVALIDATIONS: Final = 1024


class Follower(Protocol):
    """A cached function as the engine follows it: its statistics (see `TieredCache.adopt`)."""

    @property
    def stats(self) -> FunctionStats:
        """The function's counters."""
        ...


_Following: TypeAlias = "tuple[FunctionStats, int, weakref.finalize[..., Any]]"
"""How an engine follows a function's memory hits: its statistics, its memory hits when it came, and the
finalizer that folds them into the engine's count."""
_FOLLOWING_LOCK: Final = threading.RLock()  # re-entrant: a collection can run a finalizer while it is held


class TieredCache:
    """The tiers of one configuration, with a key/value API and the machinery cached functions share.

    Args:
        settings: Configuration; the settings in force when omitted.
        backends: Backends to use instead of those the settings name (test doubles, custom stores), fastest
            first, as a list or a ``name -> backend`` mapping. A `MemoryBackend` in first place is used as
            the in-process object tier.
        clock: Wall-clock time source for expiry (``time.time``); tests pass a fake clock.
        monotonic: Monotonic time source for breakers; defaults to ``clock`` when a fake clock is given.

    Background work (stale-while-revalidate refreshes, the invalidation listener) runs in a task group the
    engine owns per event loop; `aclose` stops it and closes the backends.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backends: Sequence[Backend] | Mapping[str, Backend] | None = None,
        clock: Clock = time.time,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else get_settings()
        self.clock = clock
        self.codec = Codec(secret=self.settings.secret, allow_pickle=self.settings.allow_pickle,
                           encryption_keys=self.settings.encryption_keys)
        self.log = StateLog()
        if backends is None:
            named: list[tuple[str, Backend]] = [
                (name, create_backend(url, clock=clock, field=f"tiers[{name!r}]")) for name, url in self.settings.tiers
            ]
        elif isinstance(backends, Mapping):
            named = list(backends.items())
        else:
            named = [(getattr(b, "name", None) or f"{type(b).__name__.lower()}{i}", b) for i, b in enumerate(backends)]
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self.local: MemoryBackend | None = None
        """The in-process memory tier, if the first tier is one; the engine uses it only as a `LocalTier`."""
        self.local_name, self.local_stats = "", TierStats("memory")
        if named and isinstance(named[0][1], MemoryBackend):
            self.local_name, local = named.pop(0)
            self.local = cast(MemoryBackend, local)
            self.local_stats = TierStats(self.local_name)
        self.failures = 0
        """Failures of any tier so far; a call notes it when it starts, to skip tiers that failed since."""
        self.tiers = [Tier(name, backend, self.settings, self.log, monotonic, self) for name, backend in named]
        self.strict = self.settings.strict
        self.inflight: dict[Hashable, Flight] = {}
        """The computations running in this process, by local key: a call missing a key waits for its flight."""
        prefix = self.settings.key_prefix
        self._tag_prefix = prefix + "~tag:"
        self.lock_prefix = prefix + "~lock:"
        self.channel = prefix + "~events"
        self.sender = os.urandom(8)
        self.events = Events(self.channel, self.sender, self.settings.secret, self.settings.channel_clear_interval)
        self.epoch = 0
        """Bumped by every invalidation this process makes or hears of; see `invalidated_since`."""
        self._recent: deque[tuple[int, str, list[str]]] = deque(maxlen=_RECENT_INVALIDATIONS)
        self.background = BackgroundTasks(f"TieredCache@{id(self):x}")
        self.clears = ClearGate(self.events, lambda: self.invalidated("c", []), self.background.start_soon,
                                anyio.sleep)
        self.lock_tier = next((t for t in self.tiers if isinstance(t.backend, LockSupport)), None)
        pubsub = next((t for t in self.tiers if isinstance(t.backend, PubSubSupport)), None)
        self.listener = Listener(self, pubsub) if pubsub is not None else None
        self.invalidations = Invalidations(self, pubsub, prefix)
        self.guard = InvalidationGuard(self.settings, [self.local_name, *(t.name for t in self.tiers)])
        self.epochs = self.invalidations.epochs
        """The invalidation epochs entries read below memory are checked against (``None``: no epoch tier)."""
        self._following: dict[int, _Following] = {}
        """The functions storing here, by ``id``: their statistics, their memory hits when they came, and the
        finalizer that adds the hits made here to `local_stats` when they go (the hit path counts them on the
        function only). Read and changed under `_FOLLOWING_LOCK`: a function can be collected on any thread."""
        register_stats_source(self)

    # -- key/value API -----------------------------------------------------------------------------------

    def storage_key(self, key: str) -> str:
        """The key under which the key/value API stores ``key`` in every tier."""
        return f"{self.settings.key_prefix}kv:{key}"

    async def get(self, key: str, default: Any = None) -> Any:
        """Return the value under ``key`` from the first tier that has it, back-filling the tiers above."""
        sk = self.storage_key(key)
        if self.local is not None:
            value = self.local.lookup(sk)
            if value is not MISSING:
                self.local_stats.hits += 1
                return value
            self.local_stats.misses += 1
        await self.follow_invalidations()
        value = await self.read_lower(sk, sk, epoch=self.epoch)
        return default if value is MISSING else value

    async def set(self, key: str, value: Any, *, ttl: float | str | None = None, tags: Iterable[str] = ()) -> bool:
        """Store ``value`` under ``key`` in every tier; return whether it could be encoded.

        Raises:
            ConfigError: ``ttl`` is malformed, negative or longer than the tiers can store.
            TypeError: A tag is not a string.
            ValueError: A tag starts as namespace tags do (``"ns\\x1f"``).
        """
        seconds = parse_ttl(ttl, "ttl") if ttl is not None else self.settings.default_ttl
        expires_at = self.clock() + seconds if seconds is not None else None
        checked = user_tags(tags, "TieredCache.set")
        sk = self.storage_key(key)
        await self.follow_invalidations()
        return await self.write(sk, sk, value, expires_at, checked)

    async def delete(self, *keys: str) -> None:
        """Remove keys from every tier (and from other processes' memory tiers).

        Raises:
            InvalidationError: As `invalidate_tags`.
        """
        sks = [self.storage_key(k) for k in keys]
        await self.remove(sks, sks)

    async def invalidate_tags(self, *tags: str) -> None:
        """Remove every entry carrying any of ``tags`` from every tier (and other processes' memory tiers).

        Raises:
            InvalidationError: A tier did not take it within the tier timeout: it is queued and replayed, and
                no process serves the entries it covers once the tier is back (see the invalidation guide).
            RateLimitExceeded: Over ``Settings.invalidation_limit`` (without its wait): nothing was removed.
        """
        await self.guard.run("t", list(tags), self.invalidated, self.invalidations.run)

    async def invalidate_namespace(self, namespace: str) -> None:
        """Remove every entry of ``namespace`` (by default, of one function) from every tier.

        Raises:
            InvalidationError: As `invalidate_tags`.
        """
        await self.invalidate_tags(namespace_tag(namespace))

    async def clear(self) -> None:
        """Remove everything under this configuration's key prefix from every tier.

        Raises:
            InvalidationError: As `invalidate_tags`.
        """
        await self.guard.run("c", [], self.invalidated, self.invalidations.run)

    async def aclose(self) -> None:
        """Stop background work, then close the backends' connections and files."""
        await self.background.aclose()
        if self.listener is not None:
            self.listener.stop()
        for tier in self.tiers:
            try:
                await tier.backend.aclose()
            except Exception as exc:
                self.log.failure(f"closing tier {tier.name!r}", exc)
        if self.local is not None:
            await self.local.aclose()

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every tier, by tier name."""
        out: dict[str, dict[str, Any]] = {}
        if self.local is not None:
            with _FOLLOWING_LOCK:  # the engine's count and its functions' hits at one instant: it never goes down
                snap: dict[str, Any] = self.local_stats.snapshot()
                snap["hits"] += sum(stats.memory_hits - since for stats, since, _ in self._following.values())
            snap.update(entries=len(self.local), bytes=self.local.bytes_used, evictions=self.local.evictions)
            out[self.local_name] = snap
        for tier in self.tiers:
            tier_snap: dict[str, Any] = tier.stats.snapshot()
            tier_snap["breaker"] = tier.breaker.state
            tier_snap["write_breaker"] = tier.write_breaker.state
            evictions = getattr(tier.backend, "evictions", None)
            if isinstance(evictions, int):
                tier_snap["evictions"] = evictions
            if self.listener is not None and tier is self.listener.tier:
                tier_snap.update(self.events.stats.snapshot())
            out[tier.name] = tier_snap
        return out

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"tiers@{id(self):x}": self.tier_stats()}

    # -- machinery shared with cached functions -----------------------------------------------------------

    def adopt(self, fn: Follower) -> None:
        """Count ``fn``'s memory hits from now on in this engine's memory tier (see `_following`)."""
        with _FOLLOWING_LOCK:
            if id(fn) not in self._following:
                stats = fn.stats
                done = weakref.finalize(fn, _fold_memory_hits, weakref.ref(self), id(fn))
                self._following[id(fn)] = (stats, stats.memory_hits, done)

    def release(self, fn: Follower) -> None:
        """``fn`` stores elsewhere now: keep the memory hits it made here, stop following it."""
        with _FOLLOWING_LOCK:
            entry = self._following.get(id(fn))
            if entry is not None:
                entry[2]()  # runs _fold_memory_hits now, and never again

    def tier_tags(self, tags: Iterable[str]) -> tuple[str, ...]:
        """The names tags have in the tiers below memory: inside the key prefix."""
        prefix = self._tag_prefix
        return tuple(prefix + tag for tag in tags)

    async def follow_invalidations(self) -> None:
        """Make sure this process hears other processes' invalidations before its memory tier takes entries."""
        listener = self.listener
        if listener is not None and (self.local is not None or self.epochs is not None):
            await listener.follow()

    def invalidated(self, kind: str, items: list[str]) -> None:
        """Record an invalidation (ours or another process's) and apply it to the memory tier.

        Args:
            kind: ``"k"`` for storage keys, ``"t"`` for tags, ``"c"`` for everything.
            items: The storage keys or tags.
        """
        self.epoch += 1
        self._recent.append((self.epoch, kind, items))
        local = self.local
        if local is not None:
            if kind == "k":
                local.remove_storage_keys(items)
            elif kind == "t":
                local.remove_tags(items)
                # Namespace tags are not indexed in memory (see `store_local`): a function's local keys are
                # ``(token, args)`` whose token starts with the namespace and a NUL (see `KeyBuilder`).
                tokens = tuple(tag[len(NAMESPACE_TAG):] + "\x00" for tag in items if tag.startswith(NAMESPACE_TAG))
                if tokens:
                    local.remove_where(lambda key: type(key) is tuple and key[0].startswith(tokens))
            else:
                local.clear_now()

    def invalidated_since(self, epoch: int, storage_key: str, tags: Iterable[str]) -> bool:
        """Whether an invalidation since ``epoch`` covers this entry (then a value read or computed across it
        is returned but not stored: it may be what was just invalidated)."""
        return epoch != self.epoch and covered_since(self._recent, epoch, storage_key, tags)

    def store_local(self, local_key: Hashable, value: Any, size: int, expires_at: float | None,
                     tags: tuple[str, ...], storage_key: str | None) -> bool:
        """Put an entry in the memory tier (there is one); return whether it is held (not larger than the bound).

        ``size`` is the value's encoded size; the tier is charged the estimated live size of the entry (see
        `live_entry_size`), since it holds the value as Python objects.

        A function's entry carries its namespace tag first; the memory tier does not index it, since a
        namespace's entries there are found by their local keys (see `invalidated`): one index update less
        per entry stored and evicted.
        """
        local = self.local
        assert local is not None
        if tags and tags[0].startswith(NAMESPACE_TAG):
            tags = tags[1:]
        listener = self.listener
        if listener is not None and not listener.subscribed:
            listener.unsynced.add(local_key)
        return local.store(local_key, value, live_entry_size(local_key, value, size), expires_at, tags, storage_key)

    async def read_lower(self, local_key: Hashable, storage_key: str, fstats: FunctionStats | None = None, *,
                         grace: float = 0.0, epoch: int | None = None, codec: Codec | None = None) -> Any:
        """Look ``storage_key`` up in the tiers below memory, back-filling the tiers above a hit.

        Returns the value, `MISSING`, or a `Stale` wrapper for an entry past its expiry but within ``grace``
        (not back-filled into memory). With ``epoch``, nothing is back-filled when an invalidation covering the
        entry went by since.
        """
        keys, epochs = (storage_key,), self.epochs
        if epochs is not None:  # the stamps it checks are only current while the channel is heard in this loop
            await self.follow_invalidations()
        for index, tier in enumerate(self.tiers):
            if self.invalidations.blocked and not await self.invalidations.before_read(tier):
                continue
            blobs = await tier.get_many(keys)
            blob = None if blobs is None else blobs[0]
            if blob is None:
                tier.stats.misses += 1
                continue
            try:
                envelope = (codec or self.codec).open(storage_key, blob)
            except SerializationError as exc:
                await self._corrupt(tier, [storage_key], exc)
                continue
            if epochs is not None and not epochs.admits(storage_key, envelope.tags, envelope.stamp):
                tier.stats.misses += 1  # an invalidation came after it was written
                continue
            expires_at = envelope.expires_at
            stale = False
            if expires_at is not None and expires_at <= self.clock():
                if expires_at + grace <= self.clock():
                    tier.stats.misses += 1
                    continue
                stale = True
            tier.stats.hits += 1
            if fstats is not None:
                fstats.hits_by_tier[tier.name] = fstats.hits_by_tier.get(tier.name, 0) + 1
            if epoch is not None and self.invalidated_since(epoch, storage_key, envelope.tags):
                return Stale(envelope.value) if stale else envelope.value
            if self.local is not None and not stale:
                self.store_local(local_key, envelope.value, len(blob), expires_at, envelope.tags, storage_key)
            if index:
                item = StoreItem(storage_key, blob, None if expires_at is None else expires_at + grace,
                                 self.tier_tags(envelope.tags))
                async with anyio.create_task_group() as tg:
                    for upper in self.tiers[:index]:
                        tg.start_soon(upper.set, [item])
            return Stale(envelope.value) if stale else envelope.value
        return MISSING

    async def read_lower_many(self, local_keys: Sequence[Hashable], storage_keys: Sequence[str],
                              fstats: FunctionStats | None = None, *, epoch: int | None = None,
                              codec: Codec | None = None) -> dict[int, Any]:
        """Batch form of `read_lower`: one multi-get per tier. Returns ``{index: value}`` of the hits."""
        found: dict[int, Any] = {}
        pending = list(range(len(storage_keys)))
        open_ = (codec or self.codec).open
        local, epochs = self.local, self.epochs
        if epochs is not None:  # the stamps it checks are only current while the channel is heard in this loop
            await self.follow_invalidations()
        for index, tier in enumerate(self.tiers):
            if not pending:
                break
            if self.invalidations.blocked and not await self.invalidations.before_read(tier):
                continue
            blobs = await tier.get_many([storage_keys[i] for i in pending])
            if blobs is None:
                continue
            still: list[int] = []
            corrupt: list[str] = []
            backfill: list[StoreItem] = []
            now = self.clock()
            first_error: SerializationError | None = None
            # An invalidation during the read makes each entry's fate depend on what it covered.
            check = epoch is not None and epoch != self.epoch
            hits = 0
            for i, blob in zip(pending, blobs, strict=True):
                if blob is None:
                    still.append(i)
                    continue
                sk = storage_keys[i]
                try:
                    envelope = open_(sk, blob)
                except SerializationError as exc:
                    first_error = first_error or exc
                    corrupt.append(sk)
                    still.append(i)
                    continue
                expires_at = envelope.expires_at
                if (expires_at is not None and expires_at <= now) or (
                        epochs is not None and not epochs.admits(sk, envelope.tags, envelope.stamp)):
                    still.append(i)
                    continue
                hits += 1
                found[i] = envelope.value
                if check and self.invalidated_since(cast(int, epoch), sk, envelope.tags):
                    continue
                if local is not None:
                    self.store_local(local_keys[i], envelope.value, len(blob), expires_at, envelope.tags, sk)
                if index:
                    backfill.append(StoreItem(sk, blob, expires_at, self.tier_tags(envelope.tags)))
            stats = tier.stats
            stats.hits += hits
            stats.misses += len(still) - len(corrupt)
            if fstats is not None and hits:
                fstats.hits_by_tier[tier.name] = fstats.hits_by_tier.get(tier.name, 0) + hits
            if corrupt:
                assert first_error is not None
                await self._corrupt(tier, corrupt, first_error)
            if backfill:
                async with anyio.create_task_group() as tg:
                    for upper in self.tiers[:index]:
                        tg.start_soon(upper.set, backfill)
            pending = still
        return found

    async def _corrupt(self, tier: Tier, storage_keys: list[str], exc: SerializationError) -> None:
        """Entries that failed their integrity check: count, log once, delete (and raise in strict mode)."""
        tier.stats.corrupt += len(storage_keys)
        self.log.failure(f"integrity of tier {tier.name!r}", exc)
        audit.integrity_failure(tier.name, storage_keys[0], reason=str(exc), count=len(storage_keys))
        await tier.delete(storage_keys)
        if self.strict:
            raise exc

    def store_in_memory(self, local_key: Hashable, storage_key: str | None, value: Any, expires_at: float | None,
                        tags: tuple[str, ...], fstats: FunctionStats | None = None,
                        codec: Codec | None = None) -> bytes | None:
        """Encode ``value`` and store it in the memory tier (charged its live size), if there is one.

        Returns the encoded body for the tiers below, or ``None`` when the value cannot be encoded (counted,
        logged once, nothing stored).
        """
        try:
            epochs = self.epochs
            body = (codec or self.codec).pack_body(value, tags, 0 if epochs is None else epochs.stamp)
        except SerializationError as exc:
            self._unencodable(value, exc, fstats)
            return None
        if self.local is not None:
            if self.store_local(local_key, value, len(body), expires_at, tags, storage_key):
                self.local_stats.writes += 1
            elif not self.tiers:  # held nowhere (with tiers below, they hold it)
                self._too_large(value, len(body), fstats)
        return body

    def remember(self, local_key: Hashable, value: Any, expires_at: float | None, tags: tuple[str, ...],
                 fstats: FunctionStats | None = None, codec: Codec | None = None) -> bool:
        """Store ``value`` in the memory tier of an engine that has no other tier (and so no listener).

        Nothing below needs the encoding, so a scalar, string or bytes value is not encoded at all: the codec
        computes the size it would have; the memory tier is charged the live size of the entry, at least that.
        Returns ``False`` when the value cannot be encoded (counted, logged once, nothing stored).
        """
        try:
            size = (codec or self.codec).body_size(value, tags)
        except SerializationError as exc:
            self._unencodable(value, exc, fstats)
            return False
        local = self.local
        if local is None:
            return False
        if tags and tags[0].startswith(NAMESPACE_TAG):  # as `store_local` does (this is the hot path)
            tags = tags[1:]
        size = live_entry_size(local_key, value, size)
        if not local.store(local_key, value, size, expires_at, tags, None):
            self._too_large(value, size, fstats)
            return False
        self.local_stats.writes += 1
        return True

    def _too_large(self, value: Any, size: int, fstats: FunctionStats | None) -> None:
        """A value the memory tier cannot hold (larger than its byte bound): counted as unstorable, logged once."""
        if fstats is not None:
            fstats.unstorable += 1
        self.log.failure(f"storing values of type {type(value).__qualname__} in memory",
                         ValueError(f"{size} bytes do not fit the memory tier's max_bytes"))

    def _unencodable(self, value: Any, exc: SerializationError, fstats: FunctionStats | None) -> None:
        if fstats is not None:
            fstats.unstorable += 1
        self.log.failure(f"encoding values of type {type(value).__qualname__}", exc)
        if self.strict:
            raise exc

    async def write(self, local_key: Hashable, storage_key: str, value: Any, expires_at: float | None,
                    tags: tuple[str, ...], fstats: FunctionStats | None = None, *, grace: float = 0.0,
                    since: int | None = None, codec: Codec | None = None) -> bool:
        """Store ``value`` in every tier; return ``False`` when it cannot be encoded (nothing is stored).

        Args:
            grace: Seconds past ``expires_at`` that the tiers below memory keep the entry (``stale=``).
            since: A value of `failures` taken when the call started: tiers that failed since are skipped.
        """
        body = self.store_in_memory(local_key, storage_key, value, expires_at, tags, fstats, codec)
        if body is None:
            return False
        if self.tiers:
            keep = None if expires_at is None else expires_at + grace
            item = StoreItem(storage_key, self.codec.seal_body(storage_key, body, expires_at), keep,
                             self.tier_tags(tags))
            targets = self.tiers if since is None else self._write_targets(since)
            if len(targets) == 1:
                await targets[0].set([item])
            elif targets:
                async with anyio.create_task_group() as tg:
                    for tier in targets:
                        tg.start_soon(tier.set, [item])
        return True

    def _write_targets(self, since: int) -> list[Tier]:
        """The tiers a call that started at ``since`` (a value of `failures`) writes to: those that have not
        failed since. A write left out is counted in the tier's ``skipped``, never silent."""
        targets: list[Tier] = []
        for tier in self.tiers:
            if tier.failure_serial <= since:
                targets.append(tier)
            else:
                tier.stats.skipped += 1
        return targets

    async def write_many(self, entries: Sequence[tuple[Hashable, str, Any, float | None, tuple[str, ...]]],
                         fstats: FunctionStats | None = None, *, since: int | None = None,
                         codec: Codec | None = None) -> None:
        """Batch form of `write`: ``entries`` are ``(local_key, storage_key, value, expires_at, tags)``; one
        multi-set per tier. Values that cannot be encoded are skipped and counted."""
        items: list[StoreItem] = []
        for local_key, storage_key, value, expires_at, tags in entries:
            body = self.store_in_memory(local_key, storage_key, value, expires_at, tags, fstats, codec)
            if body is None:
                continue
            items.append(StoreItem(storage_key, self.codec.seal_body(storage_key, body, expires_at), expires_at,
                                   self.tier_tags(tags)))
        targets = self.tiers if since is None or not items else self._write_targets(since)
        if items and targets:
            async with anyio.create_task_group() as tg:
                for tier in targets:
                    tg.start_soon(tier.set, items)

    async def remove(self, local_keys: Sequence[Hashable], storage_keys: Sequence[str]) -> None:
        """Remove entries from every tier and from other processes' memory tiers.

        Raises:
            InvalidationError: As `invalidate_tags`.
        """
        def local(kind: str, items: list[str]) -> None:
            for key in local_keys if self.local is not None else ():
                self.local.remove(key)  # type: ignore[union-attr]
            self.invalidated(kind, items)
        await self.guard.run("k", list(storage_keys), local, self.invalidations.run)


_default: Final = PerSettings(TieredCache)


def _fold_memory_hits(engine: weakref.ref[TieredCache], key: int) -> None:
    """Add the memory hits a function made on an engine to the engine's own count (it left, or was collected)."""
    with _FOLLOWING_LOCK:
        cache = engine()
        if cache is not None:
            entry = cache._following.pop(key, None)
            if entry is not None:
                cache.local_stats.hits += entry[0].memory_hits - entry[1]


def default_cache() -> TieredCache:
    """The engine of the settings in force, made on first use and remade when the settings change."""
    return _default.get()

