"""The tiered cache engine: read-through over ordered tiers, back-fill, single-flight, fail-open writes.

`TieredCache` owns the tiers of one `Settings` (the first may be the in-process memory tier, which holds live
objects; every other tier holds sealed envelopes) and offers a key/value API. `CachedFunction` is the engine
of one decorated function: it builds keys, serves hits, runs the function once per key on a miss, and stores
the result in every tier. The decorators only construct these.

Rules kept here, each tested:

* an entry's expiry is absolute and travels with it; back-filling an upper tier keeps the remaining lifetime;
* a tier that raises or times out is a miss on read and skipped on write, and its circuit breaker stops
  calling it for a while; the call itself never fails and never loses its result because of the cache
  (unless ``strict``). A tier that failed while a call was reading is not written by that call either, so a
  hung tier costs one timeout per call, not two;
* an entry that fails its integrity check is a miss, is deleted, and is counted;
* invalidation removes from every tier and, through a tier with `PubSubSupport` (Redis), from the memory tier
  of every other process; a value read or computed while an invalidation went by is returned but not cached;
* with ``lock=``, processes that miss one key compute it once (a leased lock in a `LockSupport` tier);
  with ``stale=``, an expired entry is served for a grace period while exactly one background refresh runs.

Cross-process coordination rides on one pub/sub channel per key prefix (``<prefix>~events``): messages are
msgpack ``[sender, kind, items]`` with kind ``"k"`` (storage keys), ``"t"`` (tags), ``"c"`` (clear) or ``"l"``
(a lock was released). Tags are kept in shared tiers under ``<prefix>~tag:<tag>``, locks under
``<prefix>~lock:<key>``, so applications with different prefixes never touch each other's entries.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
import typing
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final, Generic, NamedTuple, ParamSpec, TypeAlias, TypeVar, cast

import anyio
import msgpack
import numpy as np

from cachelayers.backends import Backend, StoreItem, create_backend
from cachelayers.backends.base import ClearPrefixSupport, Clock, DeadlineSupport, LockSupport, PubSubSupport
from cachelayers.backends.memory import EXPIRES_AT, MISSING, VALUE, MemoryBackend, Slot
from cachelayers.codec import Codec
from cachelayers.durations import parse_duration
from cachelayers.engines.background import BackgroundTasks
from cachelayers.engines.breaker import CircuitBreaker
from cachelayers.engines.flight import Flight
from cachelayers.errors import BackendError, ConfigError, SerializationError
from cachelayers.keys import FAST_TYPES, KeyBuilder
from cachelayers.loops import current_loop_token
from cachelayers.metrics import CacheInfo, FunctionStats, StateLog, TierStats, register_stats_source, stable_list
from cachelayers.settings import PerSettings, Settings, get_settings, tracker

__all__ = ["BatchFunctionCache", "FunctionCache", "TieredCache", "default_cache", "namespace_tag"]

P = ParamSpec("P")
T = TypeVar("T")

_NAMESPACE_TAG: Final = "ns\x1f"
DEFAULT_LOCK_LEASE: Final = 30.0
# A lock waiter looks again after a pause that doubles up to _LOCK_MAX_WAIT. When it hears release messages it
# is woken by them, and the pause only bounds the wait if a message is lost, so it starts longer.
_LOCK_FIRST_WAIT: Final = 0.02
_LOCK_FIRST_WAIT_NOTIFIED: Final = 0.25
_LOCK_MAX_WAIT: Final = 1.0
_LISTEN_MAX_BACKOFF: Final = 5.0
_RECENT_INVALIDATIONS: Final = 1024
_DIGEST_MEMO: Final = 1 << 16  # storage digests a batch function remembers before starting over


def namespace_tag(namespace: str) -> str:
    """The tag every entry of ``namespace`` carries, so a namespace is invalidated like a tag.

    It is an entry's first tag; user tags may not take its form (see `user_tags`).
    """
    return _NAMESPACE_TAG + namespace


def user_tags(tags: Iterable[Any], origin: str) -> tuple[str, ...]:
    """Check tags given by a user (``origin`` names where they came from) and return them as a tuple of plain
    strings (a `str` subclass such as a `StrEnum` member becomes its string value).

    Raises:
        TypeError: ``tags`` is a single string (which would be split into one-letter tags), or a tag is not a
            string.
        ValueError: A tag starts as namespace tags do (``"ns\\x1f"``), which would confuse the two.
    """
    if isinstance(tags, str | bytes):
        raise TypeError(f"{origin}: tags must be an iterable of strings, not one string: {tags!r}")
    checked: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"{origin}: tags must be strings, got {tag!r}")
        if type(tag) is not str:
            tag = str.__str__(tag)
        if tag.startswith(_NAMESPACE_TAG):
            raise ValueError(f"{origin}: tag {tag!r} starts with {_NAMESPACE_TAG!r}, reserved for namespace tags")
        checked.append(tag)
    return tuple(checked)


class _Unseen:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSEEN"


_UNSEEN: Final[Any] = _Unseen()
"""Passed by the compiled hit path to `FunctionCache._miss` when it did not look in memory."""


class _Stale:
    """A value served past its expiry, within its grace period (``stale=``): serve it, refresh it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Tier:
    """A tier below memory as the engine uses it: timeout, circuit breaker, counters, fail-open."""

    __slots__ = ("backend", "breaker", "cache", "failure_serial", "log", "name", "read_within", "stats", "strict",
                 "timeout")

    def __init__(self, name: str, backend: Backend, settings: Settings, log: StateLog,
                 monotonic: Callable[[], float], cache: TieredCache) -> None:
        self.name = name
        self.backend = backend
        self.cache = cache
        self.timeout: float = settings.tier_timeout
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown, monotonic)
        self.stats = TierStats(name)
        self.log = log
        self.strict = settings.strict
        # A backend that enforces the timeout on its own reads is called without a cancel scope, which on
        # asyncio costs a noticeable share of a Redis hit.
        self.read_within = backend.get_many_within if isinstance(backend, DeadlineSupport) else None
        self.failure_serial = 0
        """`TieredCache.failures` when this tier last failed: a call that started before skips its writes."""

    async def call(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        """Run ``op`` under the tier's timeout and breaker; on failure count, log and return ``default``."""
        if not self.breaker.allow():
            self.stats.skipped += 1
            return default
        try:
            with anyio.fail_after(self.timeout):
                result = await op()
        except TimeoutError as exc:
            self.stats.timeouts += 1
            self._failed(exc, f"timed out after {self.timeout:g}s")
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}")
        else:
            if self.breaker.success():
                self.log.recovered(f"tier {self.name!r}")
            return result
        return default

    def _failed(self, exc: BaseException, message: str) -> None:
        cache = self.cache
        cache.failures += 1
        self.failure_serial = cache.failures
        opened = self.breaker.failure()
        self.log.failure(f"tier {self.name!r}", message + (" (circuit breaker open)" if opened else ""))
        if self.strict:
            raise BackendError(f"tier {self.name!r} {message}") from exc

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Read ``keys``; ``None`` when the tier failed, timed out or its breaker is open."""
        if not self.breaker.allow():
            self.stats.skipped += 1
            return None
        read = self.read_within
        try:
            if read is not None:
                blobs = await read(keys, self.timeout)
            else:
                with anyio.fail_after(self.timeout):
                    blobs = await self.backend.get_many(keys)
        except TimeoutError as exc:
            self.stats.timeouts += 1
            self._failed(exc, f"timed out after {self.timeout:g}s")
            return None
        except Exception as exc:
            self.stats.errors += 1
            self._failed(exc, f"{type(exc).__name__}: {exc}")
            return None
        if self.breaker.success():
            self.log.recovered(f"tier {self.name!r}")
        return blobs

    async def set(self, items: Sequence[StoreItem]) -> None:
        async def op() -> bool:
            await self.backend.set_many(items)
            return True

        if await self.call(op, False):
            self.stats.writes += len(items)

    async def delete(self, keys: Sequence[str]) -> None:
        async def op() -> None:
            await self.backend.delete_many(keys)

        await self.call(op, None)

    async def delete_tags(self, tags: Sequence[str]) -> None:
        async def op() -> None:
            await self.backend.delete_tags(tags)

        await self.call(op, None)

    async def clear(self, prefix: str) -> None:
        backend = self.backend

        async def op() -> None:
            if isinstance(backend, ClearPrefixSupport):
                await backend.clear_prefix(prefix)
            else:
                await backend.clear()

        await self.call(op, None)


_Following: TypeAlias = "tuple[FunctionStats, int, weakref.finalize[..., Any]]"
"""How an engine follows a function's memory hits: its statistics, its memory hits when it came, and the
finalizer that folds them into the engine's count."""
_FOLLOWING_LOCK: Final = threading.RLock()  # re-entrant: a collection can run a finalizer while it is held


