"""How ``key=`` and ``cost=`` functions get the call's arguments: by name, binding the signature only when needed."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["ArgFunction", "positional_names"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def positional_names(signature: inspect.Signature) -> tuple[str, ...] | None:
    """The parameter names of a function taking only positional parameters (no ``*args``, ``**kwargs`` or
    keyword-only ones); ``None`` for any other.

    A call passing exactly that many positional arguments binds each to its parameter in order, with no
    default to apply: `ArgFunction.positional` can then be used instead of binding the signature.
    """
    params = signature.parameters.values()
    if all(p.kind in _POSITIONAL for p in params):
        return tuple(p.name for p in params)
    return None


class ArgFunction:
    """A user function of the call's arguments, called with the arguments it names (all, with ``**kw``).

    ``self(arguments)`` takes the call's arguments as the decorated function's signature binds them (defaults
    applied). ``self.positional``, when not ``None``, gives the same result from the positional arguments of
    a call that passes exactly the parameters `positional_names` lists: ``self.positional(*args)``.

    Args:
        fn: The user's function.
        params: `positional_names` of the decorated function.
    """

    __slots__ = ("fn", "names", "positional")

    def __init__(self, fn: Callable[..., Any], params: Sequence[str] | None = None) -> None:
        self.fn = fn
        self.names: frozenset[str] | None = None
        self.positional: Callable[..., Any] | None = None
        try:
            own = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return
        takes_all = any(p.kind is p.VAR_KEYWORD for p in own)
        if not takes_all:
            self.names = frozenset(p.name for p in own if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if params is not None and not any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in own):
            self.positional = _positional_caller(fn, own, params, self.names)

    def __call__(self, arguments: Mapping[str, Any]) -> Any:
        if self.names is None:
            return self.fn(**arguments)
        return self.fn(**{k: v for k, v in arguments.items() if k in self.names})


def _positional_caller(fn: Callable[..., Any], own: list[inspect.Parameter], params: Sequence[str],
                       names: frozenset[str] | None) -> Callable[..., Any]:
    """``fn`` called from the decorated function's positional arguments as `ArgFunction` calls it by name.

    ``fn``'s leading positional-or-keyword parameters that the decorated function has are passed by position
    (the same binding as by name); the other arguments it takes are passed by name.
    """
    index = {name: i for i, name in enumerate(params)}
    positions: list[int] = []
    for p in own:
        if p.kind is not p.POSITIONAL_OR_KEYWORD or p.name not in index:
            break
        positions.append(index[p.name])
    taken = set(positions)
    by_name = [(name, i) for name, i in index.items() if i not in taken and (names is None or name in names)]
    if not by_name:
        if positions == list(range(len(params))):
            return fn  # fn(*args): the parameters in the same order
        if len(positions) == 1:
            only = positions[0]
            return lambda *args: fn(args[only])
        return lambda *args: fn(*[args[i] for i in positions])
    return lambda *args: fn(*[args[i] for i in positions], **{name: args[i] for name, i in by_name})
