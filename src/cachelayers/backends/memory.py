"""The in-process memory tier: LRU bounded by entries and bytes, with absolute expiry and tags.

As the first tier it stores live Python objects under local keys, so a hit is a dict lookup; the engine
gives it the encoded size of each value so the byte bound is exact. As a lower tier (or for any caller of the
`Backend` contract) it stores envelopes like every other backend.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, Final, TypeAlias

from cachelayers.backends.base import MISSING, Backend, BackendURL, Clock, LocalTier, StoreItem
from cachelayers.durations import parse_size
from cachelayers.errors import ConfigError

__all__ = ["EXPIRES_AT", "MISSING", "SIZE", "STORAGE_KEY", "TAGS", "VALUE", "MemoryBackend", "Slot"]

DEFAULT_MAX_ENTRIES: Final = 10_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
_SLOT_OVERHEAD: Final = 64  # bytes charged per entry beyond its encoded size: keys and bookkeeping


Slot: TypeAlias = tuple[Any, float | None, int, tuple[str, ...], str | None]
"""One stored entry: ``(value, expires_at, size, tags, storage_key)``, read with the index constants below.

A plain tuple, not a class: one is made and one freed on every miss, and a tuple costs a quarter as much.
"""

VALUE: Final = 0
"""Index in a `Slot` of the stored value."""
EXPIRES_AT: Final = 1
"""Index in a `Slot` of the absolute expiry (``clock()`` time), or ``None``."""
SIZE: Final = 2
"""Index in a `Slot` of the bytes charged against ``max_bytes``."""
TAGS: Final = 3
"""Index in a `Slot` of the tags `MemoryBackend.remove_tags` finds the entry by."""
STORAGE_KEY: Final = 4
"""Index in a `Slot` of the name other tiers give the entry, or ``None``."""


_NO_SLOTS: Final[OrderedDict[Hashable, Slot]] = OrderedDict()


def _peek_function(data: OrderedDict[Hashable, Slot], clock: Clock) -> Callable[[Hashable], Any]:
    """`MemoryBackend.peek` for ``data``: a closure, whose cells are the fastest loads Python has."""
    get, move_to_end, missing = data.get, data.move_to_end, MISSING

    def peek(key: Hashable) -> Any:
        slot = get(key)
        if slot is not None:
            expires_at = slot[1]  # EXPIRES_AT
            if expires_at is None or expires_at > clock():
                move_to_end(key)
                return slot[0]  # VALUE
        return missing

    return peek


class MemoryBackend(Backend, LocalTier):
    """LRU memory tier.

    URL: ``memory://?max_entries=10000&max_bytes=64MiB``. Both bounds always hold: inserting past either
    evicts least recently used entries first; an entry larger than ``max_bytes`` is not stored. As the first
    tier it is the engine's `LocalTier`.
    """

    schemes = ("memory",)
    options = frozenset({"max_entries", "max_bytes", "name"})

    INLINE_PEEK: ClassVar[str] = (
        "{tmp} = {p0}({key})\n"
        "if {tmp} is None:\n"
        "    {value} = {missing}\n"
        "else:\n"
        "    {value} = {tmp}[1]\n"
        "    if {value} is None or {value} > {p2}():\n"
        "        {p1}({key})\n"
        "        {value} = {tmp}[0]\n"
        "    else:\n"
        "        {value} = {missing}\n"
    )
    """`peek` inlined: the slot by key, its expiry (index 1), the value (index 0), marked recently used."""

    def peek_parts(self) -> tuple[Any, ...]:
        """What `INLINE_PEEK` reads: the slots' ``get``, their ``move_to_end`` and the clock."""
        return (self._data.get, self._data.move_to_end, self.clock)

    @classmethod
    def idle_peek_parts(cls) -> tuple[Any, ...]:
        """`INLINE_PEEK`'s parts over no slots at all."""
        return (_NO_SLOTS.get, _NO_SLOTS.move_to_end, time.time)

    def __init__(self, url: BackendURL | None = None, *, clock: Clock = time.time,
                 max_entries: int | None = None, max_bytes: int | None = None) -> None:
        url = url or BackendURL.parse("memory://")
        super().__init__(url, clock=clock)
        self.validate_url(url)
        if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, int)
                                        or max_entries <= 0):
            raise ConfigError("max_entries", max_entries, "must be a positive integer")
        self.max_entries = max_entries or int(url.options.get("max_entries", DEFAULT_MAX_ENTRIES))
        self.max_bytes = (parse_size(max_bytes, "max_bytes") if max_bytes is not None else
                          parse_size(url.options.get("max_bytes", DEFAULT_MAX_BYTES), url.option_field("max_bytes")))
        self._data: OrderedDict[Hashable, Slot] = OrderedDict()
        self.slots = self._data
        """The entries, least recently used first, read with the `Slot` index constants (read-only: every
        change goes through this class)."""
        self.peek = _peek_function(self._data, self.clock)
        self._tags: dict[str, set[Hashable]] = {}
        self._by_storage_key: dict[str, Hashable] = {}
        self.bytes_used = 0
        self.evictions = 0

    @classmethod
    def validate_url(cls, url: BackendURL) -> None:
        """Check ``max_entries`` and ``max_bytes``."""
        super().validate_url(url)
        if url.host or url.path not in ("", "/"):
            raise ConfigError(url.field, url.url, "memory:// takes no host or path, only ?max_entries=&max_bytes=")
        raw = url.options.get("max_entries")
        if raw is not None and (not raw.isdecimal() or int(raw) <= 0):
            raise ConfigError(url.option_field("max_entries"), raw, "must be a positive integer")
        if "max_bytes" in url.options:
            parse_size(url.options["max_bytes"], url.option_field("max_bytes"))

    def __len__(self) -> int:
        return len(self._data)

    # -- the object interface used by the engine for the first tier -------------------------------------

    def lookup(self, key: Hashable) -> Any:
        """Return the value under ``key`` and mark it recently used, or `MISSING`."""
        slot = self._data.get(key)
        if slot is None:
            return MISSING
        expires_at = slot[EXPIRES_AT]
        if expires_at is not None and expires_at <= self.clock():
            self._remove(key, slot)
            return MISSING
        self._data.move_to_end(key)
        return slot[VALUE]

    def peek_stale(self, key: Hashable, grace: float) -> Any:
        """The value under ``key`` if it expired less than ``grace`` seconds ago (marking it used), else `MISSING`."""
        slot = self._data.get(key)
        if slot is None:
            return MISSING
        expires_at = slot[EXPIRES_AT]
        if expires_at is None or not expires_at <= self.clock() < expires_at + grace:
            return MISSING
        self._data.move_to_end(key)
        return slot[VALUE]

    def lookup_entry(self, key: Hashable) -> tuple[Any, float | None] | None:
        """Return ``(value, expires_at)`` under ``key`` (marking it used), or ``None``."""
        value = self.lookup(key)
        if value is MISSING:
            return None
        return value, self._data[key][EXPIRES_AT]

    def store(self, key: Hashable, value: Any, size: int, expires_at: float | None,
              tags: tuple[str, ...] = (), storage_key: str | None = None) -> bool:
        """Store ``value`` under ``key``; return ``False`` when it is larger than the byte bound.

        Args:
            key: The local key.
            value: What a hit returns.
            size: Bytes to charge against ``max_bytes`` (the value's encoded size); a fixed per-entry
                overhead is added.
            expires_at: Absolute expiry (``clock()`` time), or ``None``.
            tags: Tags `remove_tags` finds the entry by.
            storage_key: The name other tiers give the entry, for `remove_storage_keys`.

        The engine calls this on every miss, so its arguments are positional and eviction is inline.
        """
        size += _SLOT_OVERHEAD
        data = self._data
        old = data.get(key)
        if old is not None:
            self._remove(key, old)
        max_bytes = self.max_bytes
        if size > max_bytes or (expires_at is not None and expires_at <= self.clock()):
            return False
        data[key] = (value, expires_at, size, tags, storage_key)
        if tags or storage_key is not None:
            self._index(key, tags, storage_key)
        used = self.bytes_used + size
        if len(data) > self.max_entries or used > max_bytes:
            max_entries = self.max_entries
            evicted = 0
            while len(data) > max_entries or used > max_bytes:
                victim, victim_slot = data.popitem(False)
                used -= victim_slot[SIZE]
                evicted += 1
                if victim_slot[TAGS] or victim_slot[STORAGE_KEY] is not None:
                    self._unindex(victim, victim_slot)
            self.evictions += evicted
        self.bytes_used = used
        return True

    def remove(self, key: Hashable) -> bool:
        """Remove ``key``; return whether it was there."""
        slot = self._data.get(key)
        if slot is None:
            return False
        self._remove(key, slot)
        return True

    def remove_storage_keys(self, storage_keys: Sequence[str]) -> int:
        """Remove the entries stored under these storage keys (as other tiers name them)."""
        removed = 0
        for storage_key in storage_keys:
            key = self._by_storage_key.get(storage_key)
            if key is not None and self.remove(key):
                removed += 1
        return removed

    def remove_tags(self, tags: Sequence[str]) -> int:
        """Remove every entry carrying any of ``tags``; return how many were removed."""
        removed = 0
        for tag in tags:
            for key in list(self._tags.get(tag, ())):
                if self.remove(key):
                    removed += 1
        return removed

    def remove_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key satisfies ``predicate``; return how many were removed.

        This scans every entry: it is for rare, wholesale invalidations (the engine finds a namespace's
        entries this way instead of indexing each entry under its namespace).
        """
        doomed = [key for key in self._data if predicate(key)]
        for key in doomed:
            self.remove(key)
        return len(doomed)

    def _remove(self, key: Hashable, slot: Slot) -> None:
        del self._data[key]
        self.bytes_used -= slot[SIZE]
        self._unindex(key, slot)

    def _index(self, key: Hashable, tags: tuple[str, ...], storage_key: str | None) -> None:
        index = self._tags
        for tag in tags:
            members = index.get(tag)
            if members is None:
                index[tag] = {key}
            else:
                members.add(key)
        if storage_key is not None:
            self._by_storage_key[storage_key] = key

    def _unindex(self, key: Hashable, slot: Slot) -> None:
        for tag in slot[TAGS]:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]
        storage_key = slot[STORAGE_KEY]
        if storage_key is not None and self._by_storage_key.get(storage_key) == key:
            del self._by_storage_key[storage_key]

    def clear_now(self) -> None:
        """Remove everything, synchronously."""
        self._data.clear()
        self._tags.clear()
        self._by_storage_key.clear()
        self.bytes_used = 0

    # -- the Backend contract (envelopes under storage keys) --------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the envelopes stored under ``keys``."""
        out: list[bytes | None] = []
        for key in keys:
            value = self.lookup(key)
            out.append(None if value is MISSING else value)
        return out

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        """Store envelopes, charging their length against the byte bound."""
        for item in items:
            self.store(item.key, item.blob, len(item.blob), item.expires_at, item.tags)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the keys."""
        for key in keys:
            self.remove(key)

    async def delete_tags(self, tags: Sequence[str]) -> None:
        """Remove every key under any of the tags."""
        self.remove_tags(tags)

    async def clear(self) -> None:
        """Remove everything."""
        self.clear_now()