class _Listener:
    """Follows the invalidation channel of a `PubSubSupport` tier, one subscription per event loop.

    It drops from this process's memory tier what other processes invalidated, and wakes callers waiting for
    a distributed lock. Entries stored in memory before the subscription was active are dropped when it
    becomes active; after a lost subscription the whole memory tier is, since messages may have been missed.
    """

    __slots__ = ("backend", "cache", "loop", "lost", "ready", "subscribed", "tier", "unsynced", "waiters")

    def __init__(self, cache: TieredCache, tier: _Tier) -> None:
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
            return
        self.loop = token
        self.subscribed = False
        self.lost = False
        self.waiters = {}
        ready = self.ready = anyio.Event()
        self.cache.background.start_soon(self._run, token)
        with anyio.move_on_after(self.tier.timeout):
            await ready.wait()

    def stop(self) -> None:
        """Forget the subscription (the engine is closing)."""
        self.loop = None
        self.subscribed = False

    def waiter(self, lock_name: str) -> anyio.Event:
        """An event set when a release of ``lock_name`` is announced."""
        event = self.waiters.get(lock_name)
        if event is None or event.is_set():
            event = self.waiters[lock_name] = anyio.Event()
        return event

    async def _run(self, token: object) -> None:
        what = f"invalidation listener on tier {self.tier.name!r}"
        backoff = 0.05
        while self.loop is token:
            try:
                async with self.backend.subscribe(self.cache.channel) as messages:
                    self._on_subscribed()
                    self.cache.log.recovered(what)
                    backoff = 0.05
                    async for message in messages:
                        self._on_message(message)
            except Exception as exc:
                self.cache.log.failure(what, exc)
                if self.ready is not None:
                    self.ready.set()  # whoever waits in start() goes on without: entries stay unsynced
            if self.subscribed:
                self.subscribed = False
                self.lost = True
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, _LISTEN_MAX_BACKOFF)

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
        try:
            sender, kind, items = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            self.cache.log.failure("decoding invalidation messages", exc)
            return
        if sender == self.cache.sender:
            return
        if kind == "l":
            event = self.waiters.pop(items, None)
            if event is not None:
                event.set()
        elif kind in ("k", "t", "c"):
            self.cache.invalidated(kind, items)


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
        self.codec = Codec(secret=self.settings.secret, allow_pickle=self.settings.allow_pickle)
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
        self.local_name = ""
        self.local_stats = TierStats("memory")
        if named and isinstance(named[0][1], MemoryBackend):
            self.local_name, local = named.pop(0)
            self.local = cast(MemoryBackend, local)
            self.local_stats = TierStats(self.local_name)
        self.failures = 0
        """Failures of any tier so far; a call notes it when it starts, to skip tiers that failed since."""
        self.tiers = [_Tier(name, backend, self.settings, self.log, monotonic, self) for name, backend in named]
        self.strict = self.settings.strict
        self._inflight: dict[Hashable, Flight] = {}
        prefix = self.settings.key_prefix
        self._tag_prefix = prefix + "~tag:"
        self.lock_prefix = prefix + "~lock:"
        self.channel = prefix + "~events"
        self.sender = os.urandom(8)
        self.epoch = 0
        """Bumped by every invalidation this process makes or hears of; see `invalidated_since`."""
        self._recent: deque[tuple[int, str, list[str]]] = deque(maxlen=_RECENT_INVALIDATIONS)
        self.background = BackgroundTasks(f"TieredCache@{id(self):x}")
        self.lock_tier = next((t for t in self.tiers if isinstance(t.backend, LockSupport)), None)
        pubsub = next((t for t in self.tiers if isinstance(t.backend, PubSubSupport)), None)
        self.listener = _Listener(self, pubsub) if pubsub is not None else None
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
            ConfigError: ``ttl`` is malformed or negative.
            TypeError: A tag is not a string.
            ValueError: A tag starts as namespace tags do (``"ns\\x1f"``).
        """
        seconds = parse_duration(ttl, "ttl") if ttl is not None else self.settings.default_ttl
        expires_at = self.clock() + seconds if seconds is not None else None
        checked = user_tags(tags, "TieredCache.set")
        sk = self.storage_key(key)
        await self.follow_invalidations()
        return await self.write(sk, sk, value, expires_at, checked)

    async def delete(self, *keys: str) -> None:
        """Remove keys from every tier (and from other processes' memory tiers)."""
        sks = [self.storage_key(k) for k in keys]
        await self.remove(sks, sks)

    async def invalidate_tags(self, *tags: str) -> None:
        """Remove every entry carrying any of ``tags`` from every tier (and other processes' memory tiers)."""
        self.invalidated("t", list(tags))
        qualified = self.tier_tags(tags)
        async with anyio.create_task_group() as tg:
            for tier in self.tiers:
                tg.start_soon(tier.delete_tags, qualified)
        await self._publish("t", list(tags))

    async def invalidate_namespace(self, namespace: str) -> None:
        """Remove every entry of ``namespace`` (by default, of one function) from every tier."""
        await self.invalidate_tags(namespace_tag(namespace))

    async def clear(self) -> None:
        """Remove everything under this configuration's key prefix from every tier."""
        self.invalidated("c", [])
        async with anyio.create_task_group() as tg:
            for tier in self.tiers:
                tg.start_soon(tier.clear, self.settings.key_prefix)
        await self._publish("c", [])

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
            evictions = getattr(tier.backend, "evictions", None)
            if isinstance(evictions, int):
                tier_snap["evictions"] = evictions
            out[tier.name] = tier_snap
        return out

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"tiers@{id(self):x}": self.tier_stats()}

    # -- machinery shared with cached functions -----------------------------------------------------------

    def adopt(self, fn: FunctionCache[Any, Any]) -> None:
        """Count ``fn``'s memory hits from now on in this engine's memory tier (see `_following`)."""
        with _FOLLOWING_LOCK:
            if id(fn) not in self._following:
                stats = fn.stats
                done = weakref.finalize(fn, _fold_memory_hits, weakref.ref(self), id(fn))
                self._following[id(fn)] = (stats, stats.memory_hits, done)

    def release(self, fn: FunctionCache[Any, Any]) -> None:
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
        if listener is not None and self.local is not None and listener.loop is not current_loop_token():
            await listener.start()

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
                # Namespace tags are not indexed in memory (see `_store_local`): a function's local keys are
                # ``(token, args)`` whose token starts with the namespace and a NUL (see `KeyBuilder`).
                tokens = tuple(tag[len(_NAMESPACE_TAG):] + "\x00" for tag in items if tag.startswith(_NAMESPACE_TAG))
                if tokens:
                    local.remove_where(lambda key: type(key) is tuple and key[0].startswith(tokens))
            else:
                local.clear_now()

    def invalidated_since(self, epoch: int, storage_key: str, tags: Iterable[str]) -> bool:
        """Whether an invalidation since ``epoch`` covers this entry (then a value read or computed across it
        is returned but not stored: it may be what was just invalidated)."""
        if epoch == self.epoch:
            return False
        recent = self._recent
        if not recent or recent[0][0] > epoch + 1:
            return True  # the record no longer reaches back that far
        tags = tuple(tags)
        for serial, kind, items in reversed(recent):
            if serial <= epoch:
                break
            if kind == "c" or (kind == "k" and storage_key in items) or (kind == "t" and any(t in items for t in tags)):
                return True
        return False

    async def _publish(self, kind: str, items: list[str]) -> None:
        listener = self.listener
        if listener is None:
            return
        payload = msgpack.packb([self.sender, kind, items], use_bin_type=True)
        backend = listener.backend

        async def op() -> None:
            await backend.publish(self.channel, payload)

        await listener.tier.call(op, None)

    def _store_local(self, local_key: Hashable, value: Any, size: int, expires_at: float | None,
                     tags: tuple[str, ...], storage_key: str | None) -> None:
        """Put an entry in the memory tier (there is one).

        A function's entry carries its namespace tag first; the memory tier does not index it, since a
        namespace's entries there are found by their local keys (see `invalidated`): one index update less
        per entry stored and evicted.
        """
        local = self.local
        assert local is not None
        if tags and tags[0].startswith(_NAMESPACE_TAG):
            tags = tags[1:]
        listener = self.listener
        if listener is not None and not listener.subscribed:
            listener.unsynced.add(local_key)
        local.store(local_key, value, size, expires_at, tags, storage_key)

    async def read_lower(self, local_key: Hashable, storage_key: str, fstats: FunctionStats | None = None, *,
                         grace: float = 0.0, epoch: int | None = None) -> Any:
        """Look ``storage_key`` up in the tiers below memory, back-filling the tiers above a hit.

        Returns the value, `MISSING`, or a `_Stale` wrapper for an entry past its expiry but within ``grace``
        (not back-filled into memory). With ``epoch``, nothing is back-filled when an invalidation covering the
        entry went by since.
        """
        keys = (storage_key,)
        for index, tier in enumerate(self.tiers):
            blobs = await tier.get_many(keys)
            blob = None if blobs is None else blobs[0]
            if blob is None:
                tier.stats.misses += 1
                continue
            try:
                envelope = self.codec.open(storage_key, blob)
            except SerializationError as exc:
                await self._corrupt(tier, [storage_key], exc)
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
                return _Stale(envelope.value) if stale else envelope.value
            if self.local is not None and not stale:
                self._store_local(local_key, envelope.value, len(blob), expires_at, envelope.tags, storage_key)
            if index:
                item = StoreItem(storage_key, blob, None if expires_at is None else expires_at + grace,
                                 self.tier_tags(envelope.tags))
                async with anyio.create_task_group() as tg:
                    for upper in self.tiers[:index]:
                        tg.start_soon(upper.set, [item])
            return _Stale(envelope.value) if stale else envelope.value
        return MISSING

    async def read_lower_many(self, local_keys: Sequence[Hashable], storage_keys: Sequence[str],
                              fstats: FunctionStats | None = None, *, epoch: int | None = None) -> dict[int, Any]:
        """Batch form of `read_lower`: one multi-get per tier. Returns ``{index: value}`` of the hits."""
        found: dict[int, Any] = {}
        pending = list(range(len(storage_keys)))
        open_ = self.codec.open
        local = self.local
        for index, tier in enumerate(self.tiers):
            if not pending:
                break
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
                if expires_at is not None and expires_at <= now:
                    still.append(i)
                    continue
                hits += 1
                found[i] = envelope.value
                if check and self.invalidated_since(cast(int, epoch), sk, envelope.tags):
                    continue
                if local is not None:
                    self._store_local(local_keys[i], envelope.value, len(blob), expires_at, envelope.tags, sk)
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

    async def _corrupt(self, tier: _Tier, storage_keys: list[str], exc: SerializationError) -> None:
        """Entries that failed their integrity check: count, log once, delete (and raise in strict mode)."""
        tier.stats.corrupt += len(storage_keys)
        self.log.failure(f"integrity of tier {tier.name!r}", exc)
        await tier.delete(storage_keys)
        if self.strict:
            raise exc

    def store_in_memory(self, local_key: Hashable, storage_key: str | None, value: Any, expires_at: float | None,
                        tags: tuple[str, ...], fstats: FunctionStats | None = None) -> bytes | None:
        """Encode ``value`` (its size is what the memory tier charges) and store it there, if there is one.

        Returns the encoded body for the tiers below, or ``None`` when the value cannot be encoded (counted,
        logged once, nothing stored).
        """
        try:
            body = self.codec.pack_body(value, tags)
        except SerializationError as exc:
            self._unencodable(value, exc, fstats)
            return None
        if self.local is not None:
            self._store_local(local_key, value, len(body), expires_at, tags, storage_key)
            self.local_stats.writes += 1
        return body

    def remember(self, local_key: Hashable, value: Any, expires_at: float | None, tags: tuple[str, ...],
                 fstats: FunctionStats | None = None) -> bool:
        """Store ``value`` in the memory tier of an engine that has no other tier (and so no listener).

        Nothing below needs the encoding, so a scalar, string or bytes value is not encoded at all: the codec
        computes the size it would have. Returns ``False`` when the value cannot be encoded (counted, logged
        once, nothing stored).
        """
        try:
            size = self.codec.body_size(value, tags)
        except SerializationError as exc:
            self._unencodable(value, exc, fstats)
            return False
        local = self.local
        if local is None:
            return False
        if tags and tags[0].startswith(_NAMESPACE_TAG):  # as `_store_local` does (this is the hot path)
            tags = tags[1:]
        local.store(local_key, value, size, expires_at, tags, None)
        self.local_stats.writes += 1
        return True

    def _unencodable(self, value: Any, exc: SerializationError, fstats: FunctionStats | None) -> None:
        if fstats is not None:
            fstats.unstorable += 1
        self.log.failure(f"encoding values of type {type(value).__qualname__}", exc)
        if self.strict:
            raise exc

    async def write(self, local_key: Hashable, storage_key: str, value: Any, expires_at: float | None,
                    tags: tuple[str, ...], fstats: FunctionStats | None = None, *, grace: float = 0.0,
                    since: int | None = None) -> bool:
        """Store ``value`` in every tier; return ``False`` when it cannot be encoded (nothing is stored).

        Args:
            grace: Seconds past ``expires_at`` that the tiers below memory keep the entry (``stale=``).
            since: A value of `failures` taken when the call started: tiers that failed since are skipped.
        """
        body = self.store_in_memory(local_key, storage_key, value, expires_at, tags, fstats)
        if body is None:
            return False
        if self.tiers:
            keep = None if expires_at is None else expires_at + grace
            item = StoreItem(storage_key, self.codec.seal_body(storage_key, body, expires_at), keep,
                             self.tier_tags(tags))
            targets = self.tiers if since is None else [t for t in self.tiers if t.failure_serial <= since]
            if len(targets) == 1:
                await targets[0].set([item])
            elif targets:
                async with anyio.create_task_group() as tg:
                    for tier in targets:
                        tg.start_soon(tier.set, [item])
        return True

    async def write_many(self, entries: Sequence[tuple[Hashable, str, Any, float | None, tuple[str, ...]]],
                         fstats: FunctionStats | None = None, *, since: int | None = None) -> None:
        """Batch form of `write`: ``entries`` are ``(local_key, storage_key, value, expires_at, tags)``; one
        multi-set per tier. Values that cannot be encoded are skipped and counted."""
        items: list[StoreItem] = []
        for local_key, storage_key, value, expires_at, tags in entries:
            body = self.store_in_memory(local_key, storage_key, value, expires_at, tags, fstats)
            if body is None:
                continue
            items.append(StoreItem(storage_key, self.codec.seal_body(storage_key, body, expires_at), expires_at,
                                   self.tier_tags(tags)))
        targets = self.tiers if since is None else [t for t in self.tiers if t.failure_serial <= since]
        if items and targets:
            async with anyio.create_task_group() as tg:
                for tier in targets:
                    tg.start_soon(tier.set, items)

    async def remove(self, local_keys: Sequence[Hashable], storage_keys: Sequence[str]) -> None:
        """Remove entries from every tier and from other processes' memory tiers."""
        if self.local is not None:
            for key in local_keys:
                self.local.remove(key)
        self.invalidated("k", list(storage_keys))
        async with anyio.create_task_group() as tg:
            for tier in self.tiers:
                tg.start_soon(tier.delete, storage_keys)
        await self._publish("k", list(storage_keys))


