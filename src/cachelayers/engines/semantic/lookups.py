"""How each call of a semantically cached function was answered: `Lookup`, `explain` and `last_lookup`."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from cachelayers.engines.tiered.control import set_reporter, unwatch, watch
from cachelayers.verifiers import same_words

__all__ = ["Candidate", "Explanation", "Level", "Lookup", "Verifier", "ambiguous", "explain", "last_lookup",
           "record"]

Level = Literal["exact", "semantic", "computed", "uncached"]


@dataclass(frozen=True, slots=True)
class Lookup:
    """How one call of a semantically cached function was answered.

    Attributes:
        function: The function's identity.
        level: ``"exact"``, ``"semantic"``, ``"computed"`` or ``"uncached"``.
        similarity: Cosine similarity of the entry that answered (1.0 for ``exact``); for ``computed``, of the
            best candidate that fell short (``None`` when the partition was empty).
        matched_text: The semantic text of the entry that answered (``None`` unless exact or semantic).
        text: The call's own semantic text.
        partition: Hex digest of the call's partition.
        rejected: Candidates above the threshold that the verifier rejected.
        reason: Why the call was ``uncached``, or ``None``.
        tier: For a `multilevel_cached` call answered from the cache, the tier that answered (``"memory"``, a
            tier's name, ``"stale"``); for a call of either decorator that joined the identical call running and
            got its result, ``"in-flight"``; else ``None``.
        decorator: ``"semantic_cached"``, or ``"multilevel_cached"`` for an exact cache's lookup.
    """

    function: str
    level: Level
    similarity: float | None
    matched_text: str | None
    text: str | None
    partition: str
    rejected: int = 0
    reason: str | None = None
    tier: str | None = None
    decorator: str = "semantic_cached"


class Explanation:
    """The `Lookup` of every semantically cached call made inside an `explain` block, in order."""

    __slots__ = ("_lookups", "_outer")

    def __init__(self, outer: Explanation | None = None) -> None:
        self._lookups: list[Lookup] = []
        self._outer = outer  # the enclosing block, which collects the calls of this one too

    def __iter__(self) -> Iterator[Lookup]:
        return iter(self._lookups)

    def __len__(self) -> int:
        return len(self._lookups)

    def __getitem__(self, index: int) -> Lookup:
        return self._lookups[index]

    @property
    def last(self) -> Lookup | None:
        """The most recent lookup, or ``None``."""
        return self._lookups[-1] if self._lookups else None

    def levels(self, decorator: str | None = "semantic_cached") -> dict[str, int]:
        """How many calls were answered at each level.

        Args:
            decorator: Count the lookups of this decorator only (``"semantic_cached"`` by default, or
                ``"multilevel_cached"``); ``None`` for all.
        """
        counts: dict[str, int] = {}
        for lookup in self._lookups:
            if decorator is None or lookup.decorator == decorator:
                counts[lookup.level] = counts.get(lookup.level, 0) + 1
        return counts

    def __repr__(self) -> str:
        return f"Explanation({self._lookups!r})"


_explanation: contextvars.ContextVar[Explanation | None] = contextvars.ContextVar("cachelayers_explain",
                                                                                 default=None)
_last: contextvars.ContextVar[Lookup | None] = contextvars.ContextVar("cachelayers_last_lookup", default=None)


@contextmanager
def explain() -> Iterator[Explanation]:
    """Collect how each semantically cached call in the block was answered, and each `multilevel_cached` call
    (with the tier that answered it in `Lookup.tier`).

    Calls made in tasks started inside the block are collected too (the collector travels with the
    context), and calls of sync functions made in the block's thread; a block inside another gives its calls
    to both. The return values of the calls are untouched.

    Example::

        with cachelayers.explain() as info:
            answer = await ask("How do I reset my password?")
        print(info.last.level, info.last.similarity, info.last.matched_text)
    """
    collector = Explanation(_explanation.get())
    token = _explanation.set(collector)
    watch()  # exact calls leave their compiled hit path to report, while any explain block is open
    try:
        yield collector
    finally:
        unwatch()
        _explanation.reset(token)


def last_lookup() -> Lookup | None:
    """How the last semantically cached call awaited in this task (or its context) was answered.

    `multilevel_cached` calls are reported only while an `explain` block is open (anywhere in the process): a
    memory hit outside one does not pay for recording its lookup.
    """
    return _last.get()


def record(lookup: Lookup) -> None:
    """Make ``lookup`` the last one of this context, and add it to the enclosing `explain` block if any."""
    _last.set(lookup)
    collector = _explanation.get()
    while collector is not None:
        collector._lookups.append(lookup)
        collector = collector._outer


def _record_exact(function: str, level: str, tier: str | None, partition: str, reason: str | None) -> None:
    """How a `multilevel_cached` call was answered: ``exact`` from ``tier``, ``computed`` or ``uncached``."""
    record(Lookup(function, level, 1.0 if level == "exact" else None, None, None, partition,  # type: ignore[arg-type]
                  0, reason, tier, "multilevel_cached"))


set_reporter(_record_exact)


class Candidate(NamedTuple):
    """A cached entry offered to a verifier: its semantic text, its value and its similarity to the call."""

    text: str
    value: Any
    similarity: float


Verifier = Callable[[str, Candidate], Awaitable[bool] | bool]
"""A ``(text, Candidate) -> bool``, async or plain, that must accept a candidate before it is served."""


def ambiguous(nearest: str, similarity: float, others: Iterable[tuple[str, float]], margin: float) -> bool:
    """The margin rule: whether the nearest entry (text ``nearest``, at ``similarity``) is less than ``margin``
    more similar than the next *other question* among ``others`` (``(text, similarity)``, best first). A runner-up
    with the nearest's words (`cachelayers.embedders.same_words`: one question stored twice) is passed over;
    an empty text (an encrypted entry) never has the same words."""
    for text, other in others:
        if not (nearest and text and same_words(nearest, text)):
            return similarity - other < margin
    return False
