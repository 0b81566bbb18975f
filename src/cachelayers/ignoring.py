"""Types left out of cache keys: request-scoped objects such as a web request, a response, an API client.

Registered with `ignore_type`; `cachelayers.keys` leaves parameters annotated with such a type out of a
function's keys (`ignored_parameters`) and keys any other value of such a type as one fixed marker.
"""

from __future__ import annotations

import ast
import inspect
import sys
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, Final

from cachelayers.errors import ConfigError

__all__ = ["ignore_type", "ignored_parameters", "ignored_types"]

# Types left out of keys, by type (see `ignore_type`). The built-in entries are named by module and attribute
# and resolved only once their module has been imported by someone else: cachelayers never imports starlette,
# httpx or an SDK to find them (a value of a class whose module is not imported cannot exist).
_BUILTIN_IGNORED: Final = (
    ("starlette.requests", "HTTPConnection"),  # Request and WebSocket (fastapi.Request is this class)
    ("starlette.responses", "Response"),
    ("starlette.background", "BackgroundTasks"),  # fastapi.BackgroundTasks subclasses it
    ("starlette.websockets", "WebSocket"),
    ("fastapi.security", "SecurityScopes"),
    ("httpx", "AsyncClient"),
    ("httpx", "Client"),
    ("httpx2", "AsyncClient"),  # what recent openai SDKs are built on
    ("httpx2", "Client"),
    ("aiohttp", "ClientSession"),
    ("openai", "AsyncOpenAI"),
    ("openai", "OpenAI"),
    ("anthropic", "AsyncAnthropic"),
    ("anthropic", "Anthropic"),
    ("redis.asyncio", "Redis"),
    ("redis", "Redis"),
)
_ignored_lock = threading.Lock()
_ignored_pending: list[tuple[str, str]] = list(_BUILTIN_IGNORED)
_ignored_resolved: tuple[type, ...] = ()
_ignored_seen_modules = -1  # len(sys.modules) when the pending names were last looked for


def ignore_type(cls: type | str) -> None:
    """Leave every argument of type ``cls`` (or a subclass) out of cache keys and semantic partitions.

    For request-scoped objects that never change what a function computes: a web framework's request or
    response, background tasks, an HTTP, database or API client. Built in: starlette's and FastAPI's
    ``Request``, ``WebSocket``, ``Response``, ``BackgroundTasks`` and ``SecurityScopes``; ``httpx``'s
    ``AsyncClient`` and ``Client``; ``aiohttp.ClientSession``; ``openai``'s and ``anthropic``'s clients;
    ``redis``' ``Redis`` (sync and asyncio). None of these packages is imported to find them.

    A parameter annotated with such a type (also ``Annotated[T, ...]`` or ``T | None``) is left out of the
    key when the function is decorated, exactly like ``ignore=("name",)``; an unannotated argument whose
    value has such a type keys as one fixed marker. Register your own types before decorating the functions
    that take them. A function that computes from such an argument (reads the request's query string, say)
    must key on what it reads: pass those values as parameters of their own, or use ``key=``.

    Args:
        cls: The class, or ``"module:Name"`` to register it without importing ``module`` (resolved once
            the module has been imported).

    Raises:
        ConfigError: ``cls`` is not a class or a ``"module:Name"`` string, or is a type whose values are
            keyed (``str``, ``int``, ``bytes``, ``float``, ``bool``, ``object``, ``None``, containers).
    """
    global _ignored_resolved, _ignored_seen_modules
    if isinstance(cls, str):
        module, sep, name = cls.partition(":")
        if not sep or not module or not name.isidentifier():
            raise ConfigError("ignore_type", cls, "expected a class or a 'module:Name' string")
        with _ignored_lock:
            _ignored_pending.append((module, name))
            _ignored_seen_modules = -1
        return
    if not isinstance(cls, type):
        raise ConfigError("ignore_type", cls, "expected a class or a 'module:Name' string")
    if cls in (object, type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict, set,
               frozenset):
        raise ConfigError("ignore_type", cls, "values of this type are keyed; ignore a parameter by name "
                                              "with ignore=(...) instead")
    with _ignored_lock:
        if cls not in _ignored_resolved:
            _ignored_resolved = (*_ignored_resolved, cls)


def ignored_types() -> tuple[type, ...]:
    """The types left out of keys (see `ignore_type`) whose modules have been imported so far."""
    global _ignored_resolved, _ignored_seen_modules
    seen = len(sys.modules)
    if seen == _ignored_seen_modules:
        return _ignored_resolved
    with _ignored_lock:
        found: list[type] = []
        for module_name, name in list(_ignored_pending):
            module = sys.modules.get(module_name)
            value = getattr(module, name, None) if module is not None else None
            if isinstance(value, type):
                found.append(value)
                _ignored_pending.remove((module_name, name))
        for tp in found:
            if tp not in _ignored_resolved:
                _ignored_resolved = (*_ignored_resolved, tp)
        _ignored_seen_modules = seen
        return _ignored_resolved


def _is_ignored_annotation(annotation: Any, ignored: tuple[type, ...]) -> bool:
    """Whether a parameter annotated ``annotation`` only ever receives values of ignored types (or ``None``)."""
    if isinstance(annotation, type):
        return annotation is not type(None) and issubclass(annotation, ignored)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_ignored_annotation(typing.get_args(annotation)[0], ignored)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(members) and all(_is_ignored_annotation(a, ignored) for a in members)
    return False


def ignored_parameters(fn: Callable[..., Any]) -> frozenset[str]:
    """Names of the parameters of ``fn`` annotated with a type left out of keys (see `ignore_type`).

    String annotations (``from __future__ import annotations``) are resolved in ``fn``'s module; one that
    cannot be resolved is kept in the key.
    """
    ignored = ignored_types()
    if not ignored:
        return frozenset()
    target = inspect.unwrap(fn)
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # one annotation does not resolve (a local name): resolve them one by one
        namespace = getattr(target, "__globals__", {})
        raw = getattr(target, "__annotations__", None) or {}
        hints = {name: _resolve_annotation(raw[name], namespace) for name in names if name in raw}
    return frozenset(name for name in names if _is_ignored_annotation(hints.get(name), ignored))


def _resolve_annotation(annotation: Any, namespace: dict[str, Any]) -> Any:
    """``annotation`` evaluated in ``namespace`` when it is a string; ``Annotated[T, ...]`` needs only ``T``."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(namespace))  # the annotation's own text, as typing.get_type_hints does
    except Exception:
        pass
    try:
        tree = ast.parse(annotation, mode="eval").body
        if isinstance(tree, ast.Subscript) and isinstance(tree.slice, ast.Tuple) and tree.slice.elts:
            return eval(ast.unparse(tree.slice.elts[0]), dict(namespace))
    except Exception:
        pass
