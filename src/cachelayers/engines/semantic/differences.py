"""Long texts that share most of their words are compared by the words that differ.

A prompt of forty sentences of retrieved context and one question at the end has the same vector as the same
context with another question: the context outweighs the question (an embedder also reads only its first few
hundred tokens). Similarity of the whole then says nothing about what is asked. When two long texts share words,
in order, that make up at least half of the shorter one, the engine compares the words that differ instead
(all of them, wherever they are: a header and a question): embedded on their own, they must be as similar as
the threshold asks (and pass the verifier, if any). When they differ only in case or punctuation, the verifier
(if any) judges the whole texts.
"""

from __future__ import annotations

import difflib
from typing import Final

from cachelayers.verifiers import same_words

__all__ = ["LONG_TEXT_WORDS", "MAX_ALIGNED_WORDS", "differing_parts", "parts_are_alike"]

LONG_TEXT_WORDS: Final = 40
"""Texts of at least this many words (both) that share most of them are compared by what differs."""

MAX_ALIGNED_WORDS: Final = 20_000
"""The longest middle (between a shared beginning and end) aligned word by word: about 100 ms on this machine."""

_MIN_CHARS: Final = LONG_TEXT_WORDS * 2  # no text this short has LONG_TEXT_WORDS words


def differing_parts(text: str, other: str) -> tuple[str, str] | None:
    """What differs between two long texts that share most of their words (case apart): the words of each that
    the other does not have in the same place, in order, when the shared words make up at least half of the
    shorter text; ``None`` otherwise (short texts, or texts that differ throughout, are compared whole). Either
    part may be empty (one text is the other with words added); both are when only case differs.

    A beginning and an end in common are found first (cheap); what lies between is aligned word by word
    (`difflib`), so that a prompt whose header and question both changed has both in its parts. Texts whose
    middles exceed `MAX_ALIGNED_WORDS` are not aligned: their parts are returned as they are.
    """
    if len(text) < _MIN_CHARS or len(other) < _MIN_CHARS:
        return None
    a, b = text.split(), other.split()
    shorter = min(len(a), len(b))
    if shorter < LONG_TEXT_WORDS:
        return None
    fa, fb = [w.casefold() for w in a], [w.casefold() for w in b]
    head = 0
    while head < shorter and fa[head] == fb[head]:
        head += 1
    tail = 0
    while tail < shorter - head and fa[-1 - tail] == fb[-1 - tail]:
        tail += 1
    middle_a, middle_b = slice(head, len(a) - tail), slice(head, len(b) - tail)
    shared = head + tail
    if max(len(a), len(b)) - shared > MAX_ALIGNED_WORDS:
        if 2 * shared < shorter:
            return None
        return " ".join(a[middle_a]), " ".join(b[middle_b])
    matcher = difflib.SequenceMatcher(None, fa[middle_a], fb[middle_b])
    shared += sum(block.size for block in matcher.get_matching_blocks())
    if 2 * shared < shorter:
        return None
    mine: list[str] = []
    theirs: list[str] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            mine += a[head + i1:head + i2]
            theirs += b[head + j1:head + j2]
    return " ".join(mine), " ".join(theirs)


def parts_are_alike(text_part: str, other_part: str) -> bool | None:
    """The verdict on two differing parts that needs no embedding: ``True`` when they are the same words (or both
    empty), ``False`` when one is empty (words were added: what they change is unknown); ``None`` when the parts
    must be embedded and compared."""
    if same_words(text_part, other_part) or not (text_part.strip() or other_part.strip()):
        return True
    if not (text_part.strip() and other_part.strip()):
        return False
    return None
