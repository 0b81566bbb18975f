"""How a call of a semantically cached function splits into its semantic text and its exact partition."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, cast

from cachelayers.errors import ConfigError, UnkeyableArgumentError
from cachelayers.keys import FAST_TYPES, KeyBuilder, canonical_bytes

__all__ = ["ArgumentFunctionError", "CallSplitter"]

_MEMO_ARGUMENTS: Final = 4  # partitions of at most this many scalar arguments have their digest remembered
_MEMO_SIZE: Final = 4096  # digests remembered per function (the memo starts again when full)


class ArgumentFunctionError(Exception):
    """A ``text=`` or ``partition=`` function raised ``error`` (whatever its type): the call runs uncached."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class CallSplitter:
    """Splits the arguments of one function's calls into the semantic text and the partition digest.

    The partition is every argument except the text and the ignored ones, or what the ``partition=``
    function returns, always with the function's identity, namespace and version.

    Args:
        fn: The function.
        options: The `SemanticOptions` given (``text``, ``partition``, ``ignore``, ``namespace``, ``version``,
            ``name`` are read).

    Raises:
        ConfigError: ``text`` names no parameter or an ignored one; a ``text`` function without
            ``partition``; ``partition`` is not callable.
    """

    def __init__(self, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
        self.keys = KeyBuilder(fn, namespace=options.get("namespace"), version=options.get("version", 0),
                               ignore=options.get("ignore", ()), name=options.get("name"))
        self.identity = self.keys.identity
        text = options.get("text")
        partition = options.get("partition")
        parameters = inspect.signature(fn).parameters
        names = list(parameters)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if text is None:
            candidates = [n for n, p in parameters.items()
                          if n not in ("self", "cls") and n not in self.keys.ignored and p.kind not in variadic]
            if not candidates:
                raise ConfigError("text", None, f"{self.identity}() has no parameter to take the text from")
            text = candidates[0]
        if isinstance(text, str):
            if text not in names:
                raise ConfigError("text", text, f"{self.identity}() has no such parameter")
            if parameters[text].kind in variadic:
                raise ConfigError("text", text, f"{self.identity}()'s {text} collects several arguments: name the "
                                  "one parameter that holds the text, or give a function of the arguments")
            if text in self.keys.ignored:
                raise ConfigError("ignore", text, "the text argument is never part of the partition anyway")
            self._text_arg: str | None = text
            self._text_fn: Callable[..., str] | None = None
        elif callable(text):
            if partition is None:
                raise ConfigError("partition", None, "text= is a function, so say which arguments make the "
                                  "partition with partition= (e.g. lambda model, messages, **_: (model, "
                                  "messages[:-1]))")
            self._text_arg = None
            self._text_fn = text
        else:
            raise ConfigError("text", text, "expected an argument name or a function of the arguments")
        if partition is not None and not callable(partition):
            raise ConfigError("partition", partition, "expected a function of the arguments")
        self._partition_fn: Callable[..., Any] | None = partition
        self._partition_exclude = frozenset({self._text_arg} if self._text_arg else ()) | self.keys.ignored
        self._token = self.keys.token.encode()
        self._signature = inspect.signature(fn)
        self._memo: dict[tuple[tuple[str, Any], ...], bytes] = {}
        """Partition digests of calls whose partition arguments are a few plain scalars (most calls)."""

    def prefill_rows(self, entries: Iterable[tuple[str, Any]],
                     partition_arguments: Mapping[str, Any]) -> list[tuple[str, Any, bytes]]:
        """``(text, value, partition)`` of each prefill entry with a non-blank text.

        Raises:
            TypeError: An entry is not a ``(str, value)`` pair, or as `prefill_arguments`.
        """
        rows: list[tuple[str, Any, bytes]] = []
        for item in entries:
            if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str):
                raise TypeError(f"prefill of {self.identity}: expected (text, value) pairs with a str text, "
                                f"got {item!r:.80}")
            text, value = item
            if text.strip():
                rows.append((text, value, self.partition_of(text, self.prefill_arguments(text, partition_arguments))))
        return rows

    def prefill_arguments(self, text: str, partition_arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments of a call with semantic text ``text`` and ``partition_arguments`` (for `split`).

        Ignored arguments may be left out; every argument the partition is made of must be given (or have a
        default), so that a prefilled entry lands where a real call with those arguments looks.

        Raises:
            TypeError: An argument is unknown, or one the partition needs is missing.
        """
        given = dict(partition_arguments)
        if self._text_arg is not None:
            if self._text_arg in given:
                raise TypeError(f"prefill of {self.identity}: {self._text_arg!r} is the semantic text; give it "
                                "in the entries, not as a partition argument")
            given[self._text_arg] = text
        positional: list[Any] = []  # positional-only parameters are bound by position, up to the first missing
        stand_ins: list[str] = []  # ignored ones left out hold a place, then are dropped (they key nothing)
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is not parameter.POSITIONAL_ONLY:
                break
            if name in given:
                positional.append(given.pop(name))
            elif parameter.default is not parameter.empty:
                positional.append(parameter.default)
            elif name in self.keys.ignored:
                positional.append(None)
                stand_ins.append(name)
            else:
                break
        try:
            bound = self._signature.bind_partial(*positional, **given)
        except TypeError as exc:
            raise TypeError(f"prefill of {self.identity}: {exc}") from None
        for name in stand_ins:
            del bound.arguments[name]
        bound.apply_defaults()
        if self._partition_fn is None:
            missing = [name for name, p in self._signature.parameters.items()
                       if name not in bound.arguments and name not in self._partition_exclude
                       and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if missing:
                raise TypeError(f"prefill of {self.identity}: missing partition argument(s) "
                                f"{', '.join(map(repr, missing))}")
        return dict(bound.arguments)

    def partition_of(self, text: str, arguments: dict[str, Any]) -> bytes:
        """The partition digest of a prefilled entry (``arguments`` from `prefill_arguments`).

        Raises:
            TypeError: A ``partition=`` function needs an argument that was not given.
            UnkeyableArgumentError: A partition argument cannot be keyed.
        """
        if self._text_fn is None:
            return self.split(arguments)[1]
        value = ("partition=", self._partition_fn(**arguments) if self._partition_fn is not None else None)
        return self._digest(value)

    def split(self, arguments: dict[str, Any]) -> tuple[str, bytes]:
        """The semantic text and the partition digest of a call's bound ``arguments``.

        Raises:
            TypeError: The text is not a ``str``.
            UnkeyableArgumentError: A partition argument cannot be keyed.
            ArgumentFunctionError: A ``text=`` or ``partition=`` function raised (whatever it raised).
        """
        if self._text_fn is not None:
            try:
                text = self._text_fn(**arguments)
            except Exception as exc:
                raise ArgumentFunctionError(exc) from exc
            where = "text= function"
        else:
            text = arguments[cast(str, self._text_arg)]
            where = f"argument {self._text_arg!r}"
        if not isinstance(text, str):
            raise TypeError(f"semantic_cached {self.identity}(): the semantic text ({where}) must be a str, "
                            f"got {type(text).__name__}")
        if self._partition_fn is not None:
            try:
                value_of_partition = self._partition_fn(**arguments)
            except Exception as exc:
                raise ArgumentFunctionError(exc) from exc
            return text, self._digest(("partition=", value_of_partition))
        value = {k: v for k, v in arguments.items() if k not in self._partition_exclude}
        if len(value) > _MEMO_ARGUMENTS or any(type(v) not in FAST_TYPES for v in value.values()):
            return text, self._digest(value)
        memo_key = tuple(value.items())  # values of these types never equal one of another type (1 == True)
        digest = self._memo.get(memo_key)
        if digest is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            digest = self._memo[memo_key] = self._digest(value)
        return text, digest

    def _digest(self, value: Any) -> bytes:
        try:
            encoded = canonical_bytes(value)
        except TypeError:
            raise self._unkeyable(value) from None
        h = hashlib.blake2b(digest_size=16, person=b"cachelayers-sp1")
        h.update(self._token)
        h.update(b"\x00")
        h.update(encoded)
        return h.digest()

    def _unkeyable(self, value: Any) -> UnkeyableArgumentError:
        if isinstance(value, dict):
            for name, item in value.items():
                try:
                    canonical_bytes(item)
                except TypeError:
                    return UnkeyableArgumentError(self.identity, name, item, option="partition")
        return UnkeyableArgumentError(self.identity, "partition=", value[1] if isinstance(value, tuple) else value,
                                      option="partition")
