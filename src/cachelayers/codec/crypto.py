"""Encryption keys for entries at rest: parsing, validation, and the AES-256-GCM keyring of a codec.

Keys are given as ``kid:base64key`` items separated by commas (``CACHELAYERS_ENCRYPTION_KEYS``), as a
mapping ``{kid: key}`` or as ``(kid, key)`` pairs, where a key is 32 bytes (raw, or base64 of them). The
**first** key encrypts new entries; every listed key decrypts. To rotate, put a new key first and keep the old
one listed until entries written with it have expired.

The key ids travel in each entry; the keys themselves never appear in a message, a ``repr`` or a log.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cachelayers.errors import ConfigError, IntegrityError, MissingDependencyError

__all__ = ["KEY_SIZE", "NONCE_SIZE", "Keyring", "parse_encryption_keys", "require_cryptography"]

KEY_SIZE: Final = 32  # AES-256
NONCE_SIZE: Final = 12  # GCM's 96-bit nonce, random per entry
_KID: Final = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_FIELD: Final = "encryption_keys"
_FORMAT: Final = "expected 'kid:base64key,kid2:base64key' (32-byte keys), a mapping kid -> key or (kid, key) pairs"

EncryptionKeys = tuple[tuple[str, bytes], ...]
"""Parsed keys, in order: the first encrypts, all decrypt."""


def require_cryptography(field: str = _FIELD) -> Any:
    """Import and return ``cryptography.hazmat.primitives.ciphers.aead.AESGCM``.

    Raises:
        MissingDependencyError: ``cryptography`` is not installed (names ``field`` and the ``encryption``
            extra).
    """
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise MissingDependencyError(field, "<redacted>", "cryptography", "encryption") from None
    return AESGCM


def _key_bytes(kid: str, key: object, field: str) -> bytes:
    if isinstance(key, str):
        text = key.strip()
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text)
                                   else None, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{field}[{kid!r}]", "<redacted>", "the key is not valid base64") from None
    elif isinstance(key, (bytes, bytearray)):
        raw = bytes(key)
    else:
        raise ConfigError(f"{field}[{kid!r}]", "<redacted>", "expected 32 bytes or their base64")
    if len(raw) != KEY_SIZE:
        raise ConfigError(f"{field}[{kid!r}]", "<redacted>", f"the key must be {KEY_SIZE} bytes (AES-256), "
                          f"got {len(raw)}; make one with: python -c \"import os, base64; "
                          f"print(base64.b64encode(os.urandom(32)).decode())\"")
    return raw


def parse_encryption_keys(value: object, field: str = _FIELD) -> EncryptionKeys:
    """Parse and check encryption keys (see the module docstring for the forms).

    Args:
        value: ``"kid:base64,kid2:base64"``, a mapping ``{kid: key}``, ``(kid, key)`` pairs, or ``None``/empty
            for no encryption.
        field: Name of the setting, for error messages.

    Returns:
        ``((kid, key), ...)`` in the given order, empty for no encryption.

    Raises:
        ConfigError: A key id is malformed or repeated, or a key is not 32 bytes (the message names the field
            and the key id, never the key).
    """
    if value is None or value == "" or value == ():
        return ()
    pairs: list[tuple[object, object]]
    if isinstance(value, str):
        pairs = []
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            name, sep, encoded = item.partition(":")
            if not sep:
                raise ConfigError(field, "<redacted>", _FORMAT)
            pairs.append((name.strip(), encoded))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, Sequence) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        pairs = list(value)
    else:
        raise ConfigError(field, "<redacted>", _FORMAT)
    out: list[tuple[str, bytes]] = []
    for given, key in pairs:
        if not isinstance(given, str) or not _KID.match(given):
            raise ConfigError(field, "<redacted>", f"key ids are 1-32 letters, digits, '_', '.' or '-'; got {given!r}")
        kid = given
        if any(kid == seen for seen, _ in out):
            raise ConfigError(field, "<redacted>", f"key id {kid!r} is listed twice")
        out.append((kid, _key_bytes(kid, key, field)))
    return tuple(out)


class Keyring:
    """AES-256-GCM ciphers by key id: the first key seals, every key opens.

    Args:
        keys: Parsed keys (`parse_encryption_keys`), at least one.

    Raises:
        MissingDependencyError: ``cryptography`` is not installed.
    """

    __slots__ = ("_by_id", "current", "current_id")

    def __init__(self, keys: EncryptionKeys) -> None:
        aesgcm = require_cryptography()
        self._by_id = {kid.encode(): aesgcm(key) for kid, key in keys}
        self.current_id: bytes = keys[0][0].encode()
        self.current = self._by_id[self.current_id]

    @property
    def ids(self) -> tuple[str, ...]:
        """The key ids, the sealing one first."""
        return tuple(kid.decode() for kid in self._by_id)

    def encrypt(self, plaintext: bytes | memoryview, associated: bytes) -> tuple[bytes, bytes]:
        """Encrypt with the current key; return ``(nonce, ciphertext and tag)``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self.current.encrypt(nonce, bytes(plaintext), associated)

    def decrypt(self, kid: bytes, nonce: bytes | memoryview, ciphertext: bytes | memoryview,
                associated: bytes) -> bytes:
        """Decrypt and authenticate.

        Raises:
            IntegrityError: The key id is not listed, or the tag does not match (tampered, moved, or another key).
        """
        cipher = self._by_id.get(kid)
        if cipher is None:
            raise IntegrityError(f"entry is encrypted with key id {kid.decode(errors='replace')!r}, "
                                 f"which is not configured")
        try:
            return bytes(cipher.decrypt(bytes(nonce), bytes(ciphertext), associated))
        except Exception:  # cryptography's InvalidTag
            raise IntegrityError("entry failed its authentication tag (tampered, moved or another key)") from None

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids!r})"
