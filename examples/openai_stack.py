"""An answer service on any OpenAI-compatible API, with every layer of cachelayers in front of it.

    exact cache  ->  semantic cache  ->  rate limit  ->  AsyncOpenAI(base_url=...)

and batched embeddings: concurrent one-text calls share one /v1/embeddings request. Run it against a
provider (OpenAI, Azure, vLLM, Ollama, a LiteLLM proxy):

    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=... CHAT_MODEL=... EMBED_MODEL=... \
        python examples/openai_stack.py

tests/test_openai_server.py runs this very file against a local OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

import cachelayers
from cachelayers import batched, multilevel_cached, rate_limited, semantic_cached

CHAT_MODEL = os.environ.get("CHAT_MODEL", "gpt-4o-mini")
EMBED_MODEL = os.environ.get("EMBED_MODEL", "text-embedding-3-small")

# max_retries=0: by default the SDK retries a 429 itself (twice, sleeping for its Retry-After), so
# @rate_limited would never see it: no pause shared with the other callers and processes, no adaptive
# slow-down. The retries are @rate_limited's (retries=2 below).
client = AsyncOpenAI(base_url=os.environ.get("OPENAI_BASE_URL"), max_retries=0)  # key: OPENAI_API_KEY

# The provider's limits, shared by every function (and, with a Redis tier, every process) naming them.
cachelayers.configure(limits={"llm-rpm": "500/minute", "llm-tpm": "200000/minute", "embed-rpm": "3000/minute"})


# -- embeddings: one request per batch of concurrent calls ---------------------------------------------------

@batched(max_size=64, max_wait="10ms")
@rate_limited("embed-rpm", retries=2)  # one call per batch request
async def embed_batch(texts: list[str]) -> list[list[float]]:
    response = await client.embeddings.create(model=EMBED_MODEL, input=texts)
    return [item.embedding for item in sorted(response.data, key=lambda item: item.index)]


@multilevel_cached(ttl="1d")
async def embedding(text: str) -> list[float]:
    """One text's embedding: cached, and batched with the other callers' misses (ingestion)."""
    return await embed_batch(text)


async def embed_texts(texts: list[str]) -> np.ndarray:
    """The semantic layer's embedder: concurrent questions share a request too."""
    return np.asarray(await embed_batch.many(texts), dtype=np.float32)


# -- completions: exact, then semantic, then the rate limit ----------------------------------------------------

def estimated_tokens(question: str, max_tokens: int = 256) -> int:
    """Charged before the call: the prompt (about four characters a token) and the completion budget."""
    return len(question) // 4 + 16 + max_tokens


def used_tokens(response: ChatCompletion) -> int:
    """What the call used, from the response's usage: the difference is charged, or given back, afterwards."""
    return response.usage.total_tokens if response.usage is not None else 0


@multilevel_cached(ttl="1h")  # an exact repeat: answered from memory, no embedding, no request
@semantic_cached(embed=embed_texts, text="question", threshold=0.9, ttl="1h")  # a paraphrase: no completion
@rate_limited("llm-rpm", "llm-tpm", cost=estimated_tokens, actual=used_tokens,  # 1 request, n tokens
              key=lambda model, **_: model, retries=2, adaptive=True, timeout=60)
async def answer(question: str, model: str = CHAT_MODEL, max_tokens: int = 256) -> ChatCompletion:
    return await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": question}],
    )


async def main() -> None:
    for question in ("What is a vector index?", "what is a vector index", "What is a vector index?"):
        response = await answer(question)
        print(f"{question!r}: {response.choices[0].message.content}")
    print(answer.cache_info())
    vectors = await asyncio.gather(*(embedding(f"document {i}") for i in range(100)))  # about two requests
    print(len(vectors), embed_batch.batch_info())


if __name__ == "__main__":
    asyncio.run(main())
