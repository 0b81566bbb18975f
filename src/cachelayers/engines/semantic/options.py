"""The options of `semantic_cached`, declared once for the decorator and the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Final, TypedDict
from uuid import UUID

from cachelayers.backends.vectors import parse_vector_index
from cachelayers.embedders import has_stable_name
from cachelayers.engines.semantic.agreement import AnswerAgreement
from cachelayers.engines.semantic.lookups import Verifier
from cachelayers.engines.tiered import TieredCache
from cachelayers.errors import ConfigError

__all__ = ["DEFAULT_MAX_CANDIDATES", "DEFAULT_MAX_ENTRIES", "DEFAULT_MAX_TOTAL_ENTRIES", "SIMILARITY_TOLERANCE",
           "SemanticOptions", "check_lasting"]

DEFAULT_MAX_ENTRIES: Final = 10_000
"""Entries per partition before the least recently used is evicted."""

DEFAULT_MAX_TOTAL_ENTRIES: Final = 100_000
"""Entries of one function across all its partitions before the least recently used (of any partition) is evicted."""

DEFAULT_MAX_CANDIDATES: Final = 4
"""Candidates above the threshold offered to the verifier."""

SIMILARITY_TOLERANCE: Final = 1e-6
"""How far below the threshold a similarity may fall and still reach it: the rounding of float32 unit vectors
(two identical texts score 0.9999999 as often as 1.0), so that ``threshold=1.0`` serves identical vectors."""


class SemanticOptions(TypedDict, total=False):
    """The keyword options of `cachelayers.semantic_cached` (and of `SemanticFunction`), all optional.

    They are documented once, in `cachelayers.semantic_cached`'s docstring.
    """

    embed: Callable[[list[str]], Any] | None
    threshold: float | None
    margin: float | None
    text: str | Callable[..., str] | None
    partition: Callable[..., Any] | None
    ignore: Iterable[str]
    ttl: float | str | timedelta | None
    max_entries: int
    max_total_entries: int
    verifier: Verifier | None
    agreement: AnswerAgreement | None
    max_candidates: int
    namespace: str | None
    version: str | float | UUID
    name: str | None
    cache: TieredCache | None
    cache_embeddings: bool
    vector_index: str | None
    clock: Callable[[], float] | None


def check_lasting(url: str, embedder: Any) -> None:
    """Check the ``vector_index`` URL; one that outlives the process (disk) or is shared (Redis) needs an
    embedder named the same in every process, or its entries are never found again (`has_stable_name`).

    Raises:
        ConfigError: The URL is invalid (``vector_index``), or the embedder has no lasting name (``embed``).
    """
    scheme = parse_vector_index(url, "vector_index")[0].scheme
    if scheme != "memory" and not has_stable_name(embedder):
        raise ConfigError("embed", embedder, f"a {scheme}:// vector index keeps entries for other processes and "
                          "restarts, which know an embedder by its name: a lambda, a nested function, a "
                          "functools.partial or an object without a `name` attribute has none. Give it (or, for a "
                          "method, its object) a `name` attribute, or use a module-level function")
