"""Tags as the exact cache names them (a namespace is invalidated as the tag its entries carry first), and
which recent invalidations cover an entry."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

__all__ = ["NAMESPACE_TAG", "covered_since", "namespace_tag", "user_tags"]

NAMESPACE_TAG: Final = "ns\x1f"
"""The start of every namespace tag; user tags may not take this form."""


def namespace_tag(namespace: str) -> str:
    """The tag every entry of ``namespace`` carries, so a namespace is invalidated like a tag.

    It is an entry's first tag; user tags may not take its form (see `user_tags`).
    """
    return NAMESPACE_TAG + namespace


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
        if tag.startswith(NAMESPACE_TAG):
            raise ValueError(f"{origin}: tag {tag!r} starts with {NAMESPACE_TAG!r}, reserved for namespace tags")
        checked.append(tag)
    return tuple(checked)


def covered_since(recent: Sequence[tuple[int, str, list[str]]], epoch: int, storage_key: str,
                  tags: Iterable[str]) -> bool:
    """Whether an invalidation in ``recent`` (``(serial, kind, items)``, oldest first) made after ``epoch`` covers
    the entry of ``storage_key`` with ``tags``; also when ``recent`` no longer reaches back that far."""
    if not recent or recent[0][0] > epoch + 1:
        return True
    tags = tuple(tags)
    for serial, kind, items in reversed(recent):
        if serial <= epoch:
            break
        if kind == "c" or (kind == "k" and storage_key in items) or (kind == "t" and any(t in items for t in tags)):
            return True
    return False
