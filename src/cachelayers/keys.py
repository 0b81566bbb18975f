"""Cache keys: normalised through the signature, stable across processes, hashed for storage.

A key has two forms:

* the **local key**, a hashable tuple used by the in-process memory tier. For the common case (a few
  ``int``/``str``/``bytes``/``None`` arguments) it is the tuple of arguments itself, so a memory hit costs a
  tuple and a dict lookup;
* the **storage key**, a string ``<prefix><namespace>:<blake2b hex>`` used by every other tier. It is a hash
  of a canonical encoding of the function identity, the user version and the normalised arguments: stable
  across processes and Python runs (``hash()`` is never used) and free of raw argument text.

Arguments are normalised through the signature once: ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` build
the same key.

Request-scoped objects (a web framework's request, response or background tasks, an HTTP or API client) are
left out of keys by type: see `ignore_type` (in `cachelayers.ignoring`, re-exported here).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import gc
import hashlib
import inspect
import math
import numbers
import pathlib
import threading
import uuid
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Final, NamedTuple

import msgpack
import numpy as np

from cachelayers.errors import ConfigError, UnkeyableArgumentError
from cachelayers.ignoring import ignore_type, ignored_parameters, ignored_types

__all__ = ["CANONICAL", "FAST_TYPES", "KeyBuilder", "KeyFunctionError", "canonical_bytes",
           "claim_identity", "closure_fingerprint", "function_identity", "ignore_type", "ignored_parameters",
           "ignored_types"]

# Exact types whose values are equal only when their msgpack encodings are equal *and* that never compare
# equal to a value of another type in this set. ``bool`` and ``float`` are left out on purpose: ``True == 1``
# and ``1.0 == 1`` would make two different calls share a tuple key in the memory tier.
FAST_TYPES: Final = frozenset({str, int, bytes, type(None)})
_FAST = FAST_TYPES


class KeyFunctionError(Exception):
    """A ``key=`` function raised: the call cannot be keyed, so it runs uncached (see `KeyBuilder`).

    The exception the function raised is the ``__cause__``.
    """


class _Canonical:
    """The marker in a local key whose arguments are given by their canonical encoding."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CANONICAL"


CANONICAL: Final = _Canonical()
"""Second item of a local key ``(token, CANONICAL, encoding)``; other local keys are ``(token, *arguments)``."""
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1

# Extension codes of the canonical key encoding. Never renumber: keys must stay stable across releases.
_EXT_TUPLE, _EXT_DICT, _EXT_SET, _EXT_BIGINT, _EXT_DATETIME, _EXT_DATE, _EXT_TIME, _EXT_TIMEDELTA = range(1, 9)
_EXT_DECIMAL, _EXT_UUID, _EXT_ENUM, _EXT_NDARRAY, _EXT_NPSCALAR, _EXT_OBJECT, _EXT_PATH, _EXT_FLOAT = range(9, 17)
_EXT_FROZENSET: Final = 17
_EXT_IGNORED: Final = 18

_IGNORED: Final = msgpack.ExtType(_EXT_IGNORED, b"")
"""What a value of an ignored type (see `ignore_type`) contributes to a key: the same for every such value."""


class _Unkeyable(Exception):
    def __init__(self, path: str, value: object) -> None:
        self.path = path
        self.value = value


def _pack(obj: Any) -> bytes:
    # A Packer per call (not msgpack.packb, a Python wrapper that parses keyword arguments: twice as slow on
    # the miss path) and not a shared one (a Packer is neither reentrant nor thread-safe).
    return msgpack.Packer(use_bin_type=True, strict_types=True).pack(obj)  # type: ignore[no-any-return]


def _qualname(tp: type) -> str:
    return f"{tp.__module__}.{tp.__qualname__}"


