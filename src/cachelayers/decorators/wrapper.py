"""The common face of the decorators' wrapper classes: the wrapped function's signature, a method when bound."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, Self, TypeVar, cast, overload

__all__ = ["FunctionWrapper"]

P = ParamSpec("P")
R = TypeVar("R")


class FunctionWrapper(Generic[P, R]):
    """A callable that stands for a decorated function: same signature, same name, binds as a method.

    Calling it calls the engine's call path directly: ``__call__`` is a slot of each instance, holding that
    function, so a call costs no frame of this class. `inspect.iscoroutinefunction` is true of it when the call
    path is an ``async def`` (an async function was decorated) and false for a sync one; it binds to an
    instance when it is a method, and it pickles by reference like a function.

    Args:
        fn: The decorated function.
        call: The engine's call path, with ``fn``'s parameters, returning ``R`` (a coroutine for an async
            function).
    """

    # "__call__" as a slot: calling an instance looks it up on the class, finds the slot's descriptor and
    # calls what the instance holds there, with no Python frame in between.
    __slots__ = ("__call__", "__dict__", "__weakref__")

    __call__: Callable[P, R]
    __wrapped__: Callable[P, Any]
    __name__: str
    __qualname__: str

    def __init__(self, fn: Callable[P, Any], call: Callable[P, R]) -> None:
        self.__call__ = call
        functools.update_wrapper(self, fn, updated=())  # not the wrapped object's __dict__: ours is ours

    def _use(self, call: Callable[P, R]) -> None:
        """Call ``call`` from now on (an engine switching between its hit path and its watched twin)."""
        self.__call__ = call

    # What `inspect.iscoroutinefunction` reads of a function-like object (Python 3.11 has no other way to mark
    # a callable object as a coroutine function): those of the call path.

    @property
    def __code__(self) -> types.CodeType:
        return cast(types.FunctionType, self.__call__).__code__

    @property
    def __defaults__(self) -> tuple[Any, ...] | None:
        return cast(types.FunctionType, self.__call__).__defaults__

    @property
    def __kwdefaults__(self) -> dict[str, Any] | None:
        return cast(types.FunctionType, self.__call__).__kwdefaults__

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None, /) -> Self: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Callable[..., R]: ...

    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Any:
        """As a method: bound to ``instance``, like a function."""
        if instance is None:
            return self
        return types.MethodType(self, instance)

    def __reduce__(self) -> str:
        """Pickled by reference, as a function is: by its module and qualified name."""
        return self.__qualname__
