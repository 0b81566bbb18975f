"""The semantic cache engine: answer a call from a *similar* earlier call of the same partition.

`function` answers calls, `store` keeps the entries in memory (persisted by `cachelayers.backends.vectors`),
`lookups` reports how each call was answered, `arguments` splits a call into text and partition.
"""

from cachelayers.engines.semantic.agreement import AnswerAgreement
from cachelayers.engines.semantic.function import SemanticFunction
from cachelayers.engines.semantic.info import SemanticCacheInfo, SemanticStats
from cachelayers.engines.semantic.lookups import (
    Candidate,
    Explanation,
    Level,
    Lookup,
    Verifier,
    explain,
    last_lookup,
)
from cachelayers.engines.semantic.options import DEFAULT_MAX_ENTRIES, SemanticOptions
from cachelayers.engines.semantic.store import Entry, SemanticStore, open_store

__all__ = ["DEFAULT_MAX_ENTRIES", "AnswerAgreement", "Candidate", "Entry", "Explanation", "Level", "Lookup",
           "SemanticCacheInfo", "SemanticFunction", "SemanticOptions", "SemanticStats", "SemanticStore", "Verifier",
           "explain", "last_lookup", "open_store"]