def _canon(obj: Any, path: str) -> Any:
    """Turn ``obj`` into a msgpack-ready structure whose encoding is the same for equal values."""
    tp = type(obj)
    if tp is str or tp is bytes or tp is bool or obj is None:
        return obj
    if tp is int:
        if _INT64_MIN <= obj <= _UINT64_MAX:
            return obj
        return msgpack.ExtType(_EXT_BIGINT, str(obj).encode())
    if tp is float:
        # One encoding for every NaN; -0.0 stays distinct from 0.0 (they differ under division).
        return msgpack.ExtType(_EXT_FLOAT, b"nan") if math.isnan(obj) else obj
    if tp is list:
        return [_canon(item, f"{path}[{i}]") for i, item in enumerate(obj)]
    if tp is tuple:
        return msgpack.ExtType(_EXT_TUPLE, _pack([_canon(item, f"{path}[{i}]") for i, item in enumerate(obj)]))
    if tp is dict:
        items = sorted(([_pack(_canon(k, f"{path}.<key>")), _canon(v, f"{path}[{k!r}]")] for k, v in obj.items()),
                       key=lambda item: item[0])
        return msgpack.ExtType(_EXT_DICT, _pack(items))
    if tp is set or tp is frozenset:  # distinct like tuple and list: a function may tell them apart
        return msgpack.ExtType(_EXT_SET if tp is set else _EXT_FROZENSET,
                               _pack(sorted(_pack(_canon(item, f"{path}.<item>")) for item in obj)))
    if isinstance(obj, ignored_types()):
        return _IGNORED
    custom = getattr(obj, "__cache_key__", None)
    if custom is not None and callable(custom):
        return msgpack.ExtType(_EXT_OBJECT, _pack([_qualname(tp), _canon(custom(), f"{path}.__cache_key__()")]))
    if isinstance(obj, enum.Enum):
        return msgpack.ExtType(_EXT_ENUM, _pack([_qualname(tp), _canon(obj.value, f"{path}.value")]))
    if isinstance(obj, dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, dt.date):
        return msgpack.ExtType(_EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, dt.time):
        return msgpack.ExtType(_EXT_TIME, obj.isoformat().encode())
    if isinstance(obj, dt.timedelta):
        return msgpack.ExtType(_EXT_TIMEDELTA, _pack([obj.days, obj.seconds, obj.microseconds]))
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    if isinstance(obj, pathlib.PurePath):
        return msgpack.ExtType(_EXT_PATH, _pack([_qualname(tp), str(obj)]))
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise _Unkeyable(path, obj)
        data = np.ascontiguousarray(obj)
        return msgpack.ExtType(_EXT_NDARRAY, _pack([data.dtype.str, list(obj.shape), data.tobytes()]))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _pack([obj.dtype.str, obj.tobytes()]))
    if isinstance(obj, int | str | bytes | float | tuple | list | dict):  # subclasses, e.g. NamedTuple
        base: Any = next(b for b in (bool, int, float, str, bytes, tuple, list, dict) if isinstance(obj, b))
        fields = obj._asdict() if hasattr(obj, "_asdict") else base(obj)
        return msgpack.ExtType(_EXT_OBJECT, _pack([_qualname(tp), _canon(fields, path)]))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return msgpack.ExtType(_EXT_OBJECT, _pack([_qualname(tp), _canon(fields, path)]))
    dump = getattr(obj, "model_dump", None)  # pydantic v2 models, without importing pydantic
    if dump is not None and callable(dump) and hasattr(tp, "model_fields"):
        return msgpack.ExtType(_EXT_OBJECT, _pack([_qualname(tp), _canon(dump(mode="python"), path)]))
    raise _Unkeyable(path, obj)


def canonical_bytes(value: object) -> bytes:
    """Encode ``value`` so that equal values, in any process, give equal bytes.

    Dicts and sets are sorted by the encoding of their members; tuples, lists, numpy arrays (dtype, shape and
    data), datetimes, enums, dataclasses and pydantic models are tagged with their type.

    Raises:
        TypeError: ``value`` (or something inside it) has no canonical encoding.
    """
    try:
        return _pack(_canon(value, "value"))
    except _Unkeyable as exc:
        raise TypeError(f"{exc.path} of type {_qualname(type(exc.value))} has no canonical encoding") from None


def closure_fingerprint(fn: Callable[..., Any]) -> str | None:
    """Return a stable digest of the values ``fn`` closed over, so that closures of one factory differ.

    Functions and classes in a cell count by ``module.qualname``; any other value by its canonical encoding.

    Returns:
        ``""`` when ``fn`` closes over nothing, a hex digest when every cell can be keyed, ``None`` when some
        cell holds a value that cannot (then closures of ``fn``'s code cannot be told apart).
    """
    target = inspect.unwrap(fn)
    cells = getattr(target, "__closure__", None)
    code = getattr(target, "__code__", None)
    if not cells or code is None:
        return ""
    parts: list[Any] = []
    for name, cell in zip(code.co_freevars, cells, strict=True):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell: a name assigned later in the enclosing function
            parts.append([name])
            continue
        if inspect.isroutine(value) or inspect.isclass(value) or inspect.ismodule(value):
            parts.append([name, f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value)}"])
            continue
        if isinstance(value, ignored_types()):  # two closures over two clients may compute different things
            return None
        try:
            parts.append([name, _canon(value, name)])
        except _Unkeyable:
            return None
    return hashlib.blake2b(_pack(parts), digest_size=6, person=b"cachelayers-c1").hexdigest()


