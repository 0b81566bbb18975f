"""Encoding of cached values, and the integrity envelope every stored entry travels in.

Values are encoded with msgpack. Beyond msgpack's own types the codec keeps tuples, sets, big integers,
datetimes, dates, times, timedeltas, decimals, UUIDs and numpy arrays and scalars (dtype and shape kept), and
dataclasses, pydantic v2 models, ``NamedTuple`` classes and enums *allowed* for the codec, and any type
registered with `register_codec`. Pickle is used only when explicitly enabled, and an entry written with pickle
is never read by a codec without it.

Allowed classes come back as the same class with an equal value, without registration. The engine makes one
codec per decorated function with ``codec.with_types(allowed_types(fn))``: the classes the function's return
annotation names (through ``list[...]``, ``X | None``, ``dict[str, X]``, ``tuple[A, B]``, ``Annotated`` and
the fields of the classes it meets). A stored value names its class by ``module.qualname``; a codec that
does not allow that class refuses it with `SerializationError` (a miss) — stored bytes never import a
module or instantiate a class the function did not name. ``TypedDict`` results are dicts and need nothing.

A value that cannot be encoded (an instance of a class neither allowed, registered nor pickled) raises
`SerializationError` from `Codec.encode_value`, `Codec.pack_body` and `Codec.seal`; the engine returns such a
result to the caller uncached and counts it as ``unstorable``.

An entry stored outside the process is an *envelope*::

    magic "\\xc1C" | format (1 byte) | flags (1 byte) | expires_at (float64, NaN = never) | mac (20 bytes) | body

where ``body`` is the msgpack of ``[tags, value]``, or ``[tags, value, stamp]`` when the engine follows
invalidation epochs (``stamp``: the last invalidation sequence number the writer had heard of), and ``mac`` is
a BLAKE2b over the storage key, the header and the body — keyed by the secret when one is configured (an
HMAC-grade signature), plain otherwise (a checksum). Binding the key into the mac means that an entry copied
under another key is detected as well as one that was truncated or overwritten. ``0xc1`` is the one byte
msgpack never emits, so no bare msgpack value is mistaken for an envelope.

With encryption keys (``Settings.encryption_keys``, `cachelayers.codec.crypto`) the envelope is encrypted
instead of signed (flag ``0x02``)::

    magic | format | flags | expires_at | key id length (1 byte) | key id | nonce (12 bytes) | AES-256-GCM(body)

The associated data of the AEAD is the storage key and everything before the nonce, so an entry copied under
another key, given another expiry or sealed with an unlisted key fails its tag. A codec with keys accepts only
encrypted envelopes; one without refuses them.
"""

from __future__ import annotations

from cachelayers.codec.classes import allowed_types, types_in
from cachelayers.codec.core import (
    FORMAT_VERSION,
    Codec,
    Envelope,
    register_codec,
    unregister_codec,
)

__all__ = ["FORMAT_VERSION", "Codec", "Envelope", "allowed_types", "register_codec", "types_in", "unregister_codec"]
