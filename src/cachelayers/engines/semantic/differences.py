"""Long texts that share most of their words are compared by the words that differ.

A prompt of forty sentences of retrieved context and one question at the end has the same vector as the same
context with another question: the context outweighs the question (an embedder also reads only its first few
hundred tokens). Similarity of the whole then says nothing about what is asked. When two long texts share a
beginning and an end that make up at least half of the shorter one, the engine compares the parts in between
instead: embedded on their own, they must be as similar as the threshold asks (and pass the verifier, if any).
"""

from __future__ import annotations

from typing import Final

from cachelayers.verifiers import same_words

__all__ = ["LONG_TEXT_WORDS", "differing_parts", "parts_are_alike"]

LONG_TEXT_WORDS: Final = 40
"""Texts of at least this many words (both) that share most of them are compared by what differs."""

_MIN_CHARS: Final = LONG_TEXT_WORDS * 2  # no text this short has LONG_TEXT_WORDS words


def differing_parts(text: str, other: str) -> tuple[str, str] | None:
    """The parts of two long texts between the words they begin and end with in common (case apart), when those
    shared words make up at least half of the shorter text; ``None`` otherwise (short texts, or texts that
    differ throughout, are compared whole). Either part may be empty: one text is the other with words added.
    """
    if len(text) < _MIN_CHARS or len(other) < _MIN_CHARS:
        return None
    a, b = text.split(), other.split()
    shorter = min(len(a), len(b))
    if shorter < LONG_TEXT_WORDS:
        return None
    head = 0
    while head < shorter and a[head].casefold() == b[head].casefold():
        head += 1
    tail = 0
    while tail < shorter - head and a[-1 - tail].casefold() == b[-1 - tail].casefold():
        tail += 1
    if 2 * (head + tail) < shorter:
        return None
    return " ".join(a[head:len(a) - tail]), " ".join(b[head:len(b) - tail])


def parts_are_alike(text_part: str, other_part: str) -> bool | None:
    """The verdict on two differing parts that needs no embedding: ``True`` when they are the same words (or both
    empty), ``False`` when one is empty (words were added: what they change is unknown); ``None`` when the parts
    must be embedded and compared."""
    if same_words(text_part, other_part) or not (text_part.strip() or other_part.strip()):
        return True
    if not (text_part.strip() and other_part.strip()):
        return False
    return None