def function_identity(fn: Callable[..., Any]) -> str:
    """Return the identity of ``fn`` in every key, stable across processes.

    It is ``module.qualname``, followed by ``#`` and the `closure_fingerprint` when ``fn`` closes over
    values that can be keyed: two closures made by one factory with different values get different
    identities.
    """
    target = inspect.unwrap(fn)
    module = getattr(target, "__module__", None) or "<unknown>"
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    fingerprint = closure_fingerprint(target)
    return f"{module}.{qualname}#{fingerprint}" if fingerprint else f"{module}.{qualname}"


class _Claim(NamedTuple):
    """A function that stores entries under a token, and what it computes with, as it was when it came."""

    ref: weakref.ref[Any]
    code: object
    globals: int
    fingerprint: str | None
    defaults: bytes | None


_claims: dict[str, list[_Claim]] = {}
_claims_lock = threading.RLock()  # re-entrant: a collection inside a claim runs `_forget`


def _defaults_key(fn: Any) -> bytes | None:
    try:
        return canonical_bytes([getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None)])
    except TypeError:
        return None


def _forget(token: str) -> None:
    """Drop the claims of collected functions under ``token`` (a weak reference's callback)."""
    with _claims_lock:
        kept = [claim for claim in _claims.get(token, ()) if claim.ref() is not None]
        if kept:
            _claims[token] = kept
        else:
            _claims.pop(token, None)


def _claim_of(target: Any, token: str) -> _Claim:
    globals_ = getattr(target, "__globals__", None)
    return _Claim(weakref.ref(target, lambda _: _forget(token)), getattr(target, "__code__", None),
                  id(globals_) if globals_ is not None else 0, closure_fingerprint(target), _defaults_key(target))


def _interchangeable(a: _Claim, b: _Claim) -> bool:
    """Whether two functions always compute the same thing: one code and module, equal closures and defaults."""
    return (a.code is not None and a.code is b.code and a.globals == b.globals
            and a.fingerprint is not None and a.fingerprint == b.fingerprint
            and a.defaults is not None and a.defaults == b.defaults)


def _clashing(token: str, claim: _Claim) -> bool:
    target = claim.ref()
    for other in _claims.get(token, ()):
        found = other.ref()
        if found is not None and found is not target and not _interchangeable(other, claim):
            return True
    return False


def claim_identity(token: str, fn: Callable[..., Any], *, scope: str = "", field: str = "name") -> None:
    """Record that ``fn`` stores entries under ``token``; refuse a second live function that would share them.

    Two live functions share entries only when they always compute the same thing (same code, module,
    defaults and closure values). Any other pair with one token — factory closures over values that cannot
    be keyed, a function redefined under the same name, two lambdas — is refused: the user must tell them
    apart with ``name=`` or ``namespace=``. Functions that were collected are forgotten.

    Args:
        token: What the function's entries are stored under (namespace, identity and version).
        fn: The decorated function.
        scope: Where the entries live, when functions with one token cannot meet (e.g. two cache engines).
        field: The option named in the error.

    Raises:
        ConfigError: Another live function, not interchangeable with ``fn``, already uses ``token``.
    """
    target = inspect.unwrap(fn)
    token = f"{scope}\x01{token}" if scope else token
    try:
        claim = _claim_of(target, token)
    except TypeError:  # an object without weak references: nothing to follow
        return
    with _claims_lock:
        if _clashing(token, claim):
            gc.collect()  # a dropped function kept alive by a reference cycle is not a clash
            if _clashing(token, claim):
                shown = token.split("\x00")[1] if "\x00" in token else token.rpartition("\x01")[2]
                raise ConfigError(field, shown, "another live function has this identity and may compute other "
                                  "values (a factory closure over a value that cannot be keyed, a function redefined "
                                  "under the same name, a lambda): pass name= or namespace= to tell them apart")
        kept = [other for other in _claims.get(token, ()) if other.ref() is not None]
        if all(other.ref() is not target for other in kept):
            kept.append(claim)
        _claims[token] = kept


