"""How the memcached tier names and frames what it stores: pure functions, no driver.

Memcached keys are at most 250 bytes of printable ASCII without spaces, while the contract allows any text:
a key that fits is kept readable (``<namespace>:<key>``), any other is replaced by a digest
(``<namespace>~h<hex>``). The store's own bookkeeping lives under ``<namespace>~g`` (the generation token)
and ``<namespace>~t<hex>`` (a tag's version token); ``:`` and ``~`` after the namespace keep the three
forms apart.

The generation key holds a *record*: the generation token and, for each key prefix cleared on its own
(`clear_prefix`), that prefix's token. An entry keeps its *stamp*: the generation token and the tokens of the
cleared prefixes its key starts with, as they were when it was written; it is current while its stamp equals
the one the current record gives its key.

A stored value is a frame around the engine's envelope::

    magic (2) | expiry (float64, NaN = never) | stamp length (uint16) | tag count (uint16) | stamp
    | per tag: name length (uint16), name (UTF-8), version token (8) | envelope
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from typing import Final, NamedTuple

__all__ = ["TOKEN_BYTES", "Frame", "Record", "data_key", "frame", "generation_key", "new_token", "tag_key",
           "unframe", "valid_namespace"]

MAGIC: Final = b"\xc1\x4d"
TOKEN_BYTES: Final = 8
_HEAD: Final = struct.Struct(">2sdHH")
_TAG_LEN: Final = struct.Struct(">H")
_READABLE: Final = re.compile(r"[\x21-\x7e]{1,200}")
_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class Frame(NamedTuple):
    """A stored value taken apart."""

    stamp: bytes
    """The generation and prefix tokens the entry was written under (see `Record.stamp`)."""
    expires_at: float | None
    tags: tuple[tuple[str, bytes], ...]
    """``(tag, version token)`` per tag, as they were when the entry was written."""
    envelope: bytes


def valid_namespace(namespace: str) -> bool:
    """Whether ``namespace`` can start memcached keys (1 to 32 of ``A-Z a-z 0-9 _ . -``)."""
    return _NAMESPACE.fullmatch(namespace) is not None


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()


def data_key(namespace: str, key: str) -> bytes:
    """The memcached key of storage key ``key``: readable when it can be, a digest otherwise."""
    if _READABLE.fullmatch(key):
        return f"{namespace}:{key}".encode("ascii")
    return f"{namespace}~h{_digest(key)}".encode("ascii")


def generation_key(namespace: str) -> bytes:
    """The key of the store's generation token (replaced by `clear`)."""
    return f"{namespace}~g".encode("ascii")


def tag_key(namespace: str, tag: str) -> bytes:
    """The key of ``tag``'s version token (removed by `delete_tags`)."""
    return f"{namespace}~t{_digest(tag)}".encode("ascii")


def new_token() -> bytes:
    """A fresh random token: a replaced token never comes back, even after memcached evicted it."""
    return os.urandom(TOKEN_BYTES)


class Record(NamedTuple):
    """What the generation key holds: the generation token and the tokens of separately cleared prefixes."""

    generation: bytes
    prefixes: tuple[tuple[str, bytes], ...] = ()
    """``(prefix, token)``, sorted by prefix."""

    @classmethod
    def fresh(cls) -> Record:
        """A record with a new generation and no cleared prefix (what `clear` leaves)."""
        return cls(new_token())

    def encode(self) -> bytes:
        """The bytes stored under the generation key."""
        return self.generation + _pairs(self.prefixes)

    @classmethod
    def decode(cls, value: bytes) -> Record | None:
        """The record in ``value``; ``None`` when it is not one."""
        if len(value) < TOKEN_BYTES:
            return None
        pairs = _unpairs(value, TOKEN_BYTES, None)
        return None if pairs is None or pairs[1] != len(value) else cls(value[:TOKEN_BYTES], pairs[0])

    def with_prefix_cleared(self, prefix: str) -> Record:
        """The record after `clear_prefix(prefix)`: ``prefix`` gets a new token."""
        kept = dict(self.prefixes)
        kept[prefix] = new_token()
        return Record(self.generation, tuple(sorted(kept.items())))

    def stamp(self, key: str) -> bytes:
        """What an entry under storage key ``key`` written now records, and must still match when read."""
        return self.generation + _pairs(tuple(pair for pair in self.prefixes if key.startswith(pair[0])))


def _pairs(pairs: tuple[tuple[str, bytes], ...]) -> bytes:
    out = [_TAG_LEN.pack(len(pairs))]
    for name, token in pairs:
        encoded = name.encode("utf-8", "surrogatepass")
        out += [_TAG_LEN.pack(len(encoded)), encoded, token]
    return b"".join(out)


def _unpairs(value: bytes, offset: int, count: int | None) -> tuple[tuple[tuple[str, bytes], ...], int] | None:
    """Read ``count`` pairs (a leading count when ``None``) from ``offset``; the pairs and the offset after."""
    try:
        if count is None:
            (count,) = _TAG_LEN.unpack_from(value, offset)
            offset += _TAG_LEN.size
        pairs: list[tuple[str, bytes]] = []
        for _ in range(count):
            (length,) = _TAG_LEN.unpack_from(value, offset)
            offset += _TAG_LEN.size
            name = value[offset:offset + length]
            if len(name) != length:
                return None
            offset += length
            token = value[offset:offset + TOKEN_BYTES]
            if len(token) != TOKEN_BYTES:
                return None
            offset += TOKEN_BYTES
            pairs.append((name.decode("utf-8", "surrogatepass"), token))
    except (struct.error, UnicodeDecodeError):
        return None
    return tuple(pairs), offset


def frame(stamp: bytes, expires_at: float | None, tags: tuple[tuple[str, bytes], ...], envelope: bytes) -> bytes:
    """The stored value of an entry."""
    parts = [_HEAD.pack(MAGIC, math.nan if expires_at is None else expires_at, len(stamp), len(tags)), stamp]
    for tag, token in tags:
        name = tag.encode("utf-8", "surrogatepass")
        parts += [_TAG_LEN.pack(len(name)), name, token]
    parts.append(envelope)
    return b"".join(parts)


def unframe(value: bytes) -> Frame | None:
    """Take a stored value apart; ``None`` when it is not a frame (damaged, or written by someone else)."""
    try:
        magic, expiry, stamp_length, count = _HEAD.unpack_from(value)
    except struct.error:
        return None
    offset = _HEAD.size + stamp_length
    stamp = value[_HEAD.size:offset]
    tags = _unpairs(value, offset, count) if magic == MAGIC and len(stamp) == stamp_length else None
    if tags is None:
        return None
    return Frame(stamp, None if math.isnan(expiry) else expiry, tags[0], value[tags[1]:])