_default: Final = PerSettings(TieredCache)
_functions: weakref.WeakSet[FunctionCache[Any, Any]] = weakref.WeakSet()


def _fold_memory_hits(engine: weakref.ref[TieredCache], key: int) -> None:
    """Add the memory hits a function made on an engine to the engine's own count (it left, or was collected)."""
    with _FOLLOWING_LOCK:
        cache = engine()
        if cache is not None:
            entry = cache._following.pop(key, None)
            if entry is not None:
                cache.local_stats.hits += entry[0].memory_hits - entry[1]


def _on_settings_change() -> None:
    for fn in stable_list(lambda: _functions):
        fn._unbind()


tracker.subscribe(_on_settings_change)


def default_cache() -> TieredCache:
    """The engine of the settings in force, made on first use and remade when the settings change."""
    return _default.get()


def _lease(lock: bool | float | str | timedelta | None) -> float | None:
    if lock is None or lock is False:
        return None
    if lock is True:
        return DEFAULT_LOCK_LEASE
    lease = parse_duration(lock, "lock")
    if lease <= 0:
        raise ConfigError("lock", lock, "the lease must be positive (or pass lock=True for the default)")
    return lease


class FunctionCache(Generic[P, T]):
    """The engine of one function decorated with `multilevel_cached`.

    `wrapper` is the function handed to users: a plain ``async def`` (so it binds as a method and calls
    as fast as Python allows) whose hit path is inlined: no task, no string formatting, no signature
    binding. Its attributes ``cache_info``, ``invalidate``, ``invalidate_all``, ``cache_clear`` and
    ``cache`` (this object) come from here.

    Beyond the options of `multilevel_cached` it takes ``lock`` (a lease in seconds, ``True`` for 30s, or
    ``None``): processes that miss one key take a leased lock in the first `LockSupport` tier so that one of
    them computes while the others wait for its release message (or back off exponentially); and ``stale``
    (seconds): an entry past its expiry is still served for that long while exactly one background refresh
    per key runs.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        *,
        ttl: float | str | Any = None,
        tags: Callable[..., Iterable[str]] | Iterable[str] | None = None,
        key: Callable[..., Any] | None = None,
        namespace: str | None = None,
        version: str | int = 0,
        ignore: Iterable[str] = (),
        name: str | None = None,
        cost: float | Callable[[T], float] | None = None,
        cache: TieredCache | None = None,
        lock: bool | float | str | timedelta | None = None,
        stale: float | str | Any = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"multilevel_cached needs an async function, got {fn!r}")
        self._fn = fn
        self._keys = KeyBuilder(fn, namespace=namespace, version=version, key=key, ignore=ignore, name=name)
        self.identity = self._keys.identity
        self._ttl = parse_duration(ttl, "ttl") if ttl is not None else None
        if tags is None or callable(tags):
            self._tags_fn: Callable[..., Iterable[str]] | None = tags
            self._static_tags: tuple[str, ...] = ()
        else:
            self._tags_fn = None
            try:
                self._static_tags = user_tags(tags, "tags")
            except ValueError as exc:
                raise ConfigError("tags", tags, str(exc)) from None
        if cost is not None and not callable(cost) and (not isinstance(cost, int | float) or cost < 0):
            raise TypeError(f"cost must be a non-negative number or a function of the result, got {cost!r}")
        self._cost = cost
        self._lease = _lease(lock)
        self._grace = parse_duration(stale, "stale") if stale is not None else 0.0
        self.refreshes = 0
        """Background refreshes of stale entries completed (``stale=``)."""
        self._explicit_cache = cache
        self._cache: TieredCache | None = cache
        self._generation = -1
        self._set_memory: Callable[[OrderedDict[Hashable, Slot] | None, Clock], None] | None = None
        self._prefix = ""
        self._expiry_default: float | None = None
        self.stats = FunctionStats()
        self._namespace_tags = (namespace_tag(self._keys.namespace),)
        self._fixed_tags = self._namespace_tags + self._static_tags
        self.wrapper = self._build_wrapper()
        _functions.add(self)
        register_stats_source(self)

    # -- binding to the engine of the settings in force -------------------------------------------------

    def _bind(self, cache: TieredCache) -> TieredCache:
        if self._cache is not None and self._cache is not cache:
            self._cache.release(self)
        self._cache = cache
        if self._set_memory is not None:
            self._set_memory(cache.local.slots if cache.local is not None else None, cache.clock)
        self._prefix = f"{cache.settings.key_prefix}{self._keys.namespace}:"
        self._expiry_default = self._ttl if self._ttl is not None else cache.settings.default_ttl
        self._generation = tracker.generation
        cache.adopt(self)
        return cache

    def _unbind(self) -> None:
        """Forget the engine (the settings changed): the next call misses the hit path and rebinds."""
        if self._explicit_cache is None and self._set_memory is not None:
            self._set_memory(None, time.time)

    def _rebind(self) -> TieredCache:
        """Follow the settings in force (a no-op for a function given an explicit cache)."""
        if self._explicit_cache is not None:
            self._generation = tracker.generation
            return self._explicit_cache
        return self._bind(default_cache())

    @property
    def cache(self) -> TieredCache:
        """The engine this function stores in now."""
        if self._cache is None or self._generation != tracker.generation:
            return self._rebind()
        return self._cache

    # -- calls --------------------------------------------------------------------------------------------

    def _build_wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        """Compile the function handed to users, with the hit path inlined.

        When the function's parameters allow (no ``*args``/``**kwargs``, no ``key=``), the wrapper gets the
        function's own parameter list: Python's call machinery then binds the arguments and applies the
        defaults, so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` arrive as the same locals and the key is
        one tuple of them (the tuple `KeyBuilder.local` builds for such calls). Otherwise the wrapper takes
        ``*args, **kwargs`` and asks `KeyBuilder.local`. What the hit path reads lives in closure cells,
        the fastest loads Python has (the memory tier's ``get`` and ``move_to_end`` among them, bound); `_bind`
        updates them through ``set_memory``.
        """
        params = self._keys.parameters
        namespace: dict[str, Any] = {}
        if params is not None and not any(p.name.startswith("_cl_") for p in params):
            signature: list[str] = []
            kind = None
            for i, p in enumerate(params):
                if p.kind is p.KEYWORD_ONLY and kind is not p.KEYWORD_ONLY:
                    signature.append("*")
                elif kind is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY:
                    signature.append("/")
                kind = p.kind
                if p.default is p.empty:
                    signature.append(p.name)
                else:
                    namespace[f"_cl_default_{i}"] = p.default
                    signature.append(f"{p.name}=_cl_default_{i}")
            if kind is inspect.Parameter.POSITIONAL_ONLY:
                signature.append("/")
            keyed = [p.name for p in params if p.name not in self._keys.ignored]
            args = "(" + "".join(f"{p.name}, " for p in params if p.kind is not p.KEYWORD_ONLY) + ")"
            kwargs = "{" + ", ".join(f"{p.name!r}: {p.name}" for p in params if p.kind is p.KEYWORD_ONLY) + "}"
            key = f"""if {" and ".join(f"type({n}) in _cl_fast" for n in keyed) or "True"}:
            _cl_key = (_cl_token, ({"".join(f"{n}, " for n in keyed)}))
        else:
            _cl_key = _cl_local_key_of({args}, {kwargs})"""
        else:
            signature = ["*args", "**kwargs"]
            args, kwargs = "args", "kwargs"
            key = "_cl_key = _cl_local_key_of(args, kwargs)"
        source = f"""
def _cl_make(_cl_local_key_of, _cl_token, _cl_fast, _cl_stats, _cl_miss, _cl_count_cost, _cl_unseen):
    _cl_get = None  # the memory tier's slots.get, bound: no attribute lookup per call
    _cl_move = None  # and its move_to_end
    _cl_clock = None

    def set_memory(slots, clock):
        nonlocal _cl_get, _cl_move, _cl_clock
        if slots is None:
            _cl_get = _cl_move = None
        else:
            _cl_get, _cl_move = slots.get, slots.move_to_end
        _cl_clock = clock

    async def wrapper({", ".join(signature)}):
        {key}
        if _cl_get is not None:
            _cl_slot = _cl_get(_cl_key)
            if _cl_slot is not None:
                _cl_expires_at = _cl_slot[1]  # a memory Slot: (value, expires_at, ...)
                if _cl_expires_at is None or _cl_expires_at > _cl_clock():
                    _cl_move(_cl_key)
                    _cl_stats.hits += 1
                    if _cl_count_cost is not None:
                        _cl_count_cost(_cl_slot[0])
                    return _cl_slot[0]
            return await _cl_miss(_cl_key, {args}, {kwargs}, _cl_slot)  # what memory holds: None or expired
        return await _cl_miss(_cl_key, {args}, {kwargs}, _cl_unseen)

    return wrapper, set_memory
"""
        exec(compile(source, f"<cachelayers wrapper of {self.identity}>", "exec"), namespace)
        wrapper, self._set_memory = namespace["_cl_make"](
            self._keys.local, self._keys.token, FAST_TYPES, self.stats, self._miss,
            self._count_cost if self._cost is not None else None, _UNSEEN)
        if self._cache is not None:
            self._bind(self._cache)
        functools.update_wrapper(wrapper, self._fn)
        wrapper.cache = self
        wrapper.cache_info = self.cache_info
        wrapper.invalidate = self.invalidate
        wrapper.invalidate_all = self.invalidate_all
        wrapper.cache_clear = self.invalidate_all
        return wrapper  # type: ignore[no-any-return]

    def _count_cost(self, value: Any) -> None:
        cost = self._cost
        self.stats.cost_saved += cost(value) if callable(cost) else cost  # type: ignore[operator]

    async def _miss(self, local_key: Hashable, args: Any, kwargs: Any, slot: Any = _UNSEEN) -> T:
        """Answer a call the compiled hit path could not.

        ``slot`` is what the hit path found in memory (``None``, or an entry past its expiry), or `_UNSEEN` when
        it did not look: it is unbound (first call, or the settings just changed, which unbinds it at once).
        """
        cache = self._cache  # the `cache` property, inlined: every miss passes here
        if cache is None or self._generation != tracker.generation:
            cache = self._rebind()
            slot = _UNSEEN  # what the hit path saw was another engine's memory
        local = cache.local
        if local is not None:
            # A stale entry within its grace period is still served.
            if slot is _UNSEEN:
                slot = local.slots.get(local_key)
            if slot is not None:
                now = cache.clock()
                expires_at = slot[EXPIRES_AT]
                if expires_at is None or expires_at > now:
                    local.slots.move_to_end(local_key)
                    self._served(slot[VALUE], None)
                    return cast(T, slot[VALUE])
                if expires_at + self._grace > now:
                    local.slots.move_to_end(local_key)
                    self._served(slot[VALUE], "stale")
                    self._refresh_soon(cache, local_key, args, kwargs)
                    return cast(T, slot[VALUE])
            cache.local_stats.misses += 1
        inflight = cache._inflight
        while True:
            flight = inflight.get(local_key)
            if flight is None:
                break
            await flight.wait()
            if flight.done:
                if flight.error is not None:
                    raise flight.error
                self._served(flight.value, "in-flight")
                return cast(T, flight.value)
            # The computing caller was cancelled: one of the waiters takes over.
        flight = inflight[local_key] = Flight()
        try:
            if cache.tiers or cache.listener is not None:
                value = await self._load(cache, local_key, args, kwargs)
            else:  # memory only: compute right here (one coroutine less on the miss path)
                epoch = cache.epoch
                started = time.perf_counter()
                value = await self._fn(*args, **kwargs)
                plan = self._storable(cache, local_key, None, args, kwargs, epoch, time.perf_counter() - started)
                if plan is not None:
                    cache.remember(local_key, value, plan[1], plan[0], self.stats)
            stale = type(value) is _Stale
            if stale:
                value = value.value
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        else:
            flight.value = value
            flight.done = True
        finally:
            if inflight.get(local_key) is flight:
                del inflight[local_key]
            flight.finish()
        if stale:
            self._refresh_soon(cache, local_key, args, kwargs)
        result: T = value  # not typing.cast: a function call on every miss
        return result

    def _served(self, value: Any, source: str | None) -> None:
        """Count a hit not served by the compiled hit path (``source`` names where it came from)."""
        stats = self.stats
        stats.hits += 1
        if source is not None:
            stats.hits_by_tier[source] = stats.hits_by_tier.get(source, 0) + 1
        # The declared cost counts hits served from a tier; a caller that joined a running computation shared
        # its cost rather than saved it.
        if self._cost is not None and source != "in-flight":
            self._count_cost(value)

    async def _load(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any) -> Any:
        """Read the lower tiers, else compute (under the distributed lock, if asked) and store."""
        storage_key = self._prefix + self._keys.storage_digest(local_key)
        epoch, since = cache.epoch, cache.failures
        listener = cache.listener
        if listener is not None and cache.local is not None and listener.loop is not current_loop_token():
            await listener.start()
        if cache.tiers:
            value = await self._read(cache, local_key, storage_key, epoch)
            if value is not MISSING:
                return value
            if self._lease is not None and cache.lock_tier is not None:
                return await self._load_locked(cache, local_key, storage_key, args, kwargs, epoch, since)
        return await self._compute(cache, local_key, storage_key, args, kwargs, epoch, since)

    async def _read(self, cache: TieredCache, local_key: Hashable, storage_key: str, epoch: int) -> Any:
        started = time.perf_counter()
        value = await cache.read_lower(local_key, storage_key, self.stats, grace=self._grace, epoch=epoch)
        if value is not MISSING:
            stats = self.stats
            stats.hits += 1
            stats.cached_latency.add(time.perf_counter() - started)
            if self._cost is not None:
                self._count_cost(value.value if type(value) is _Stale else value)
        return value

    def _storable(self, cache: TieredCache, local_key: Hashable, storage_key: str | None, args: Any,
                  kwargs: Any, epoch: int, seconds: float) -> tuple[tuple[str, ...], float | None] | None:
        """Count a computation that took ``seconds``; return the ``(tags, expires_at)`` to store its result
        with, or ``None`` when it must not be stored (``tags=`` failed, or an invalidation of the entry went by
        since ``epoch``: the result may be what was just invalidated). ``storage_key`` is derived only when
        that check needs it (a memory-only engine has none)."""
        stats = self.stats
        stats.misses += 1
        stats.computed_latency.add(seconds)
        try:
            tags = self._fixed_tags if self._tags_fn is None else self._tags(args, kwargs)
        except Exception as exc:  # a failing tags= function must not lose the result
            stats.errors += 1
            cache.log.failure(f"tags= of {self.identity}", exc)
            if cache.strict:
                raise
            return None
        if epoch != cache.epoch and cache.invalidated_since(
                epoch, storage_key or self._prefix + self._keys.storage_digest(local_key), tags):
            return None
        ttl = self._expiry_default
        return tags, (cache.clock() + ttl if ttl is not None else None)

    async def _compute(self, cache: TieredCache, local_key: Hashable, storage_key: str, args: Any, kwargs: Any,
                       epoch: int, since: int) -> T:
        started = time.perf_counter()
        result = await self._fn(*args, **kwargs)
        plan = self._storable(cache, local_key, storage_key, args, kwargs, epoch, time.perf_counter() - started)
        if plan is None:
            return result
        tags, expires_at = plan
        try:
            await cache.write(local_key, storage_key, result, expires_at, tags, self.stats, grace=self._grace,
                              since=since)
        except (SerializationError, BackendError):
            if cache.strict:
                raise
        return result

    async def _load_locked(self, cache: TieredCache, local_key: Hashable, storage_key: str, args: Any,
                           kwargs: Any, epoch: int, since: int) -> Any:
        """Compute under a leased lock so that one process computes while the others wait for its result.

        Waiters are woken by the release message on the pub/sub channel; without it (or if it is lost) they
        look again after an exponentially growing pause. A holder that died leaves a lock that expires with
        its lease. If the lock tier fails, the call computes without it (fail open).
        """
        tier = cache.lock_tier
        assert tier is not None
        assert self._lease is not None
        backend = cast(LockSupport, tier.backend)
        lease = self._lease
        name = cache.lock_prefix + storage_key[len(cache.settings.key_prefix):]
        token = os.urandom(16).hex()
        listener = cache.listener
        if listener is not None and listener.loop is not current_loop_token():
            await listener.start()
        notified = listener is not None and listener.subscribed
        pause = _LOCK_FIRST_WAIT_NOTIFIED if notified else _LOCK_FIRST_WAIT
        while True:
            woken = listener.waiter(name) if listener is not None and listener.subscribed else None
            acquired = await tier.call(lambda: backend.acquire_lock(name, token, lease), None)
            if acquired is None:
                return await self._compute(cache, local_key, storage_key, args, kwargs, epoch, since)
            if acquired:
                break
            with anyio.move_on_after(pause):
                if woken is not None:
                    await woken.wait()
                else:
                    await anyio.sleep_forever()
            pause = min(pause * 2, _LOCK_MAX_WAIT)
            value = await self._read(cache, local_key, storage_key, epoch)
            if value is not MISSING:
                return value
        release = msgpack.packb([cache.sender, "l", name], use_bin_type=True)
        try:
            # A second look now that we hold the lock: the previous holder may have stored it just before.
            value = await self._read(cache, local_key, storage_key, epoch)
            if value is not MISSING:
                return value
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, tier, backend, name, token, lease)
                try:
                    return await self._compute(cache, local_key, storage_key, args, kwargs, epoch, since)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await tier.call(lambda: backend.release_lock(name, token, (cache.channel, release)), False)

    @staticmethod
    async def _keep_lease(tier: _Tier, backend: LockSupport, name: str, token: str, lease: float) -> None:
        """Extend the lease while the computation runs, so a long call keeps the others waiting."""
        while True:
            await anyio.sleep(lease / 3)
            if await tier.call(lambda: backend.extend_lock(name, token, lease), None) is False:
                return

    def _refresh_soon(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any) -> None:
        """Start a background refresh of a stale entry unless one (or any computation of it) is running."""
        inflight = cache._inflight
        if local_key in inflight:
            return
        flight = inflight[local_key] = Flight()
        cache.background.start_soon(self._refresh, cache, local_key, args, kwargs, flight)

    async def _refresh(self, cache: TieredCache, local_key: Hashable, args: Any, kwargs: Any,
                       flight: Flight) -> None:
        try:
            storage_key = self._prefix + self._keys.storage_digest(local_key)
            epoch, since = cache.epoch, cache.failures
            tier = cache.lock_tier
            if self._lease is not None and tier is not None:
                # Across processes too, one refresh: whoever holds the lock refreshes, the others keep serving.
                backend = cast(LockSupport, tier.backend)
                name = cache.lock_prefix + storage_key[len(cache.settings.key_prefix):]
                token = os.urandom(16).hex()
                acquired = await tier.call(lambda: backend.acquire_lock(name, token, self._lease or 0.0), None)
                if acquired is False:
                    return
                try:
                    value = await self._compute(cache, local_key, storage_key, args, kwargs, epoch, since)
                finally:
                    if acquired:
                        release = msgpack.packb([cache.sender, "l", name], use_bin_type=True)
                        with anyio.CancelScope(shield=True):
                            await tier.call(lambda: backend.release_lock(name, token, (cache.channel, release)),
                                            False)
            else:
                value = await self._compute(cache, local_key, storage_key, args, kwargs, epoch, since)
            flight.value = value
            flight.done = True
            self.refreshes += 1
        except Exception as exc:
            flight.error = exc
            flight.done = True
            self.stats.errors += 1
            cache.log.failure(f"background refresh of {self.identity}", exc)
        finally:
            if cache._inflight.get(local_key) is flight:
                del cache._inflight[local_key]
            flight.finish()

    def _tags(self, args: Any, kwargs: Any) -> tuple[str, ...]:
        if self._tags_fn is None:
            return self._fixed_tags
        return self._namespace_tags + user_tags(self._tags_fn(**self._keys.arguments(args, kwargs)),
                                                f"tags= of {self.identity}")

    # -- management ---------------------------------------------------------------------------------------

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Remove the entry of these arguments from every tier (for a method, pass the instance first)."""
        cache = self.cache
        local_key = self._keys.local(args, kwargs)
        await cache.remove([local_key], [self._prefix + self._keys.storage_digest(local_key)])

    async def invalidate_all(self) -> None:
        """Remove every entry of this function's namespace from every tier."""
        await self.cache.invalidate_namespace(self._keys.namespace)

    def cache_info(self) -> CacheInfo:
        """Hits, misses, hit rate, per-tier hits, latencies of cached and computed calls, cost saved."""
        info = self.stats.info()
        tiers = dict(info.hits_by_tier)
        memory_hits = self.stats.memory_hits
        if memory_hits:
            name = self._cache.local_name if self._cache is not None else "memory"
            tiers = {name: memory_hits, **tiers}
        return info._replace(hits_by_tier=tiers)

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {self.identity: self.cache_info()._asdict()}

    @property
    def namespace(self) -> str:
        """The namespace of this function's entries."""
        return self._keys.namespace

    def __repr__(self) -> str:
        return f"<FunctionCache of {self.identity}>"


def _returns_array(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is annotated to return a numpy array (then batch results are stacked back)."""
    annotation = inspect.signature(fn).return_annotation
    if annotation is inspect.Signature.empty:
        return False
    if isinstance(annotation, str):
        try:
            annotation = typing.get_type_hints(fn).get("return", annotation)
        except Exception:
            return "ndarray" in annotation or "NDArray" in annotation
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, np.ndarray)


class _BatchCall(NamedTuple):
    """One call of a batch function taken apart: its items and how to rebuild the call around other items."""

    items: list[Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    position: int | None  # where the items are among ``args``; ``None`` when passed by name

    def with_items(self, items: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.position is not None:
            return (*self.args[:self.position], items, *self.args[self.position + 1:]), self.kwargs
        return self.args, {**self.kwargs, name: items}


class BatchFunctionCache(FunctionCache[P, T]):
    """The engine of a list-to-list (or list-to-array) function cached per item: ``multilevel_cached(batch=True)``.

    Each item is keyed with the other arguments as if the function took that one item. A call looks its items
    up in memory, then the rest with one multi-get per tier, calls the function once with only the items still
    missing (in their input order, duplicates once), stores each result under its item's key and returns the
    results in input order: a list, or a numpy array stacked from the rows when the function is annotated to
    return one. Items computed by a concurrent call are waited for, not computed twice.

    Args:
        fn: The batch function.
        batch: Name of the parameter holding the items; ``True`` for the first parameter.
        **options: The options of `FunctionCache` (``lock`` and ``stale`` are not supported here).

    Raises:
        ConfigError: ``batch`` names no parameter, or ``lock``/``stale`` was given.
    """

    def __init__(self, fn: Callable[P, Awaitable[T]], *, batch: bool | str = True, **options: Any) -> None:
        params = list(inspect.signature(fn).parameters.values())
        if batch is True:
            if not params or params[0].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ConfigError("batch", batch, f"{fn!r} has no first parameter to take the items")
            batch = params[0].name
        if not isinstance(batch, str) or batch not in {p.name for p in params}:
            raise ConfigError("batch", batch, "expected True or the name of the parameter that holds the items")
        for option in ("lock", "stale"):
            if options.get(option) not in (None, False):
                raise ConfigError(option, options[option], "not supported with batch=")
        self._batch_name = batch
        # Items recur (that is why they are cached): their storage digests are remembered, within a bound.
        self._digests: dict[Hashable, str] = {}
        index = next(i for i, p in enumerate(params) if p.name == batch)
        self._batch_index = index if params[index].kind is not inspect.Parameter.KEYWORD_ONLY else None
        self._array_output = _returns_array(fn)
        super().__init__(fn, **options)

    def _build_wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        engine = self

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await engine._call_batch(args, kwargs)

        if self._cache is not None:
            self._bind(self._cache)
        functools.update_wrapper(wrapper, self._fn)
        wrapper.cache = self  # type: ignore[attr-defined]
        wrapper.cache_info = self.cache_info  # type: ignore[attr-defined]
        wrapper.invalidate = self.invalidate  # type: ignore[attr-defined]
        wrapper.invalidate_all = self.invalidate_all  # type: ignore[attr-defined]
        wrapper.cache_clear = self.invalidate_all  # type: ignore[attr-defined]
        return wrapper

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _BatchCall:
        position = self._batch_index
        if position is not None and position < len(args):
            items = args[position]
        elif self._batch_name in kwargs:
            items, position = kwargs[self._batch_name], None
        else:
            raise TypeError(f"{self.identity}() missing the items argument {self._batch_name!r}")
        if isinstance(items, str | bytes) or not isinstance(items, Iterable):
            raise TypeError(f"{self.identity}(): {self._batch_name!r} must be a list of items, got "
                            f"{type(items).__qualname__}")
        return _BatchCall(list(items), args, kwargs, position)

    def _rows(self, result: Any, count: int) -> list[Any]:
        if isinstance(result, np.ndarray):
            if result.ndim == 0 or len(result) != count:
                raise ValueError(f"{self.identity} returned an array of shape {result.shape} for {count} items")
            return [row.copy() if isinstance(row, np.ndarray) else row for row in result]
        if isinstance(result, str | bytes) or not isinstance(result, Iterable):
            raise TypeError(f"{self.identity} must return a list or an array, got {type(result).__qualname__}")
        rows = list(result)
        if len(rows) != count:
            raise ValueError(f"{self.identity} returned {len(rows)} results for {count} items")
        return rows

    def _output(self, rows: list[Any]) -> T:
        if self._array_output:
            return cast(T, np.stack(rows) if rows else np.empty((0,)))
        return cast(T, rows)

    async def _call_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        cache = self.cache
        call = self._split(args, kwargs)
        if not call.items:
            return await self._fn(*args, **kwargs)
        name = self._batch_name
        local_of = self._keys.local
        if self._keys.fast_arity == 1 and call.position == 0 and len(args) == 1 and not kwargs:
            # The items are the only argument: a scalar item's key is what KeyBuilder.local makes, built here.
            token = self._keys.token
            keys = [(token, (item,)) if type(item) in FAST_TYPES else local_of((item,), {}) for item in call.items]
        else:
            keys = [local_of(*call.with_items(item, name)) for item in call.items]
        first: dict[Hashable, Any] = {}
        for key, item in zip(keys, call.items, strict=True):
            first.setdefault(key, item)
        values: dict[Hashable, Any] = {}
        stats = self.stats
        local = cache.local
        if local is not None:
            slots, now = local.slots, cache.clock()
            for key in first:
                slot = slots.get(key)
                if slot is not None and (slot[EXPIRES_AT] is None or slot[EXPIRES_AT] > now):
                    slots.move_to_end(key)
                    values[key] = slot[VALUE]
            cache.local_stats.misses += len(first) - len(values)
        stats.hits += len(values)
        if len(values) < len(first):
            await self._fill(cache, call, first, values)
        rows = [values[key] for key in keys]
        if self._cost is not None:
            for key in values:
                self._count_cost(values[key])
        return self._output(rows)

    async def _fill(self, cache: TieredCache, call: _BatchCall, first: dict[Hashable, Any],
                    values: dict[Hashable, Any]) -> None:
        """Find the missing items in the lower tiers, compute the rest in one call, store them.

        The items this call looks up are registered as in flight (one shared `Flight` whose ``value`` is a
        dict by key), so a concurrent call wanting one of them waits for it instead of computing it again.
        """
        stats = self.stats
        await cache.follow_invalidations()
        epoch, since = cache.epoch, cache.failures
        inflight = cache._inflight
        mine: list[Hashable] = []
        theirs: dict[Hashable, Flight] = {}
        flight = Flight()
        results: dict[Hashable, Any] = {}
        flight.value = results
        for key in first:
            if key in values:
                continue
            other = inflight.get(key)
            if other is not None:
                theirs[key] = other
            else:
                inflight[key] = flight
                mine.append(key)
        try:
            if mine and cache.tiers:
                prefix, digests, digest_of = self._prefix, self._digests, self._keys.storage_digest
                if len(digests) > _DIGEST_MEMO:
                    digests.clear()
                storage = []
                for key in mine:
                    digest = digests.get(key)
                    if digest is None:
                        digest = digests[key] = digest_of(key)
                    storage.append(prefix + digest)
                started = time.perf_counter()
                found = await cache.read_lower_many(mine, storage, stats, epoch=epoch)
                if found:
                    stats.hits += len(found)
                    stats.cached_latency.add(time.perf_counter() - started)
                for i, value in found.items():
                    values[mine[i]] = value
            todo = [key for key in mine if key not in values]
            if todo:
                await self._compute_items(cache, call, first, todo, values, epoch, since)
            for key in mine:
                results[key] = values[key]
            flight.done = True
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        finally:
            for key in mine:
                if inflight.get(key) is flight:
                    del inflight[key]
            flight.finish()
        retry: list[Hashable] = []
        for key, other in theirs.items():
            if not other.done:
                await other.wait()
            value = other.value.get(key, MISSING) if isinstance(other.value, dict) else MISSING
            if other.done and other.error is None and value is not MISSING:
                values[key] = value
                stats.hits += 1
                stats.hits_by_tier["in-flight"] = stats.hits_by_tier.get("in-flight", 0) + 1
            else:
                retry.append(key)
        if retry:
            # The concurrent call that was computing these failed or was cancelled: compute them here.
            await self._compute_items(cache, call, first, retry, values, cache.epoch, cache.failures)

    async def _compute_items(self, cache: TieredCache, call: _BatchCall, first: dict[Hashable, Any],
                             todo: list[Hashable], values: dict[Hashable, Any], epoch: int, since: int) -> None:
        stats = self.stats
        stats.misses += len(todo)
        f_args, f_kwargs = call.with_items([first[key] for key in todo], self._batch_name)
        started = time.perf_counter()
        result = await self._fn(*f_args, **f_kwargs)
        stats.computed_latency.add(time.perf_counter() - started)
        rows = self._rows(result, len(todo))
        ttl = self._expiry_default
        expires_at = cache.clock() + ttl if ttl is not None else None
        entries: list[tuple[Hashable, str, Any, float | None, tuple[str, ...]]] = []
        for key, row in zip(todo, rows, strict=True):
            values[key] = row
            item_args, item_kwargs = call.with_items(first[key], self._batch_name)
            try:
                tags = self._tags(item_args, item_kwargs)
            except Exception as exc:
                stats.errors += 1
                cache.log.failure(f"tags= of {self.identity}", exc)
                if cache.strict:
                    raise
                continue
            digest = self._digests.get(key)
            storage_key = self._prefix + (digest if digest is not None else self._keys.storage_digest(key))
            if not cache.invalidated_since(epoch, storage_key, tags):
                entries.append((key, storage_key, row, expires_at, tags))
        try:
            await cache.write_many(entries, stats, since=since)
        except (SerializationError, BackendError):
            if cache.strict:
                raise

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Remove the entries of the items of this call (same arguments as the function) from every tier."""
        cache = self.cache
        call = self._split(args, kwargs)
        keys = list(dict.fromkeys(self._keys.local(*call.with_items(item, self._batch_name))
                                  for item in call.items))
        await cache.remove(keys, [self._prefix + self._keys.storage_digest(key) for key in keys])
