"""The options of `batched` and `Batcher`, declared once."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import Any, Literal, TypedDict

__all__ = ["BatchOptions", "QueueFullPolicy", "default_key"]

QueueFullPolicy = Literal["wait", "raise"]


class BatchOptions(TypedDict, total=False):
    """The keyword options of `cachelayers.batched` (and of `Batcher`): each is documented on `batched`."""

    max_size: int
    max_wait: float | str | timedelta
    max_weight: float | None
    weight: Callable[[Any], float] | None
    max_concurrency: int | None
    max_queue: int | None
    queue_full: QueueFullPolicy
    key: Callable[[Any], Hashable] | None
    dedupe: bool
    name: str | None


def default_key(item: object) -> Hashable | None:
    """The item itself when hashable, tagged with its type unless a str (so ``1``, ``1.0`` and ``True`` differ)."""
    if type(item) is str:
        return item
    try:
        hash(item)
    except TypeError:
        return None
    return (type(item), item)
