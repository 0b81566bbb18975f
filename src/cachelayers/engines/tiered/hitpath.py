"""The compiled hit path of a cached function: the ``async def`` that answers a memory hit with no task, no
string formatting and no signature binding, and hands everything else to the engine's miss path."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from cachelayers.backends.base import MISSING, LocalTier
from cachelayers.keys import FAST_TYPES, KeyBuilder, KeyFunctionError
from cachelayers.metrics import FunctionStats

__all__ = ["HitPath", "compile_hit_path"]

HitPath = tuple[Callable[..., Any], Callable[..., Any], Callable[[tuple[Any, ...]], None]]
"""The compiled function, its watched twin (for while a control block is open) and its ``set_parts`` (give it
the memory tier's `LocalTier.peek_parts`, or its `LocalTier.idle_peek_parts` when bound to none)."""


def _parameter_source(keys: KeyBuilder, defaults: dict[str, Any], wait: str) -> tuple[str, str, str, str]:
    """The parameter list of the compiled function, how it rebuilds ``args`` and ``kwargs``, and how it keys.

    When the function's parameters allow (no ``*args``/``**kwargs``, no ``key=``), the compiled function gets
    the function's own parameter list: Python's call machinery then binds the arguments and applies the
    defaults, so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` arrive as the same locals and the key is one
    tuple of them (the tuple `KeyBuilder.local` builds for such calls). Otherwise it takes ``*args, **kwargs``
    and asks `KeyBuilder.local`. The defaults are put in ``defaults``, the namespace the source runs in; ``wait``
    is ``"await "`` in an ``async def``, else empty.
    """
    params = keys.parameters
    if params is None or any(p.name.startswith("_cl_") for p in params):
        return "*args, **kwargs", "args", "kwargs", f"""try:
            _cl_key = _cl_local_key_of(args, kwargs)
        except _cl_key_failed as _cl_error:
            return {wait}_cl_uncached(_cl_error, args, kwargs)"""
    signature: list[str] = []
    kind = None
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and kind is not p.KEYWORD_ONLY:
            signature.append("*")
        elif kind is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY:
            signature.append("/")
        kind = p.kind
        if p.default is p.empty:
            signature.append(p.name)
        else:
            defaults[f"_cl_default_{i}"] = p.default
            signature.append(f"{p.name}=_cl_default_{i}")
    if kind is inspect.Parameter.POSITIONAL_ONLY:
        signature.append("/")
    keyed = [p.name for p in params if p.name not in keys.ignored]
    args = "(" + "".join(f"{p.name}, " for p in params if p.kind is not p.KEYWORD_ONLY) + ")"
    kwargs = "{" + ", ".join(f"{p.name!r}: {p.name}" for p in params if p.kind is p.KEYWORD_ONLY) + "}"
    key = f"""if {" and ".join(f"type({n}) in _cl_fast" for n in keyed) or "True"}:
            _cl_key = (_cl_token, {"".join(f"{n}, " for n in keyed)})
        else:
            _cl_key = _cl_local_key_of({args}, {kwargs})"""
    return ", ".join(signature), args, kwargs, key


def compile_hit_path(keys: KeyBuilder, stats: FunctionStats, miss: Callable[..., Any],
                     count_cost: Callable[[Any], None] | None, local: type[LocalTier],
                     uncached: Callable[..., Any], controlled: Callable[..., Any], *, sync: bool = False) -> HitPath:
    """Compile the hit path of one cached function.

    What it reads lives in closure cells, the fastest loads Python has; the memory tier's lookup is its
    `LocalTier.INLINE_PEEK`, compiled in, reading the tier's `LocalTier.peek_parts` from cells as well. Its
    *watched* twin, with the same parameters, builds the key the same way and hands every call to
    ``controlled``: callers switch to it while a `control.bypass`/`control.refresh`/explain block is open
    anywhere, so the hit path itself checks nothing.

    With ``sync=True`` the function is a plain ``def`` called from any thread: ``miss``, ``uncached`` and
    ``controlled`` are then sync too, and the memory lookup treats a `KeyError` (the entry removed by the
    engine's thread between two steps of the lookup) as a miss.

    Args:
        keys: The function's key builder.
        stats: The function's counters; the hit path counts its hits there.
        miss: Called as ``await miss(key, args, kwargs)`` when memory has no fresh entry (or the hit path is
            not bound to a memory tier).
        count_cost: Counts the cost a hit saved, or ``None`` when the function declares no cost.
        local: The class of the memory tiers it will read (its `LocalTier.INLINE_PEEK` is compiled in).
        uncached: Called as ``await uncached(error, args, kwargs)`` when a ``key=`` function raised
            (`KeyFunctionError`): the call runs uncached.
        controlled: Called as ``await controlled(key, args, kwargs)`` while a control block is open.
        sync: Compile a ``def`` (for a sync function) instead of an ``async def``.

    Returns:
        The compiled function, its watched twin and its ``set_parts``.
    """
    namespace: dict[str, Any] = {}
    wait = "" if sync else "await "
    signature, args, kwargs, key = _parameter_source(keys, namespace, wait)
    count = "_cl_count_cost(_cl_value)" if count_cost is not None else "pass"
    idle = local.idle_peek_parts()
    parts = ", ".join(f"_cl_p{i}" for i in range(len(idle)))
    peek = local.INLINE_PEEK.format(key="_cl_key", value="_cl_value", missing="_cl_missing", tmp="_cl_tmp",
                                    **{f"p{i}": f"_cl_p{i}" for i in range(len(idle))})
    if sync:
        peek = "try:\n" + "".join(f"    {line}\n" for line in peek.splitlines()) + \
               "except KeyError:\n    _cl_value = _cl_missing\n"
    peek = "".join(f"        {line}\n" for line in peek.splitlines())
    source = f"""
def _cl_make(_cl_local_key_of, _cl_token, _cl_fast, _cl_stats, _cl_miss, _cl_count_cost, _cl_missing, _cl_idle,
             _cl_key_failed, _cl_uncached, _cl_controlled):
    {parts}, = _cl_idle

    _cl_hits = 0

    def set_parts(parts):
        nonlocal {parts}
        {parts}, = parts

    def _cl_hits_now():
        return _cl_hits

    {"" if sync else "async "}def wrapper({signature}):
        nonlocal _cl_hits
        {key}
{peek}        if _cl_value is not _cl_missing:
            _cl_hits += 1
            {count}
            return _cl_value
        return {wait}_cl_miss(_cl_key, {args}, {kwargs})

    {"" if sync else "async "}def watched({signature}):
        {key}
        return {wait}_cl_controlled(_cl_key, {args}, {kwargs})

    _cl_stats.count_hits_with(_cl_hits_now)
    return wrapper, watched, set_parts
"""
    exec(compile(source, f"<cachelayers wrapper of {keys.identity}>", "exec"), namespace)
    made: HitPath = namespace["_cl_make"](keys.local, keys.token, FAST_TYPES, stats, miss, count_cost, MISSING,
                                          idle, KeyFunctionError, uncached, controlled)
    return made
