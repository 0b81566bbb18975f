"""The `Codec` (values and integrity envelopes) and the registry of `register_codec`.

See the package docstring (`cachelayers.codec`) for the formats.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import hmac
import math
import pickle
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple, TypeVar

import msgpack
import numpy as np

from cachelayers.codec.classes import ClassSpec, class_table
from cachelayers.codec.crypto import NONCE_SIZE, Keyring, parse_encryption_keys
from cachelayers.errors import ConfigError, IntegrityError, SerializationError

__all__ = ["FORMAT_VERSION", "Codec", "Envelope", "register_codec"]

T = TypeVar("T")

FORMAT_VERSION: Final = 1
_MAGIC: Final = b"\xc1C"
_HEADER: Final = struct.Struct(">2sBBd")
_MAC_SIZE: Final = 20
_PREFIX_SIZE: Final = _HEADER.size + _MAC_SIZE
_FLAG_SIGNED: Final = 0x01
_FLAG_ENCRYPTED: Final = 0x02
_FLAGS: Final = _FLAG_SIGNED | _FLAG_ENCRYPTED
_NEVER: Final = float("nan")

# Extension codes of stored values. Never renumber: stored entries must stay readable.
(_EXT_TUPLE, _EXT_SET, _EXT_FROZENSET, _EXT_BIGINT, _EXT_DATETIME, _EXT_DATE, _EXT_TIME, _EXT_TIMEDELTA,
 _EXT_DECIMAL, _EXT_UUID, _EXT_NDARRAY, _EXT_NPSCALAR, _EXT_REGISTERED, _EXT_PICKLE, _EXT_CLASS) = range(1, 16)


_NESTED_BUF_SIZE: Final = 4096  # initial buffer of the Packer of an extension's payload (see _pack_nested)
_TAGS_SIZES_MEMO: Final = 1024  # encoded sizes of tag tuples `Codec.body_size` remembers before starting over


# Encoded size of a msgpack integer beyond fixint by its bit length: msgpack uses the smallest that holds the
# value, unsigned for a positive one (uint8 up to 8 bits, ...) and signed for a negative one, whose bits are
# counted without the sign (int8 holds -128, whose ``~i`` is 127, of 7 bits).
_UINT_SIZES: Final = tuple(2 if n <= 8 else 3 if n <= 16 else 5 if n <= 32 else 9 for n in range(65))
_INT_SIZES: Final = tuple(2 if n <= 7 else 3 if n <= 15 else 5 if n <= 31 else 9 for n in range(64))


def _raw_size(n: int, short_header: int) -> int:
    """Encoded size of a string or bytes of ``n`` bytes: ``short_header`` when ``n`` fits the shortest
    header that has a length byte (fixstr's is below 32), else a 16- or 32-bit length; -1 past msgpack's
    limit."""
    if n < 0x100:
        return n + short_header
    if n < 0x1_0000:
        return n + 3
    if n < 0x1_0000_0000:
        return n + 5
    return -1


class _Registered(NamedTuple):
    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


_by_type: dict[type, _Registered] = {}
_by_name: dict[str, _Registered] = {}


def register_codec(
    cls: type[T],
    *,
    name: str | None = None,
    encode: Callable[[T], Any] | None = None,
    decode: Callable[[Any], T] | None = None,
) -> type[T]:
    """Teach the codec to store instances of ``cls``.

    Dataclasses and pydantic models need only the class; any other type needs ``encode`` (to something the
    codec can store) and ``decode`` (back). Usable as a class decorator.

    Dataclasses, pydantic models, ``NamedTuple`` classes and enums that a function's return annotation names
    need no registration (see `allowed_types`); register one to store it for every function, or to give it a
    stored name that survives moving the class.

    Args:
        cls: The type to register.
        name: Stable name stored with each value; defaults to ``module.qualname``. Keep it when moving the
            class, or stored entries stop decoding (they are then a miss, never an error).
        encode: Function from an instance to a storable value.
        decode: Function from that value back to an instance.

    Returns:
        ``cls`` unchanged.

    Raises:
        ConfigError: The class is neither a dataclass nor a pydantic model and no encode/decode was given,
            or the name is taken by another class.
    """
    if encode is None or decode is None:
        if dataclasses.is_dataclass(cls):
            fields = [f.name for f in dataclasses.fields(cls)]

            def encode_dc(obj: Any) -> Any:
                return [getattr(obj, f) for f in fields]

            def decode_dc(data: Any) -> Any:
                return cls(**dict(zip(fields, data, strict=True)))

            encode, decode = encode_dc, decode_dc
        elif hasattr(cls, "model_validate") and hasattr(cls, "model_dump"):
            encode = lambda obj: obj.model_dump(mode="python")  # type: ignore[attr-defined]  # noqa: E731
            decode = cls.model_validate  # type: ignore[attr-defined]
        else:
            raise ConfigError("register_codec.cls", cls, "not a dataclass or pydantic model: pass encode= and decode=")
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    existing = _by_name.get(key)
    if existing is not None and _by_type.get(cls) is not existing:
        raise ConfigError("register_codec.name", key, "already registered for another class")
    entry = _Registered(key, encode, decode)
    _by_type[cls] = entry
    _by_name[key] = entry
    return cls


def unregister_codec(cls: type) -> None:
    """Forget the codec registered for ``cls`` (no error when there is none).

    Entries stored with it are then refused when read (`SerializationError`), never decoded as another type.
    """
    entry = _by_type.pop(cls, None)
    if entry is not None and _by_name.get(entry.name) is entry:
        del _by_name[entry.name]


class Envelope(NamedTuple):
    """A decoded entry: the value, its absolute expiry (``None`` = never), its tags and its invalidation stamp
    (the last invalidation sequence number its writer had heard of; 0 = none)."""

    value: Any
    expires_at: float | None
    tags: tuple[str, ...]
    stamp: int = 0


class Codec:
    """Encodes values and seals them in integrity envelopes bound to their storage key.

    Values of the classes in ``types`` (see `allowed_types`) are stored by name and decoded only by a codec
    that allows them too; registered classes (`register_codec`) are allowed for every codec. A value the codec
    cannot encode raises `SerializationError` (the engine returns it uncached and counts it as
    ``unstorable``).

    Args:
        secret: When set, envelopes are signed with it and only signed envelopes are accepted.
        allow_pickle: Encode values msgpack cannot with pickle, and accept such entries. Off by default:
            unpickling data from a shared store runs code chosen by whoever could write to it.
        types: Dataclasses, pydantic v2 models, ``NamedTuple`` classes and enums to store without
            registration, usually ``allowed_types(fn)``.
        encryption_keys: When set (see `cachelayers.codec.crypto.parse_encryption_keys`), envelopes are
            encrypted with AES-256-GCM under the first key, and only encrypted envelopes whose key id is listed
            and whose tag matches are accepted. The storage key, the header (expiry) and the key id are the
            associated data: an entry moved to another key or given another expiry fails its tag.

    Raises:
        ConfigError: The secret is not 16 to 64 bytes long, an encryption key is malformed, or ``types`` holds
            a class of another kind or two classes of one ``module.qualname``.
        MissingDependencyError: Encryption keys are given and ``cryptography`` is not installed.
    """

    __slots__ = ("_allow_pickle", "_class_by_name", "_class_by_type", "_flags", "_keyring", "_mac_base", "_mac_key",
                 "_packer_default", "_tags_sizes")

    def __init__(self, *, secret: bytes | str | None = None, allow_pickle: bool = False,
                 types: Iterable[type] = (), encryption_keys: object = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and not 16 <= len(secret) <= 64:
            raise ConfigError("secret", "<redacted>", "must be 16 to 64 bytes long")
        keys = parse_encryption_keys(encryption_keys)
        self._keyring = Keyring(keys) if keys else None
        self._mac_key = secret or b""
        # Keying BLAKE2b costs more than hashing a small entry: key it once, copy the state per entry.
        self._mac_base = hashlib.blake2b(digest_size=_MAC_SIZE, key=self._mac_key, person=b"cachelayers-e1")
        self._allow_pickle = allow_pickle
        # With keys the AEAD tag authenticates the entry: the keyed mac would add nothing.
        self._flags = _FLAG_ENCRYPTED if keys else _FLAG_SIGNED if secret else 0
        self._packer_default = self._default
        self._tags_sizes: dict[tuple[str, ...], int] = {}
        self._set_types(types)

    def _set_types(self, types: Iterable[type]) -> None:
        by_name = class_table(types)
        self._class_by_name: dict[str, ClassSpec] = by_name
        self._class_by_type: dict[type, ClassSpec] = {spec.cls: spec for spec in by_name.values()}

    @property
    def encrypted(self) -> bool:
        """Whether envelopes are encrypted (encryption keys were given)."""
        return self._keyring is not None

    @property
    def authenticated(self) -> bool:
        """Whether only holders of a secret or key can make entries this codec accepts."""
        return self._flags != 0

    @property
    def types(self) -> frozenset[type]:
        """The classes this codec stores by name without registration."""
        return frozenset(self._class_by_type)

    def with_types(self, types: Iterable[type]) -> Codec:
        """Return a codec like this one that also stores and reads ``types``.

        Cheap enough for one per decorated function: the secret, the keyed hash state and the size memo are
        shared, only the table of classes is new. Entries sealed by either codec open in the other when they
        hold no class the other does not allow.

        Args:
            types: Classes to allow on top of this codec's own, usually ``allowed_types(fn)``.

        Returns:
            The new codec (this one when ``types`` adds nothing).

        Raises:
            ConfigError: A class is not a dataclass, pydantic model, ``NamedTuple`` or enum, or two classes
                share one ``module.qualname``.
        """
        wanted = self._class_by_type.keys() | set(types)
        if wanted == self._class_by_type.keys():
            return self
        other = Codec.__new__(Codec)
        other._mac_key = self._mac_key
        other._keyring = self._keyring
        other._mac_base = self._mac_base
        other._allow_pickle = self._allow_pickle
        other._flags = self._flags
        other._tags_sizes = self._tags_sizes
        other._packer_default = other._default  # bound to the new codec, hence to its table
        other._set_types(wanted)
        return other

    # -- values ------------------------------------------------------------------------------------------

    def _default(self, obj: Any) -> Any:
        tp = type(obj)
        if tp is tuple:
            return msgpack.ExtType(_EXT_TUPLE, self._pack_nested(list(obj)))
        if tp is set or tp is frozenset:
            return msgpack.ExtType(_EXT_SET if tp is set else _EXT_FROZENSET, self._pack_nested(list(obj)))
        if tp is int:  # only reached for integers outside 64 bits
            return msgpack.ExtType(_EXT_BIGINT, str(obj).encode())
        registered = _by_type.get(tp)
        if registered is not None:
            return msgpack.ExtType(_EXT_REGISTERED, self._pack_nested([registered.name, registered.encode(obj)]))
        allowed = self._class_by_type.get(tp)
        if allowed is not None:
            return msgpack.ExtType(_EXT_CLASS, self._pack_nested([allowed.name, allowed.encode(obj)]))
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            data = np.ascontiguousarray(obj)
            return msgpack.ExtType(_EXT_NDARRAY, self._pack_nested([data.dtype.str, list(obj.shape), data.tobytes()]))
        if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
            return msgpack.ExtType(_EXT_NPSCALAR, self._pack_nested([obj.dtype.str, obj.tobytes()]))
        if tp is dt.datetime:
            return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
        if tp is dt.date:
            return msgpack.ExtType(_EXT_DATE, obj.isoformat().encode())
        if tp is dt.time:
            return msgpack.ExtType(_EXT_TIME, obj.isoformat().encode())
        if tp is dt.timedelta:
            return msgpack.ExtType(_EXT_TIMEDELTA, self._pack_nested([obj.days, obj.seconds, obj.microseconds]))
        if tp is decimal.Decimal:
            return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
        if tp is uuid.UUID:
            return msgpack.ExtType(_EXT_UUID, obj.bytes)
        if self._allow_pickle:
            return msgpack.ExtType(_EXT_PICKLE, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        raise TypeError(f"cannot encode {tp.__module__}.{tp.__qualname__}: name the class in the function's "
                        f"return annotation, register it with cachelayers.register_codec() or enable pickle")

    def _pack(self, obj: Any) -> bytes:
        # A Packer per call: msgpack.packb is a Python wrapper around the same thing that costs as much again
        # (keyword parsing), and one shared Packer would break when `_default` packs nested values with it.
        packer = msgpack.Packer(default=self._packer_default, use_bin_type=True, strict_types=True, datetime=False)
        return packer.pack(obj)  # type: ignore[no-any-return]

    def _pack_nested(self, obj: Any) -> bytes:
        # The payload of an extension, packed while the outer Packer lives. A Packer's default 256 KiB buffer,
        # allocated and freed once per nested value, made glibc give the heap top back and take it again each
        # time (a model with a dozen nested models spent 10x longer in malloc than in packing); a small buffer
        # grows by doubling when the payload is large.
        packer = msgpack.Packer(default=self._packer_default, use_bin_type=True, strict_types=True, datetime=False,
                                buf_size=_NESTED_BUF_SIZE)
        return packer.pack(obj)  # type: ignore[no-any-return]

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE:
            return tuple(self._unpack(data))
        if code == _EXT_SET:
            return set(self._unpack(data))
        if code == _EXT_FROZENSET:
            return frozenset(self._unpack(data))
        if code == _EXT_BIGINT:
            return int(data.decode())
        if code == _EXT_NDARRAY:
            dtype, shape, raw = self._unpack(data)
            return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        if code == _EXT_NPSCALAR:
            dtype, raw = self._unpack(data)
            return np.frombuffer(raw, dtype=np.dtype(dtype))[0]
        if code == _EXT_REGISTERED:
            name, payload = self._unpack(data)
            registered = _by_name.get(name)
            if registered is None:
                raise SerializationError(f"no codec registered under {name!r}")
            return registered.decode(payload)
        if code == _EXT_CLASS:
            name, state = self._unpack(data)
            allowed = self._class_by_name.get(name)
            if allowed is None:  # never imported nor looked up anywhere else: a miss
                raise SerializationError(f"entry holds a {name!r}, a class this codec does not allow "
                                         f"(not named by the function's return annotation)")
            return allowed.decode(state)
        if code == _EXT_DATETIME:
            return dt.datetime.fromisoformat(data.decode())
        if code == _EXT_DATE:
            return dt.date.fromisoformat(data.decode())
        if code == _EXT_TIME:
            return dt.time.fromisoformat(data.decode())
        if code == _EXT_TIMEDELTA:
            days, seconds, micros = self._unpack(data)
            return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
        if code == _EXT_DECIMAL:
            return decimal.Decimal(data.decode())
        if code == _EXT_UUID:
            return uuid.UUID(bytes=data)
        if code == _EXT_PICKLE:
            if not self._allow_pickle:
                raise SerializationError("entry holds a pickled value and pickle is not enabled")
            return pickle.loads(data)
        raise SerializationError(f"unknown extension code {code}")

    def _unpack(self, data: bytes | memoryview) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext_hook, raw=False, strict_map_key=False,
                               use_list=True, timestamp=0)

    def encode_value(self, value: object) -> bytes:
        """Encode a bare value (no envelope).

        Args:
            value: Any value of a type the codec stores (see the package docstring).

        Returns:
            The msgpack bytes.

        Raises:
            SerializationError: The value holds an instance of a class neither allowed for this codec,
                registered nor pickled (the engine counts such a result as ``unstorable``).
        """
        try:
            return self._pack(value)
        except Exception as exc:
            raise SerializationError(str(exc)) from exc

    def decode_value(self, data: bytes) -> Any:
        """Decode what `encode_value` made.

        Args:
            data: Bytes made by `encode_value`.

        Returns:
            The value, classes included.

        Raises:
            SerializationError: The data is not a value this codec can read: malformed, or naming a class this
                codec does not allow (never imported), or whose stored fields no longer match the class.
        """
        try:
            return self._unpack(data)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot decode value: {exc}") from exc

    # -- envelopes ---------------------------------------------------------------------------------------

    def _mac(self, key: str, head: bytes | memoryview, body: bytes | memoryview) -> bytes:
        h = self._mac_base.copy()
        h.update(key.encode())
        h.update(b"\x00")
        h.update(head)
        h.update(body)
        return h.digest()

    def pack_body(self, value: object, tags: Sequence[str] = (), stamp: int = 0) -> bytes:
        """Encode ``value`` and its tags into an envelope body (see `seal_body`).

        Args:
            value: The value to store.
            tags: Its tags.
            stamp: The invalidation sequence number the writer had heard of last (see `Envelope`); 0 leaves
                it out.

        Returns:
            The body.

        Raises:
            SerializationError: The value cannot be encoded (see `encode_value`).
        """
        try:
            return self._pack([list(tags), value, stamp] if stamp else [list(tags), value])
        except Exception as exc:
            raise SerializationError(str(exc)) from exc

    def body_size(self, value: object, tags: tuple[str, ...] = ()) -> int:
        """Return ``len(self.pack_body(value, tags))``, without encoding when ``value`` is a scalar.

        For ``None``, ``bool``, ``int``, ``float``, ``str`` and ``bytes`` the size is computed from the
        msgpack format; other values are encoded. The memory tier charges this size against its byte bound
        when no tier below needs the encoding itself, so it is computed on every such miss.

        Raises:
            SerializationError: The value cannot be encoded.
        """
        tp = type(value)
        size = -1
        if tp is str:
            text: str = value  # type: ignore[assignment]
            if text.isascii():
                size = _raw_size(len(text), 1 if len(text) < 32 else 2)
            else:
                try:
                    n = len(text.encode())
                except UnicodeEncodeError:  # not valid UTF-8: pack_body raises the error
                    pass
                else:
                    size = _raw_size(n, 1 if n < 32 else 2)
        elif tp is int:
            i: int = value  # type: ignore[assignment]
            if -32 <= i < 0x80:
                size = 1  # fixint
            elif i > 0:  # integers beyond 64 bits are an extension type: -1, encoded below
                size = _UINT_SIZES[i.bit_length()] if i < 1 << 64 else -1
            else:
                size = _INT_SIZES[(~i).bit_length()] if i >= -(1 << 63) else -1
        elif value is None or tp is bool:
            size = 1
        elif tp is float:
            size = 9
        elif tp is bytes:
            size = _raw_size(len(value), 2)  # type: ignore[arg-type]
        if size < 0 or type(tags) is not tuple:
            return len(self.pack_body(value, tags))
        sizes = self._tags_sizes  # by tuples of plain strings, as the engine passes them
        tags_size = sizes.get(tags)
        if tags_size is None:
            tags_size = len(self.pack_body(None, tags)) - 2  # minus the outer array header and the None
            if len(sizes) >= _TAGS_SIZES_MEMO:
                sizes.clear()
            sizes[tags] = tags_size
        return 1 + tags_size + size

    def seal(self, key: str, value: object, expires_at: float | None, tags: Sequence[str] = ()) -> bytes:
        """Encode ``value`` into an envelope bound to ``key``.

        Args:
            key: The storage key the envelope is bound to.
            value: The value to store.
            expires_at: Absolute expiry (clock seconds), ``None`` for never.
            tags: Its tags.

        Returns:
            The envelope.

        Raises:
            SerializationError: The value cannot be encoded (see `encode_value`).
        """
        return self.seal_body(key, self.pack_body(value, tags), expires_at)

    def seal_body(self, key: str, body: bytes, expires_at: float | None) -> bytes:
        """Wrap a body made by `pack_body` in an envelope bound to ``key`` (encrypted when keys are set)."""
        head = _HEADER.pack(_MAGIC, FORMAT_VERSION, self._flags, _NEVER if expires_at is None else expires_at)
        keyring = self._keyring
        if keyring is not None:
            kid = keyring.current_id
            head += bytes((len(kid),)) + kid
            nonce, sealed = keyring.encrypt(body, self._associated(key, head))
            return head + nonce + sealed
        return head + self._mac(key, head, body) + body

    @staticmethod
    def _associated(key: str, head: bytes | memoryview) -> bytes:
        return b"".join((key.encode(), b"\x00", head))

    def _decrypt(self, key: str, view: memoryview) -> memoryview:
        """The body of an encrypted envelope (its header checked already)."""
        assert self._keyring is not None
        start = _HEADER.size
        if len(view) <= start:
            raise IntegrityError("entry is truncated")
        end = start + 1 + view[start]
        head = view[:end]
        if len(view) < end + NONCE_SIZE + 16:
            raise IntegrityError("entry is truncated")
        body = self._keyring.decrypt(bytes(view[start + 1:end]), view[end:end + NONCE_SIZE],
                                     view[end + NONCE_SIZE:], self._associated(key, head))
        return memoryview(body)

    def open(self, key: str, blob: bytes) -> Envelope:
        """Check and decode an envelope stored under ``key``.

        Args:
            key: The storage key the envelope was read under.
            blob: The stored bytes.

        Returns:
            The value, its expiry and its tags.

        Raises:
            IntegrityError: The envelope is truncated, of another format, signed differently than this
                codec expects, bound to another key, or its body does not match its mac.
            SerializationError: The body passed its check but holds a value this codec cannot decode (for
                example a class it does not allow).
        """
        if len(blob) < _HEADER.size:
            raise IntegrityError("entry is truncated")
        # Every read of a Redis or disk hit passes here: slices of one memoryview, no copies.
        magic, version, flags, expires_at = _HEADER.unpack_from(blob)
        if magic != _MAGIC:
            raise IntegrityError("entry is not a cachelayers envelope")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"entry has format {version}, this codec reads {FORMAT_VERSION}")
        if flags & _FLAGS != self._flags:
            raise IntegrityError(_flags_mismatch(flags, self._flags))
        view = memoryview(blob)
        if self._keyring is not None:
            body = self._decrypt(key, view)
        else:
            if len(blob) < _PREFIX_SIZE:
                raise IntegrityError("entry is truncated")
            body = view[_PREFIX_SIZE:]
            if not hmac.compare_digest(view[_HEADER.size:_PREFIX_SIZE], self._mac(key, view[:_HEADER.size], body)):
                raise IntegrityError("entry checksum or signature does not match")
        try:
            tags, value, *rest = self._unpack(body)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot decode entry: {exc}") from exc
        stamp = rest[0] if rest else 0
        if type(stamp) is not int or len(rest) > 1:
            raise SerializationError("entry has a malformed invalidation stamp")
        return Envelope(value, None if math.isnan(expires_at) else expires_at, tuple(tags), stamp)


def _flags_mismatch(found: int, expected: int) -> str:
    """Why an entry protected one way is refused by a codec that expects another."""
    def kind(flags: int) -> str:
        if flags & _FLAG_ENCRYPTED:
            return "encrypted"
        return "signed" if flags & _FLAG_SIGNED else "unsigned"

    wanted = {"encrypted": "encryption keys are set", "signed": "a secret is set",
              "unsigned": "no secret or encryption key is set"}[kind(expected)]
    return f"entry is {kind(found)} but {wanted}"
