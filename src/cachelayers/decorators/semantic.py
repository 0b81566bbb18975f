"""`@semantic_cached`: answers from a similar earlier call, as a decorator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import timedelta
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from cachelayers.engines.semantic import SemanticCacheInfo, SemanticFunction, Verifier
from cachelayers.engines.tiered import TieredCache

__all__ = ["SemanticCachedFunction", "semantic_cached"]

P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co")


class SemanticCachedFunction(Protocol[P, T_co]):
    """What `semantic_cached` returns: the function, same signature, plus cache management.

    At run time it is a plain ``async def`` function. How a call was answered is told by
    `cachelayers.explain` / `cachelayers.last_lookup`, never by the return value.
    """

    __wrapped__: Callable[P, Awaitable[T_co]]
    cache: SemanticFunction[P, Any]
    """The engine behind the function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...

    def cache_info(self) -> SemanticCacheInfo:
        """Hits per level, misses, entries, evictions, errors, verifier outcomes, latencies."""
        ...

    async def cache_clear(self) -> None:
        """Remove every entry of the function (every process's, when shared)."""
        ...

    async def invalidate_all(self) -> None:
        """Same as `cache_clear`."""
        ...

    async def save(self) -> None:
        """Persist the index now (disk mode)."""
        ...

    async def aclose(self) -> None:
        """Save and close the store."""
        ...


def semantic_cached(
    *,
    embed: Callable[[list[str]], Any] | None = None,
    threshold: float | None = None,
    text: str | Callable[..., str] | None = None,
    partition: Callable[..., Any] | None = None,
    ignore: Iterable[str] = (),
    ttl: float | str | timedelta | None = None,
    max_entries: int = 10_000,
    verifier: Verifier | None = None,
    max_candidates: int = 4,
    namespace: str | None = None,
    version: str | int = 0,
    name: str | None = None,
    cache: TieredCache | None = None,
    cache_embeddings: bool = True,
    vector_index: str | None = None,
    clock: Callable[[], float] | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], SemanticCachedFunction[P, T]]:
    """Answer calls from a *similar* earlier call of the same partition.

    The semantic text (one argument) is embedded and looked up among earlier calls whose other arguments —
    the partition — are equal; the stored result of the nearest one is returned when its cosine similarity
    is at least ``threshold``. Otherwise the function runs and its result is stored.

    Args:
        embed: Embedder, sync or async ``list[str] -> (n, d)`` array; the built-in offline
            `cachelayers.embedders.HashingEmbedder` by default (near-duplicates only: see its docs).
        threshold: Least similarity for a hit, in [0, 1]; the embedder's calibrated ``default_threshold``
            when omitted. Measure yours with ``cachelayers calibrate``.
        text: Name of the argument holding the text (the first parameter by default), or a function of the
            arguments (by name) returning it, e.g. ``lambda messages, **_: messages[-1]["content"]``.
        partition: Function of the arguments (by name) returning what must be *equal* for two calls to share
            an answer; by default every argument except the text and ``ignore``. Required with a ``text``
            function. Include the tenant.
        ignore: Arguments left out of the default partition (clients, ``self``).
        ttl: Lifetime of entries (seconds, ``"1h"``, a timedelta); a hit never extends it.
        max_entries: Capacity of each partition (LRU eviction removes vector and payload).
        verifier: ``async (text, candidate) -> bool``: a second stage that must accept a candidate before it
            is served (e.g. a cross-encoder or an LLM judge). If it raises, the candidate is rejected.
        max_candidates: Candidates above the threshold offered to the verifier, best first.
        namespace: Group of entries; the function's identity by default.
        version: Bump it to stop serving entries stored by older code.
        name: Identity used instead of ``module.qualname``.
        cache: Tiered cache for embeddings; the default cache of the settings in force when omitted.
        cache_embeddings: Set to ``False`` not to cache embeddings.
        vector_index: Where entries live, overriding ``Settings.vector_index`` (``memory://``,
            ``usearch:///dir``, ``redis://host:port/db``).
        clock: Wall-clock time source for expiry (tests).

    Returns:
        A decorator making a `SemanticCachedFunction`.

    Raises:
        ConfigError: At decoration time: ``threshold`` outside [0, 1] (or missing with an uncalibrated
            embedder), ``text`` naming no parameter, a ``text`` function without ``partition``, a bad
            ``ttl``, ``max_entries`` or ``vector_index``.
        TypeError: The function is not async. At call time, a semantic text that is not a ``str``, or a
            partition argument that cannot be keyed (`UnkeyableArgumentError`).
    """

    def decorate(f: Callable[P, Awaitable[T]]) -> SemanticCachedFunction[P, T]:
        engine = SemanticFunction(f, embed=embed, threshold=threshold, text=text, partition=partition,
                                  ignore=ignore, ttl=ttl, max_entries=max_entries, verifier=verifier,
                                  max_candidates=max_candidates, namespace=namespace, version=version, name=name,
                                  cache=cache, cache_embeddings=cache_embeddings, vector_index=vector_index,
                                  clock=clock)
        return cast(SemanticCachedFunction[P, T], engine.wrapper)

    return decorate
