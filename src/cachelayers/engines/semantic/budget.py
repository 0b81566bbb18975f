"""The process-wide bound of the semantic cache: every function's entries, all partitions, counted together.

Each `SemanticStore` registers here when it is made. Every entry carries a stamp from one process-wide counter,
renewed when it is used, so the least recently used entry of the whole process is the one with the smallest
stamp among the first entries of each store's LRU order. After an insert, while the stores together hold
more than ``Settings.semantic_max_entries``, that entry is evicted (from whichever function it belongs to).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["Budgeted", "ProcessBudget", "budget"]


class Budgeted(Protocol):
    """What the budget needs of a store: its entries, its LRU order, and whether it can evict now."""

    entries: dict[int, Any]
    lru: Any

    def usable(self) -> bool: ...


class ProcessBudget:
    """The stores of the process and the counter that orders their entries by last use."""

    __slots__ = ("_counter", "_stores")

    def __init__(self) -> None:
        self._stores: weakref.WeakSet[Any] = weakref.WeakSet()
        self._counter = itertools.count()

    def register(self, store: Budgeted) -> None:
        """Count ``store``'s entries from now on (until it is collected)."""
        self._stores.add(store)

    def stamp(self) -> int:
        """A number larger than every one given before: the moment of an entry's last use."""
        return next(self._counter)

    def stores(self) -> Iterator[Budgeted]:
        """The live stores."""
        return iter(list(self._stores))

    def total(self) -> int:
        """Entries of every live store together."""
        return sum(len(store.entries) for store in self.stores())

    def oldest(self) -> tuple[Budgeted, Any] | None:
        """The store and entry used least recently among all stores that can evict on this loop."""
        best: tuple[Budgeted, Any] | None = None
        for store in self.stores():
            if not store.lru or not store.usable():
                continue
            entry = store.entries[next(iter(store.lru))]
            if best is None or entry.used < best[1].used:
                best = (store, entry)
        return best


budget = ProcessBudget()
"""The budget of this process."""
