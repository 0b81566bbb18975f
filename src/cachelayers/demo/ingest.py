"""The demo's ingestion stage: the document set is embedded before the questions come, as a loader does it.

A loader embeds a document set by gathering its chunks with bounded concurrency (``ingest_concurrency``
chunks in flight): one-chunk calls of a cached function whose misses go to the embedding provider through
`batched`, so that concurrent misses share full requests. A chunk seen before (a second run on the same cache
directory) is answered by the cache and never embedded again.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Final

import anyio
import numpy as np

from cachelayers.decorators import batched, multilevel_cached
from cachelayers.demo.pipeline import EMBED_MODEL, embedding_cost, embedding_latency, text_tokens, unit_vector
from cachelayers.demo.providers import SimulatedProvider
from cachelayers.demo.workload import DemoConfig

__all__ = ["INGEST_BATCH", "IngestReport", "IngestStage", "chunk_texts"]

INGEST_BATCH: Final = 32  # chunks per embedding request at most
_INGEST_WAIT: Final = 0.02  # seconds the first chunk of a batch waits for company
_WORDS: Final = ("index", "vector", "cache", "token", "latency", "batch", "retry", "tenant", "shard", "replica",
                 "prompt", "budget", "window", "embedding", "query", "answer")


def chunk_texts(config: DemoConfig) -> list[str]:
    """The chunks of the document set: ``config.ingest_chunks`` distinct texts, the same for every run."""
    chunks = []
    for i in range(config.ingest_chunks):
        collection = "support" if i % 3 == 0 else "docs"
        words = " ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(40))
        chunks.append(f"{collection}/{i // 4:04d}.md#{i % 4}: {words}")
    return chunks


@dataclasses.dataclass(frozen=True)
class IngestReport:
    """What the ingestion stage did.

    Attributes:
        chunks: Chunks ingested.
        concurrency: Chunks in flight at once.
        computed: Chunks embedded by the provider; the others were cached (from an earlier run).
        batches: Embedding requests.
        items: Chunks the requests carried.
        max_batch_size: Most chunks per request.
        fill_ratio: ``items / (batches * max_batch_size)``: how full the requests were (``None``: no request).
        cost_spent: Dollars the provider charged.
        wall_seconds: Duration of the ingestion.
        wrong: Chunks whose embedding differs from what the provider computes for them (corrupt values).
    """

    chunks: int
    concurrency: int
    computed: int
    batches: int
    items: int
    max_batch_size: int
    fill_ratio: float | None
    cost_spent: float
    wall_seconds: float
    wrong: int

    @property
    def cached(self) -> int:
        """Chunks the cache answered: entries stored by an earlier run."""
        return self.chunks - self.computed


class IngestStage:
    """Embeds the document set through `multilevel_cached` over `batched`, with the concurrency of a loader.

    Args:
        latency_scale: Factor on the provider's latencies.
    """

    name = "ingest"

    def __init__(self, latency_scale: float) -> None:
        self.provider = SimulatedProvider("embedding API (ingestion)", latency_scale=latency_scale)
        self.computed = 0
        provider = self.provider

        async def embed_chunks(texts: list[str], model: str) -> list[dict[str, Any]]:
            costs = [embedding_cost(text, model) for text in texts]
            await provider.call(latency=embedding_latency(texts), cost=sum(costs), items=len(texts), mark=False)
            return [{"vector": unit_vector(text), "tokens": text_tokens(text), "cost": cost}
                    for text, cost in zip(texts, costs, strict=True)]

        self.batcher = batched(max_size=INGEST_BATCH, max_wait=_INGEST_WAIT,
                               name="cachelayers.demo.ingest_batch")(embed_chunks)
        batcher = self.batcher

        async def embed_chunk(text: str, model: str) -> dict[str, Any]:
            self.computed += 1
            return await batcher(text, model)

        self.function = multilevel_cached(ttl="1d", name="cachelayers.demo.ingest", version=1,
                                          cost=lambda result: float(result["cost"]))(embed_chunk)

    async def run(self, chunks: list[str], concurrency: int) -> IngestReport:
        """Embed ``chunks`` with ``concurrency`` of them in flight, and check every vector that comes back."""
        feed = iter(chunks)
        wrong = 0

        async def worker() -> None:
            nonlocal wrong
            for text in feed:
                result = await self.function(text, EMBED_MODEL)
                wrong += not np.array_equal(result["vector"], unit_vector(text))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, len(chunks))):
                tg.start_soon(worker)
        info = self.batcher.batch_info()
        return IngestReport(chunks=len(chunks), concurrency=concurrency, computed=self.computed,
                            batches=info.batches, items=info.items, max_batch_size=INGEST_BATCH,
                            fill_ratio=info.fill_ratio if info.batches else None, cost_spent=self.provider.cost,
                            wall_seconds=time.perf_counter() - started, wrong=wrong)

    async def clear(self) -> None:
        """Remove the ingested chunks from every tier."""
        await self.function.cache_clear()
