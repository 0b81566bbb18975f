"""`@semantic_cached`: answers from a similar earlier call, as a decorator."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any, ParamSpec, Protocol, TypeVar, Unpack, cast, final, overload

from cachelayers.decorators.wrapper import FunctionWrapper
from cachelayers.engines.semantic import SemanticCacheInfo, SemanticFunction, SemanticOptions
from cachelayers.engines.sync import blocking, is_async, run, to_async
from cachelayers.validation import check_options

__all__ = ["SemanticCachedFunction", "SemanticDecorator", "SyncSemanticCachedFunction", "semantic_cached"]

P = ParamSpec("P")
T = TypeVar("T")


@final
class SemanticCachedFunction(FunctionWrapper[P, Coroutine[Any, Any, T]]):
    """What `semantic_cached` returns: the function, same signature, plus cache management.

    Calling it returns a coroutine of the function's result. How a call was answered is told by
    `cachelayers.explain` / `cachelayers.last_lookup`, never by the return value.
    """

    def __init__(self, engine: SemanticFunction[P, T]) -> None:
        super().__init__(engine.fn, engine.wrapper)
        self.cache = engine
        """The engine behind the function."""

    def cache_info(self) -> SemanticCacheInfo:
        """Hits per level, misses, entries, evictions, errors, verifier outcomes, latencies."""
        return self.cache.cache_info()

    async def cache_clear(self) -> None:
        """Remove every entry of the function (every process's, when shared), and what a computation that began
        before the clear would store after it (in any process).

        Limited by ``Settings.invalidation_limit`` and audited on the ``cachelayers.audit`` logger, as the exact
        cache's clears are.

        Raises:
            RateLimitExceeded: Over ``Settings.invalidation_limit`` (nothing was removed).
            Exception: The store failed (a shared store may be partly cleared; computations in flight in this
                process still store nothing).
        """
        await self.cache.cache_clear()

    async def invalidate_all(self) -> None:
        """Same as `cache_clear`."""
        await self.cache.cache_clear()

    async def prefill(self, entries: Iterable[tuple[str, T]], /, **partition_arguments: Any) -> int:
        """Pre-load answers: store each ``(text, value)`` pair as if the function had computed it.

        Like GPTCache's ``import_data``: known questions and their answers go in before traffic does. Entries are
        stored as given, even when one looks like another; an entry with the text of an existing one replaces
        it. Entries with an empty text are skipped, as such calls are never cached. The TTL is the function's,
        and the bounds apply.

        With a ``text=`` function the entry's text is not an argument, so give the arguments of a whole call:
        ``partition=`` sees them as given. A chat function whose partition is ``messages[:-1]`` then takes
        ``messages`` ending with a stand-in for the message each entry's text is
        (``messages=[system, {"role": "user", "content": ""}]``); without it, the partition would drop the
        system message and no call would find the entries.

        Args:
            entries: ``(semantic text, result)`` pairs.
            **partition_arguments: The other arguments of the calls these entries answer, by name (ignored
                arguments may be left out): the entries are stored in those calls' partition.

        Returns:
            How many entries were stored (an entry replaced or evicted by a later one of the same prefill
            counts). A value the store cannot encode (a class neither registered nor named by the return
            annotation, with a disk or Redis index) is skipped, logged and counted in
            ``cache_info().unstorable``, not in this number.

        Raises:
            TypeError: An entry is not a ``(str, value)`` pair; a partition argument is unknown or missing.
            UnkeyableArgumentError: A partition argument cannot be keyed.
            EmbeddingError: The embedder failed.
            Exception: The store could not be opened.

        Example::

            await ask.prefill([("How do I reset my password?", "Use the reset link.")], tenant="acme")
        """
        return await self.cache.prefill(entries, **partition_arguments)

    async def save(self) -> None:
        """Persist the index now (disk mode: an atomic snapshot; otherwise a no-op)."""
        await self.cache.save()

    async def aclose(self) -> None:
        """Save and close the store (the next call opens it again)."""
        await self.cache.aclose()

    def __repr__(self) -> str:
        return f"<semantic_cached {self.cache.identity}>"


@final
class SyncSemanticCachedFunction(FunctionWrapper[P, T]):
    """What `semantic_cached` returns for a plain ``def``: the same engine, called from any thread.

    Each call blocks its thread while the library's loop embeds and looks up; the function runs in the calling
    thread. `cachelayers.explain` and `cachelayers.last_lookup` work as for the async form. The management
    methods block too.
    """

    def __init__(self, fn: Callable[P, T], engine: SemanticFunction[P, T]) -> None:
        super().__init__(fn, blocking(engine.wrapper, fn))
        self.cache = engine
        """The engine behind the function."""

    def cache_info(self) -> SemanticCacheInfo:
        """Hits per level, misses, entries, evictions, errors, verifier outcomes, latencies."""
        return self.cache.cache_info()

    def cache_clear(self) -> None:
        """Remove every entry of the function (every process's, when shared)."""
        run(self.cache.cache_clear)

    def invalidate_all(self) -> None:
        """Same as `cache_clear`."""
        run(self.cache.cache_clear)

    def prefill(self, entries: Iterable[tuple[str, T]], /, **partition_arguments: Any) -> int:
        """Pre-load ``(text, value)`` pairs into the partition the arguments name; blocks until stored.

        The same as `SemanticCachedFunction.prefill`, for a ``def`` function.

        Returns:
            How many entries were stored.
        """
        return run(lambda: self.cache.prefill(entries, **partition_arguments))

    def save(self) -> None:
        """Persist the index now (disk mode: an atomic snapshot; otherwise a no-op)."""
        run(self.cache.save)

    def close(self) -> None:
        """Save and close the store (the next call opens it again)."""
        run(self.cache.aclose)

    def __repr__(self) -> str:
        return f"<semantic_cached {self.cache.identity}>"


class SemanticDecorator(Protocol):
    """What `semantic_cached` returns: decorates an ``async def`` or a plain ``def``."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> SemanticCachedFunction[P, T]: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, fn: Callable[P, T], /) -> SyncSemanticCachedFunction[P, T]: ...


def semantic_cached(**options: Unpack[SemanticOptions]) -> SemanticDecorator:
    """Answer calls from a *similar* earlier call of the same partition.

    The semantic text (one argument) is embedded and looked up among earlier calls whose other arguments —
    the partition — are equal; the stored result of the nearest one is returned when its cosine similarity
    is at least ``threshold``. Otherwise the function runs and its result is stored. A plain ``def`` is
    decorated too (see the guide "Sync functions").

    Args:
        embed: Embedder, sync or async ``list[str] -> (n, d)`` array; the built-in offline
            `cachelayers.embedders.HashingEmbedder` by default (near-duplicates only: see its docs).
        threshold: Least similarity for a hit, in [0, 1]; the embedder's calibrated ``default_threshold``
            when omitted. Measure yours with ``cachelayers calibrate`` (``--replay`` for a replay's false hits).
        margin: Ambiguity margin in [0, 1]: the nearest entry is served only when its similarity exceeds the
            second nearest's by at least this much (two entries about as near as each other: neither is
            served; an entry with the same words as the nearest, one question stored twice, is passed over).
            The embedder's ``default_margin`` when neither ``threshold`` nor ``margin`` is given
            (`cachelayers.embedders.minilm` carries 0.06 with its 0.90), else 0.
        text: Name of the argument holding the text (by default the first parameter other than ``self``,
            ``cls``, those in ``ignore`` and ``*args``/``**kwargs``), or a function of the
            arguments (by name) returning it, e.g. ``lambda messages, **_: messages[-1]["content"]``.
        partition: Function of the arguments (by name) returning what must be *equal* for two calls to share
            an answer; by default every argument except the text and ``ignore``. Required with a ``text``
            function. Include the tenant.
        ignore: Arguments left out of the default partition (clients, ``self``).
        ttl: Lifetime of entries (seconds, ``"1h"``, a timedelta); the settings' ``default_ttl`` when
            omitted. A hit never extends it.
        max_entries: Capacity of each partition, 10,000 by default (LRU eviction removes vector and payload).
        max_total_entries: Capacity across all partitions of the function, 100,000 by default: past it the
            least recently used entry of any partition is evicted, and a partition left empty is freed with
            its index (a partition per tenant stays bounded however many tenants come and go). All functions
            together are bounded by ``Settings.semantic_max_entries`` (500,000 by default, process-wide).
        verifier: ``(text, candidate) -> bool``, async or plain: a second stage that must accept a candidate
            before it is served (e.g. a cross-encoder or an LLM judge). If it raises, the candidate is rejected. The
            embedder's ``default_verifier`` (if any) when neither ``threshold`` nor ``verifier`` is given.
        agreement: An `AnswerAgreement`: compute some would-be hits instead of serving them and compare the
            answers, as often as the disagreements seen require to keep wrong answers near its ``max_error``
            (see the semantic caching guide). Off by default: it fits functions whose answers can be compared.
        max_candidates: Candidates above the threshold offered to the verifier, best first (4 by default).
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
        ConfigError: At decoration time: ``threshold`` or ``margin`` outside [0, 1] (or missing with an uncalibrated
            embedder), ``text`` naming no parameter, a ``text`` function without ``partition``, a bad
            ``ttl``, ``max_entries``, ``max_total_entries``, ``vector_index`` or ``agreement``.
        TypeError: An unknown option (at once); the function is not callable. At call time, a semantic text
            that is not a ``str``, or a partition argument that cannot be keyed (`UnkeyableArgumentError`).
    """
    check_options(options, SemanticOptions, "semantic_cached")

    def decorate(f: Callable[P, Any]) -> SemanticCachedFunction[P, Any] | SyncSemanticCachedFunction[P, Any]:
        if not callable(f):
            raise TypeError(f"semantic_cached needs a function, got {f!r}")
        if is_async(f):
            return SemanticCachedFunction(SemanticFunction(f, **options))
        return SyncSemanticCachedFunction(f, SemanticFunction(to_async(f), **options))

    return cast(SemanticDecorator, decorate)
