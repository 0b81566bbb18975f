"""Vector storage of the semantic cache: the usearch index, and the disk and Redis persistence of entries."""

from cachelayers.backends.vectors.base import (
    GONE,
    Appended,
    EntryRef,
    Loaded,
    PartitionGraph,
    Replica,
    StoredRow,
    VectorPersistence,
    VectorStorage,
    in_memory,
)
from cachelayers.backends.vectors.index import (
    DTYPES,
    Compaction,
    Neighbours,
    VectorIndex,
    atomic_write,
    require_usearch,
)
from cachelayers.backends.vectors.options import IndexOptions, int_option, parse_vector_index

__all__ = ["DTYPES", "GONE", "Appended", "Compaction", "EntryRef", "IndexOptions", "Loaded", "Neighbours",
           "PartitionGraph", "Replica", "StoredRow", "VectorIndex", "VectorPersistence", "VectorStorage",
           "atomic_write", "in_memory", "int_option", "parse_vector_index", "require_usearch"]