class KeyBuilder:
    """Builds the keys of one function; made once, at decoration time.

    Args:
        fn: The function whose calls are keyed.
        namespace: Group of entries; part of the storage key and invalidatable as a whole.
        version: User version; change it to stop reading entries written by older code.
        key: Optional function whose result is keyed instead of the arguments. It is called with every
            argument by name, defaults applied (``key=lambda question, **_: question.lower()``).
        ignore: Names of parameters left out of the key (e.g. a client object or ``self``). Parameters
            annotated with a type registered with `ignore_type` (a request, a client) are left out as well.
        name: Identity used in keys instead of ``module.qualname``.

    Raises:
        ConfigError: ``ignore`` names a parameter the function does not have.
    """

    __slots__ = ("_custom", "_defaults_tail", "_fast_arity", "_hasher", "_ignore", "_params", "_positional_defaults",
                 "_positional_names", "_signature", "identity", "namespace", "token", "version")

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        namespace: str | None = None,
        version: str | float | uuid.UUID = 0,
        key: Callable[..., Any] | None = None,
        ignore: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip() or "\x00" in name):
            raise ConfigError("name", name, "must be a non-empty string without NUL (or None for module.qualname)")
        if namespace is not None and not isinstance(namespace, str):
            raise ConfigError("namespace", namespace, "must be a non-empty string without ':' or NUL")
        given: object = version  # checked at run time: untyped callers pass anything
        if isinstance(given, bool) or not isinstance(given, str | numbers.Real | uuid.UUID):
            raise ConfigError("version", given, "expected a str, a number or a UUID (its text is part of every key)")
        self.identity = name or function_identity(fn)
        self.namespace = namespace if namespace is not None else self.identity
        self.version = str(version)
        if not self.namespace or ":" in self.namespace or "\x00" in self.namespace:
            raise ConfigError("namespace", self.namespace, "must be a non-empty string without ':' or NUL")
        self.token = f"{self.namespace}\x00{self.identity}\x00{self.version}"
        # The digest of every call starts with the token: hash it once and copy the state per call.
        self._hasher = hashlib.blake2b(digest_size=20, person=b"cachelayers-k1")
        self._hasher.update(self.token.encode())
        self._hasher.update(b"\x00")
        self._custom = key
        self._signature = inspect.signature(fn)
        self._params = tuple(self._signature.parameters.values())
        names = {p.name for p in self._params}
        if isinstance(ignore, str | bytes):
            raise ConfigError("ignore", ignore, f"expected a collection of parameter names, e.g. ({ignore!r},), "
                                                "not one string (it would be read letter by letter)")
        self._ignore = frozenset(ignore)
        unknown = self._ignore - names
        if unknown:
            raise ConfigError("ignore", sorted(unknown), f"{self.identity}() has no such parameter")
        if key is None:
            self._ignore |= ignored_parameters(fn)
        # The fast path applies when every parameter can be passed positionally, none is ignored and none
        # is variadic: then the positional args padded with the defaults *are* the normalised arguments.
        simple = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in self._params)
        # `arguments` without `inspect.Signature.bind` (~10 µs) for positional calls of such a signature.
        self._positional_names = tuple(p.name for p in self._params) if simple else None
        self._positional_defaults = tuple(
            p.default for p in self._params[self._first_default(self._params):]) if simple else ()
        if key is None and simple and not self._ignore:
            self._fast_arity = len(self._params)
            self._defaults_tail = self._positional_defaults
        else:
            self._fast_arity = -1
            self._defaults_tail = ()

    @property
    def parameters(self) -> tuple[inspect.Parameter, ...] | None:
        """The parameters, when every call can be keyed by the tuple of their (non-ignored) values.

        ``None`` when the function has ``*args``/``**kwargs`` or a ``key=`` function.
        """
        if self._custom is not None or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in self._params):
            return None
        return self._params

    @property
    def ignored(self) -> frozenset[str]:
        """Names of parameters left out of the key."""
        return self._ignore

    @property
    def fast_arity(self) -> int:
        """Number of positional arguments for which `local` is ``(token, args)`` when all are fast scalars.

        ``-1`` when there is no such fast path (a ``key=`` function, ignored or variadic parameters).
        """
        return self._fast_arity

    def local(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Hashable:
        """Return the in-process key of a call: cheap, hashable, equal only for equal normalised calls.

        The key is ``(token, *arguments)`` when the normalised arguments are fast scalars, else
        ``(token, CANONICAL, encoding)``; the token makes keys of different functions distinct. One flat tuple:
        the cheapest key to build, hash and compare on a memory hit.

        Raises:
            UnkeyableArgumentError: An argument cannot be keyed; the message names it.
            TypeError: The arguments do not match the signature.
        """
        if not kwargs:
            n = len(args)
            arity = self._fast_arity
            if n == arity:
                for a in args:
                    if type(a) not in _FAST:
                        break
                else:
                    return (self.token, *args)
            elif 0 <= arity - n <= len(self._defaults_tail) and arity > 0:
                full = args + self._defaults_tail[len(self._defaults_tail) - (arity - n):]
                for a in full:
                    if type(a) not in _FAST:
                        break
                else:
                    return (self.token, *full)
        canonical = self._canonical(args, kwargs)
        if type(canonical) is tuple:
            return (self.token, *canonical)
        return (self.token, CANONICAL, canonical)

    def arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Return every argument of the call by parameter name, defaults applied.

        This is how ``key=``, ``tags=`` and similar functions are called: ``tags=lambda collection, **_: ...``
        receives the ``collection`` argument however the caller passed it.
        """
        names = self._positional_names
        if names is not None and not kwargs:
            missing = len(names) - len(args)
            if missing == 0:
                return dict(zip(names, args, strict=True))
            if 0 < missing <= len(self._positional_defaults):
                return dict(zip(names, args + self._positional_defaults[-missing:], strict=True))
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    @staticmethod
    def _first_default(params: tuple[inspect.Parameter, ...]) -> int:
        """Index of the first of the trailing parameters that have defaults."""
        first = len(params)
        while first and params[first - 1].default is not params[first - 1].empty:
            first -= 1
        return first

    def _normalised(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        items: list[tuple[str, Any]] = []
        for p in self._params:
            if p.name in self._ignore:
                continue
            value = bound.arguments[p.name]
            items.append((p.name, value))
        return items

    def _canonical(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...] | bytes:
        """Return the normalised arguments as a tuple when all are fast scalars, else their encoding."""
        if self._custom is not None:
            arguments = self.arguments(args, kwargs)  # a TypeError here is the caller's: wrong arguments
            try:
                custom = self._custom(**arguments)
            except Exception as exc:
                raise KeyFunctionError(f"key= of {self.identity} raised {type(exc).__name__}: {exc}") from exc
            try:
                return _pack(["key=", _canon(custom, "key()")])
            except _Unkeyable as exc:
                raise UnkeyableArgumentError(self.identity, exc.path, exc.value) from None
        arity = self._fast_arity
        missing = arity - len(args)
        if not kwargs and arity >= 0 and 0 <= missing <= len(self._defaults_tail):
            # Every parameter is positional and none is ignored: the arguments padded with the defaults are
            # what Signature.bind would give (and the compiled wrapper always calls this way), at a fraction
            # of its cost.
            values = args + self._defaults_tail[len(self._defaults_tail) - missing:]
            items = [(p.name, value) for p, value in zip(self._params, values, strict=True)]
        else:
            items = self._normalised(args, kwargs)
        if all(type(value) in _FAST for _, value in items):
            return tuple(value for _, value in items)
        parts: list[Any] = []
        for name, value in items:
            try:
                parts.append(_canon(value, name))
            except _Unkeyable as exc:
                raise UnkeyableArgumentError(self.identity, exc.path, exc.value) from None
        return _pack(parts)

    def storage_digest(self, local_key: Hashable) -> str:
        """Return the hex digest that identifies a call in every tier below memory."""
        key: tuple[Any, ...] = local_key  # type: ignore[assignment]
        if len(key) == 3 and key[1] is CANONICAL:
            payload = key[2]
        else:
            try:
                payload = _pack(list(key[1:]))  # only _FAST scalars: already canonical as a list
            except OverflowError:  # an int beyond 64 bits is a fast scalar too; its canonical form is tagged
                payload = _pack([_canon(a, "") for a in key[1:]])
        h = self._hasher.copy()
        # Fast-path keys and canonical keys of the same call must agree: both are the msgpack array of the
        # normalised arguments (a fast key's scalars are their own canonical form).
        h.update(payload)
        return h.hexdigest()
