"""The micro-batching engine: single-item calls gathered into few calls of a batch function.

The modules: `options` (`BatchOptions`, declared once for `batched` and `Batcher`), `adapters` (asyncio and
trio), `records` (batches, entries, the per-loop state, `BatchInfo`) and `batcher` (`Batcher`).
"""

from cachelayers.engines.batcher.batcher import Batcher
from cachelayers.engines.batcher.options import BatchOptions, QueueFullPolicy
from cachelayers.engines.batcher.records import BatchInfo, Rows

__all__ = ["BatchInfo", "BatchOptions", "Batcher", "QueueFullPolicy", "Rows"]
