"""The engine of one semantically cached function: split a call, look it up, compute and store on a miss.

A call is answered at one of four levels (``exact``, ``semantic``, ``computed``, ``uncached``), reported by
`cachelayers.explain` and `cachelayers.last_lookup`; the semantic caching guide tells how.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Final, Generic, ParamSpec, TypeVar, Unpack, cast

import anyio
import numpy as np

from cachelayers import audit
from cachelayers.backends.vectors import GONE
from cachelayers.codec import Codec, allowed_types
from cachelayers.durations import parse_ttl
from cachelayers.embedders import HashingEmbedder, embed, embedder_name
from cachelayers.engines.batcher import Batcher
from cachelayers.engines.flight import Flight
from cachelayers.engines.semantic.agreement import AnswerAgreement
from cachelayers.engines.semantic.arguments import ArgumentFunctionError, CallSplitter
from cachelayers.engines.semantic.info import LogNames, SemanticCacheInfo, SemanticStats
from cachelayers.engines.semantic.judge import Judge
from cachelayers.engines.semantic.lookups import Lookup, ambiguous, record
from cachelayers.engines.semantic.options import (
    DEFAULT_MAX_CANDIDATES,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_TOTAL_ENTRIES,
    SIMILARITY_TOLERANCE,
    SemanticOptions,
    check_lasting,
)
from cachelayers.engines.semantic.store import Entry, SemanticStore, open_store
from cachelayers.engines.tiered import TieredCache, default_cache
from cachelayers.engines.tiered.guard import InvalidationGuard
from cachelayers.errors import BatchError, CircuitOpenError, ConfigError, EmbeddingError
from cachelayers.keys import claim_identity
from cachelayers.metrics import StateLog, register_stats_source
from cachelayers.settings import Settings, get_settings
from cachelayers.validation import check_options, positive_int
from cachelayers.validation import similarity as check_similarity

__all__ = ["SemanticFunction"]

P = ParamSpec("P")
T = TypeVar("T")

_NO_VECTOR: Final[Any] = object()

_functions: weakref.WeakSet[SemanticFunction[Any, Any]] = weakref.WeakSet()


class SemanticFunction(Generic[P, T]):
    """The engine of one function decorated with `semantic_cached` (see the module docstring).

    Args:
        fn: The async function.
        embed_batch_size: Most texts per embedder call (concurrent calls are batched).
        embed_max_wait: Longest a text waits for others to share its embedder call.
        **options: The options of `cachelayers.semantic_cached` (`SemanticOptions`), documented there.

    Raises:
        ConfigError: An option is out of range; ``text`` names no parameter; a ``text`` function without
            ``partition``; no ``threshold`` and no calibrated default.
        TypeError: ``fn`` is not an async function, or an option is unknown.
    """

    def __init__(self, fn: Callable[P, Awaitable[T]], *, embed_batch_size: int = 64,
                 embed_max_wait: float | str = 0.0, **options: Unpack[SemanticOptions]) -> None:
        check_options(options, SemanticOptions, "semantic_cached")
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(f"semantic_cached needs an async function, got {fn!r}")
        self._fn = fn
        self._types = allowed_types(fn)
        embedder = options.get("embed")
        self._embedder = embedder if embedder is not None else HashingEmbedder()
        if not callable(self._embedder):
            raise ConfigError("embed", embedder, "expected a callable list[str] -> (n, d) array")
        threshold = threshold_given = options.get("threshold")
        if threshold is None:
            threshold = getattr(self._embedder, "default_threshold", None)
            if threshold is None:
                raise ConfigError("threshold", None, f"{embedder_name(self._embedder)} has no calibrated default "
                                  "threshold: pass threshold= (measure one with `cachelayers calibrate`)")
        self.threshold = check_similarity(threshold)
        margin = options.get("margin")
        if margin is None:
            margin = getattr(self._embedder, "default_margin", None) if threshold_given is None else None
        self.margin = check_similarity(margin if margin is not None else 0.0, "margin")
        self._split = CallSplitter(fn, options)
        self._keys = self._split.keys
        self.identity = self._keys.identity
        ttl = options.get("ttl")
        self._ttl = parse_ttl(ttl, "ttl") if ttl is not None else None
        self.max_entries = positive_int(options.get("max_entries", DEFAULT_MAX_ENTRIES), "max_entries")
        self.max_total_entries = positive_int(options.get("max_total_entries", DEFAULT_MAX_TOTAL_ENTRIES),
                                              "max_total_entries")
        verifier = options.get("verifier")
        if verifier is None and threshold_given is None:  # a measured default comes with its threshold
            verifier = getattr(self._embedder, "default_verifier", None)
        if verifier is not None and not callable(verifier):
            raise ConfigError("verifier", verifier, "expected a function (text, Candidate) -> bool, async or not")
        agreement = options.get("agreement")
        if agreement is not None and not isinstance(agreement, AnswerAgreement):
            raise ConfigError("agreement", agreement, "expected an AnswerAgreement(max_error=...)")
        self._agreement = agreement
        self.max_candidates = positive_int(options.get("max_candidates", DEFAULT_MAX_CANDIDATES), "max_candidates")
        self._explicit_cache = options.get("cache")
        if self._explicit_cache is not None and not isinstance(self._explicit_cache, TieredCache):
            raise ConfigError("cache", self._explicit_cache, "expected a TieredCache (for the cached embeddings)")
        cache_embeddings = options.get("cache_embeddings", True)
        if not isinstance(cache_embeddings, bool):
            raise ConfigError("cache_embeddings", cache_embeddings, "expected True or False")
        self._cache_embeddings = cache_embeddings
        vector_index = options.get("vector_index")
        self._clock = options.get("clock")
        if self._clock is not None and not callable(self._clock):
            raise ConfigError("clock", self._clock, "expected a function returning the time in seconds")
        self.embedder_name = embedder_name(self._embedder)
        if vector_index is not None:
            check_lasting(vector_index, self._embedder)
        self._vector_index = vector_index
        self._embed_prefix = "emb:" + hashlib.blake2b(self.embedder_name.encode(), digest_size=8).hexdigest() + ":"
        self._ndim: int | None = getattr(self._embedder, "ndim", None)
        self._batcher: Batcher[str, [], np.ndarray] = Batcher(
            self._embed_batch, max_size=embed_batch_size, max_wait=embed_max_wait,
            name=f"embed:{self.identity}")
        self.stats = SemanticStats()
        self.log = StateLog()
        self._whats = LogNames(self.identity, self.embedder_name)
        self._judge = Judge(self.threshold, verifier, self.embed_text, self.stats, self.log, self._whats,
                            lambda exc: self._failed(self._whats.embedder, exc))
        self._store: SemanticStore | None = None
        self._store_url: str | None = None
        self._opening: Flight | None = None
        self._clears = 0  # cache_clear calls: a computation that began before one stores nothing
        self._guard: InvalidationGuard | None = None
        self._inflight: dict[tuple[bytes, str], Flight] = {}
        # Claims last: a decoration refused for a bad option must not hold the identity or the policy.
        if options.get("name") is None:
            claim_identity(self._keys.token, fn, scope="semantic")
        if agreement is not None:
            agreement.claim(self, self.identity)
        _functions.add(self)
        register_stats_source(self)

    # -- arguments ----------------------------------------------------------------------------------------

    @property
    def fn(self) -> Callable[P, Awaitable[T]]:
        """The decorated function."""
        return self._fn

    def _text_and_partition(self, arguments: dict[str, Any]) -> tuple[str, bytes]:
        return self._split.split(arguments)

    # -- stores -------------------------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The settings in force."""
        return get_settings()

    def _embed_cache(self) -> TieredCache | None:
        if not self._cache_embeddings:
            return None
        return self._explicit_cache if self._explicit_cache is not None else default_cache()

    async def store(self) -> SemanticStore:
        """The store of the settings in force (opened, and loaded from disk or Redis, on first use).

        Raises:
            ConfigError: ``Settings.vector_index`` is invalid.
            Exception: Opening failed (the caller treats it as an index failure).
        """
        settings = get_settings()
        url = self._vector_index or settings.vector_index
        store = self._store
        if store is not None and self._store_url == url and store.usable():
            return store
        check_lasting(url, self._embedder)
        while self._opening is not None:
            await self._opening.wait()
            if self._store is not None and self._store_url == url and self._store.usable():
                return self._store
        flight = self._opening = Flight()
        try:
            if store is not None:
                old, self._store = store, None
                await old.aclose()
            clock = self._clock or time.time
            codec = Codec(secret=settings.secret, allow_pickle=settings.allow_pickle,
                          encryption_keys=settings.encryption_keys)
            if self._types:  # the classes the return annotation names decode without registration
                codec = codec.with_types(self._types)
            new = open_store(url, namespace=f"{settings.key_prefix}{self._keys.namespace}",
                             max_entries=self.max_entries, clock=clock, stats=self.stats, log=self.log, codec=codec,
                             max_total_entries=self.max_total_entries)
            try:
                await new.open(self.embedder_name, self._ndim)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await new.aclose()
                    except Exception as exc:  # the open failure is the one to report
                        self.log.failure(f"closing the semantic store of {self.identity}", exc)
                raise
            self._store, self._store_url = new, url
            return new
        finally:
            self._opening = None
            flight.finish()

    # -- embeddings ---------------------------------------------------------------------------------------

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return await embed(self._embedder, texts, self._ndim)

    async def embed_text(self, text: str) -> np.ndarray:
        """The unit vector of ``text``: from the embedding cache, or from the embedder (batched).

        Raises:
            EmbeddingError: The embedder failed or returned a malformed vector.
        """
        cache = self._embed_cache()
        key = self._embed_prefix + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        if cache is not None:
            try:
                cached = await cache.get(key, _NO_VECTOR)
            except Exception as exc:  # strict mode, or a bug in a tier: embedding is still possible
                self.log.failure("embedding cache", exc)
                cached = _NO_VECTOR
            if (isinstance(cached, np.ndarray) and cached.dtype == np.float32 and cached.ndim == 1
                    and (self._ndim is None or cached.shape[0] == self._ndim)
                    and math.isfinite(float(np.dot(cached, cached)))):  # finite iff every element is
                return cached
        try:
            vector = await self._batcher.submit(text)
        except BatchError as exc:
            cause = exc.__cause__
            if isinstance(cause, EmbeddingError):
                raise cause from None
            raise EmbeddingError(str(exc)) from exc
        vector = np.array(vector, dtype=np.float32)  # a copy: the row must not pin the whole batch
        if self._ndim is None:
            self._ndim = int(vector.shape[0])
        elif vector.shape != (self._ndim,):
            raise EmbeddingError(f"{self.embedder_name} returned a vector of dimension {vector.shape[0]}; "
                                 f"expected {self._ndim}")
        if cache is not None:
            try:
                await cache.set(key, vector)
            except Exception as exc:
                self.log.failure("embedding cache", exc)
        return vector

    # -- calls --------------------------------------------------------------------------------------------

    @property
    def wrapper(self) -> Callable[..., Coroutine[Any, Any, T]]:
        """The call path as a plain ``async def`` function (the decorator returns a `SemanticCachedFunction`)."""
        call = self.call

        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await call(args, kwargs)

        functools.update_wrapper(wrapper, self._fn)
        return wrapper

    def _record(self, lookup: Lookup, flight_key: tuple[bytes, str] | None = None) -> None:
        """Report ``lookup`` (`record`) and, when access sampling is on, make its sampled audit record; with
        ``flight_key``, also tell the call's waiters how it was answered."""
        if flight_key is not None:
            flight = self._inflight.get(flight_key)
            if flight is not None:
                flight.outcome = lookup
        record(lookup)
        if audit.SAMPLING[0] and audit.sampled():
            audit.access(self._keys.namespace, lookup.level, "semantic_cached", partition=lookup.partition or None,
                         function=self.identity, tier=lookup.tier)

    def _joined(self, leader: Lookup | None, text: str, partition: bytes) -> None:
        """Count and report a call answered by the identical call that was running (``leader``, its lookup): as
        that call was answered, with tier ``"in-flight"``."""
        level = leader.level if leader is not None else "exact"
        if level == "semantic":
            assert leader is not None
            self.stats.semantic_hits += 1
            lookup = Lookup(self.identity, "semantic", leader.similarity, leader.matched_text, text, partition.hex(),
                            leader.rejected, tier="in-flight")
        elif level == "uncached":  # the running call was not cached (an embedder or store failure): nor is this
            assert leader is not None
            self.stats.uncached += 1
            lookup = Lookup(self.identity, "uncached", None, None, text, partition.hex(), 0, leader.reason,
                            tier="in-flight")
        else:  # computed (or checked) for this very text
            self.stats.exact_hits += 1
            lookup = Lookup(self.identity, "exact", 1.0, text, text, partition.hex(), tier="in-flight")
        self._record(lookup)

    def _store_failed(self, exc: BaseException) -> None:
        """A store operation failed (or was not tried: its circuit breaker is open): logged once per outage."""
        if isinstance(exc, CircuitOpenError):
            self.stats.store_skipped += 1
        self._failed(self._whats.store, exc)

    def _store_worked(self) -> None:
        """A store write or read worked: the end of an outage is logged once (a later one is logged again)."""
        self.log.recovered(self._whats.store)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.log.failure(what, exc)
        if get_settings().strict:
            raise exc

    async def _uncached(self, args: tuple[Any, ...], kwargs: dict[str, Any], text: str | None, partition: bytes,
                        reason: str) -> T:
        self.stats.uncached += 1
        self._record(Lookup(self.identity, "uncached", None, None, text, partition.hex(), 0, reason),
                     None if text is None else (partition, text))
        return await self._fn(*args, **kwargs)

    async def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        """Answer one call: exact, semantic, or computed and stored (see the module docstring)."""
        started = time.perf_counter()
        try:
            arguments = self._keys.arguments(args, kwargs)
        except TypeError:
            return await self._fn(*args, **kwargs)  # let the function report its own bad arguments
        try:
            text, partition = self._text_and_partition(arguments)
        except ArgumentFunctionError as exc:  # a failing partition= or text= function must not fail the call
            self.stats.uncached += 1
            self._failed(self._whats.split, exc.error)
            self._record(Lookup(self.identity, "uncached", None, None, None, "", 0, str(exc)))
            return await self._fn(*args, **kwargs)
        self.log.recovered(self._whats.split)
        if not text.strip():
            return await self._uncached(args, kwargs, text, partition, "empty text")
        try:
            store = await self.store()
            await store.sync()
        except ConfigError:
            raise
        except Exception as exc:
            self.stats.index_errors += 1
            self._store_failed(exc)
            return await self._uncached(args, kwargs, text, partition, f"store failed: {exc}")
        flight_key = (partition, text)
        flight = self._inflight.get(flight_key)
        while flight is not None and flight.epoch == self._clears:  # begun before a clear: not this call's
            await flight.wait()
            if flight.done:
                if flight.error is not None:  # the call failed: its waiters fail with it, as with multilevel_cached
                    raise flight.waiter_error()
                self._joined(flight.outcome, text, partition)
                return cast(T, flight.value)
            flight = self._inflight.get(flight_key)  # the computing caller was cancelled: one waiter takes over
        entry = store.find_exact(partition, text)
        if entry is not None:
            value = await self._read(store, entry)
            if value is not GONE:
                store.touch(entry)
                self.stats.exact_hits += 1
                self.stats.cached_latency.add(time.perf_counter() - started)
                self._record(Lookup(self.identity, "exact", 1.0, entry.text, text, partition.hex()))
                return cast(T, value)
        flight = self._inflight[flight_key] = Flight(self._clears)
        try:
            value = await self._lookup_or_compute(store, args, kwargs, text, partition, started)
        except Exception as exc:
            flight.error = exc
            flight.done = True
            raise
        else:
            flight.value = value
            flight.done = True
            return value
        finally:
            if self._inflight.get(flight_key) is flight:
                del self._inflight[flight_key]
            flight.finish()

    async def _read(self, store: SemanticStore, entry: Entry) -> Any:
        try:
            value = await store.read_value(entry)
        except Exception as exc:
            self.stats.index_errors += 1
            self._store_failed(exc)
            return GONE
        self._store_worked()
        if value is GONE:
            await self._forget(store, [entry])
        return value

    async def _forget(self, store: SemanticStore, entries: Sequence[Entry]) -> None:
        try:
            await store.remove(entries)
        except Exception as exc:
            self.stats.index_errors += 1
            self._store_failed(exc)

    async def _lookup_or_compute(self, store: SemanticStore, args: tuple[Any, ...], kwargs: dict[str, Any],
                                 text: str, partition: bytes, started: float) -> T:
        try:
            vector = await self.embed_text(text)
        except EmbeddingError as exc:
            self.stats.embed_errors += 1
            self._failed(self._whats.embedder, exc)
            return await self._uncached(args, kwargs, text, partition, f"embedding failed: {exc}")
        log = self.log
        log.recovered(self._whats.embedder)
        try:
            if store.ndim != vector.shape[0]:
                await store.fit_dimension(int(vector.shape[0]))
            candidates = store.find_similar(partition, vector, self.max_candidates)
        except Exception as exc:
            self.stats.index_errors += 1
            self._failed(self._whats.index, exc)
            return await self._uncached(args, kwargs, text, partition, f"index failed: {exc}")
        log.recovered(self._whats.index)
        best = candidates[0][1] if candidates else None
        rejected = 0
        if len(candidates) > 1 and candidates[0][1] - candidates[1][1] < self.margin and ambiguous(
                candidates[0][0].text, candidates[0][1], ((e.text, s) for e, s in candidates[1:]), self.margin):
            candidates = []  # ambiguous: two entries about as near as each other, neither is served
        for entry, similarity in candidates:
            if similarity < self.threshold - SIMILARITY_TOLERANCE:
                break
            value = await self._read(store, entry)
            if value is GONE:
                continue
            if not await self._judge.accepts(text, entry.text, value, similarity):
                rejected += 1
                continue
            agreement = self._agreement
            if agreement is not None and agreement.should_check():
                return await self._check(store, args, kwargs, text, partition, vector, entry, value, similarity,
                                         rejected)
            store.touch(entry)
            self.stats.semantic_hits += 1
            self.stats.cached_latency.add(time.perf_counter() - started)
            self._record(Lookup(self.identity, "semantic", similarity, entry.text, text, partition.hex(), rejected),
                         (partition, text))
            return cast(T, value)
        result = await self._compute_and_store(store, args, kwargs, text, partition, vector)
        self._record(Lookup(self.identity, "computed", best, None, text, partition.hex(), rejected),
                     (partition, text))
        return result

    async def _compute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        """Run the function for a call the cache does not answer: a miss, timed."""
        self.stats.misses += 1
        began = time.perf_counter()
        result = await self._fn(*args, **kwargs)
        self.stats.computed_latency.add(time.perf_counter() - began)
        return result

    async def _compute_and_store(self, store: SemanticStore, args: tuple[Any, ...], kwargs: dict[str, Any],
                                 text: str, partition: bytes, vector: np.ndarray) -> T:
        began = self._clears, store.clears
        result = await self._compute(args, kwargs)
        await self._store_result(store, text, partition, vector, result, began)
        return result

    async def _store_result(self, store: SemanticStore, text: str, partition: bytes, vector: np.ndarray,
                            result: Any, began: tuple[int, object]) -> None:
        """Store ``result`` unless the cache was cleared since its computation began (``began``: this engine's
        clears and the store's, taken then): a clear removes what was computed before it, in flight or not."""
        if self._clears != began[0]:
            return
        ttl = self._ttl if self._ttl is not None else get_settings().default_ttl
        expires_at = (self._clock or time.time)() + ttl if ttl is not None else None
        try:
            await store.insert(partition, text, vector, result, expires_at, began[1])
        except Exception as exc:  # whatever the store raised (a Redis or SQLite error too), the result is returned
            self.stats.index_errors += 1
            self._store_failed(exc)
        else:
            self._store_worked()

    async def _check(self, store: SemanticStore, args: tuple[Any, ...], kwargs: dict[str, Any], text: str,
                     partition: bytes, vector: np.ndarray, entry: Entry, cached: Any, similarity: float,
                     rejected: int) -> T:
        """Compute a would-be hit instead of serving it, and tell the agreement policy whether it was right.

        A result that disagrees is stored as an entry of its own; one that agrees is not (the entry that agreed
        still answers this text, and a twin of it would make the margin see two entries where there is one).
        """
        assert self._agreement is not None
        began = self._clears, store.clears
        result = await self._compute(args, kwargs)
        agreed = self._agreement.observe(result, cached)
        if self._agreement.error is not None:
            self.log.failure(self._whats.agree, self._agreement.error)
        else:
            self.log.recovered(self._whats.agree)
        self.stats.answer_checks += 1
        if agreed:
            store.touch(entry)
        else:
            self.stats.answer_disagreements += 1
            await self._store_result(store, text, partition, vector, result, began)
        self._record(Lookup(self.identity, "computed", similarity, None, text, partition.hex(), rejected,
                            "checked: the cached answer " + ("agreed" if agreed else "disagreed")))
        return result

    # -- pre-loading --------------------------------------------------------------------------------------

    async def prefill(self, entries: Iterable[tuple[str, Any]], /, **partition_arguments: Any) -> int:
        """Store known answers without calling the function (see `SemanticCachedFunction.prefill`)."""
        rows = self._split.prefill_rows(entries, partition_arguments)
        if not rows:
            return 0
        store = await self.store()
        await store.sync()
        began = self._clears, store.clears  # a clear during the prefill removes what it stored before, and after
        ttl = self._ttl if self._ttl is not None else get_settings().default_ttl
        stored = 0
        size = self._batcher.max_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            vectors = await embed(self._embedder, [text for text, _, _ in chunk], self._ndim)
            if self._ndim is None:
                self._ndim = int(vectors.shape[1])
            if store.ndim != self._ndim:
                await store.fit_dimension(self._ndim)
            expires_at = (self._clock or time.time)() + ttl if ttl is not None else None
            for (text, value, partition), vector in zip(chunk, vectors, strict=True):
                if self._clears != began[0]:  # checked after every await: the embedding, each insert
                    return stored
                if await store.insert(partition, text, np.array(vector, dtype=np.float32), value, expires_at,
                                      began[1]):
                    stored += 1
        return stored

    # -- management ---------------------------------------------------------------------------------------

    async def cache_clear(self) -> None:
        """Remove every entry, and what computations begun before would store (see `SemanticCachedFunction`)."""
        settings = get_settings()
        guard = self._guard
        if guard is None or guard.settings is not settings:
            guard = self._guard = InvalidationGuard(settings, [f"semantic:{self.identity}"])

        def local(kind: str, items: list[str]) -> None:
            self._clears += 1

        async def everywhere(kind: str, items: list[str]) -> None:
            store = await self.store()
            await store.clear()

        await guard.run("c", [], local, everywhere)

    async def save(self) -> None:
        """Persist the index now (disk mode: an atomic snapshot; otherwise a no-op)."""
        if self._store is not None:
            await self._store.save()

    async def aclose(self) -> None:
        """Save and close the store (the next call opens it again)."""
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()

    def cache_info(self) -> SemanticCacheInfo:
        """Hits per level, misses, entries, evictions, errors, verifier outcomes and latencies."""
        s = self.stats
        answered = s.exact_hits + s.semantic_hits + s.misses + s.uncached
        store = self._store
        return SemanticCacheInfo(
            exact_hits=s.exact_hits, semantic_hits=s.semantic_hits, misses=s.misses, uncached=s.uncached,
            hit_rate=(s.exact_hits + s.semantic_hits) / answered if answered else 0.0,
            entries=len(store) if store is not None else 0,
            partitions=len(store.partitions) if store is not None else 0,
            evictions=s.evictions, expirations=s.expirations, embed_errors=s.embed_errors,
            index_errors=s.index_errors, verifier_rejections=s.verifier_rejections,
            verifier_errors=s.verifier_errors, unstorable=s.unstorable, compactions=s.compactions,
            cached_p50=s.cached_latency.percentile(50), computed_p50=s.computed_latency.percentile(50),
            corrupt=s.corrupt, answer_checks=s.answer_checks, answer_disagreements=s.answer_disagreements,
            difference_rejections=s.difference_rejections, store_skipped=s.store_skipped)

    def stats_snapshot(self) -> dict[str, Any]:
        """Entry for `cachelayers.stats()`."""
        return {f"semantic:{self.identity}": self.cache_info()._asdict()}

    def __repr__(self) -> str:
        return f"<SemanticFunction of {self.identity}>"

