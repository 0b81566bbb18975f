"""What a semantic entry's row says about it, sealed: partition, text, vector and expiry, bound to its id.

A stored semantic entry has two sealed parts, both made by the store's `Codec` (a checksum without a secret, a
signature with one, AES-256-GCM with encryption keys):

* the **row**: ``[partition, text, vector]`` with the entry's expiry in the envelope's header, bound to the
  entry's key and sequence number (its id in Redis). Read when entries are loaded, before any of them is
  findable: a row whose partition, text, vector or expiry was changed, or that was copied under another id,
  fails its check and is dropped — never compared with a question;
* the **payload**: the value, bound to the same key and sequence number, read on a hit.

The plain columns a storage keeps beside them for its own bookkeeping (the partition digest and expiry that
Redis scripts use, the text for inspection) are compared with the sealed row: a difference is tampering.
With encryption the text is not kept in the clear at all.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cachelayers.codec import Codec
from cachelayers.errors import IntegrityError, SerializationError

__all__ = ["OpenedRow", "open_row", "seal_row"]


class OpenedRow(NamedTuple):
    """A row that passed its check."""

    partition: bytes
    text: str
    vector: np.ndarray  # float32
    expires_at: float | None


def seal_row(codec: Codec, binding: str, partition: bytes, text: str, vector: np.ndarray,
             expires_at: float | None) -> bytes:
    """Seal what a row says, bound to ``binding`` (the entry's key and sequence number in its storage)."""
    raw = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
    return codec.seal(binding, [partition, text, raw], expires_at)


def open_row(codec: Codec, binding: str, blob: bytes, *, partition: bytes | None = None, text: str | None = None,
             expires_at: float | None = None, check_expiry: bool = False) -> OpenedRow:
    """Check and open a row sealed by `seal_row`; the plain columns given must agree with it.

    Args:
        codec: The store's codec.
        binding: What the row must be bound to.
        blob: The sealed row.
        partition: The plain partition column, when the storage keeps one.
        text: The plain text column, when the storage keeps one (not with encryption).
        expires_at: The plain expiry column (``None`` for never), compared when ``check_expiry``.
        check_expiry: Whether the storage keeps a plain expiry column.

    Raises:
        IntegrityError: The row fails its check, or a plain column differs from it.
    """
    try:
        envelope = codec.open(binding, blob)
        part, sealed_text, raw = envelope.value
        row = OpenedRow(bytes(part), str(sealed_text), np.frombuffer(raw, dtype=np.float32), envelope.expires_at)
    except IntegrityError:
        raise
    except (SerializationError, TypeError, ValueError) as exc:
        raise IntegrityError(f"malformed semantic row: {exc}") from exc
    if partition is not None and partition != row.partition:
        raise IntegrityError("semantic row: the partition column differs from the sealed one")
    if text is not None and text != row.text:
        raise IntegrityError("semantic row: the text column differs from the sealed one")
    if check_expiry and not _same_expiry(expires_at, row.expires_at):
        raise IntegrityError("semantic row: the expiry column differs from the sealed one")
    return row


def _same_expiry(column: float | None, sealed: float | None) -> bool:
    if column is None or sealed is None:
        return column is None and sealed is None
    return abs(column - sealed) < 0.002  # Redis keeps milliseconds
