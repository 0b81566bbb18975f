"""A local OpenAI-compatible HTTP server for tests: ``/v1/chat/completions`` and ``/v1/embeddings`` with
deterministic content and usage, served by uvicorn on a loopback port in a thread of its own.

It answers ``429`` with ``Retry-After`` (or ``retry-after-ms``) on demand (`OpenAIServer.fail_next`), so that
the real ``openai`` SDK raises its real ``RateLimitError`` from a real HTTP response.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.redis_server import free_port

EMBED_DIM = 64


def tokens(text: str) -> int:
    """The server's token count: one per word (deterministic, easy to check)."""
    return max(1, len(text.split()))


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased, without punctuation: what the embedding of a text depends on."""
    return re.findall(r"[a-z0-9]+", text.lower())


def embedding(text: str) -> list[float]:
    """A unit vector that is the sum of one pseudo-random vector per word: the same words, the same vector
    (a re-cased or re-punctuated paraphrase is identical); one word changed in eight, still similar."""
    total = np.zeros(EMBED_DIM)
    for word in words(text) or [""]:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        total += np.random.default_rng(seed).standard_normal(EMBED_DIM)
    return [float(x) for x in total / np.linalg.norm(total)]


@dataclass
class _Failure:
    status: int
    headers: dict[str, str]


@dataclass
class OpenAIServer:
    """The server's state: what it received, and the failures it is told to answer next."""

    port: int = 0
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _failures: dict[str, list[_Failure]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        """The ``base_url`` to give an OpenAI client."""
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, count: int = 1, *, path: str = "/v1/chat/completions", retry_after: str | None = None,
                  retry_after_ms: int | None = None) -> None:
        """Answer the next ``count`` requests to ``path`` with 429 and the given Retry-After headers."""
        headers = {}
        if retry_after is not None:
            headers["retry-after"] = retry_after
        if retry_after_ms is not None:
            headers["retry-after-ms"] = str(retry_after_ms)
        with self._lock:
            self._failures.setdefault(path, []).extend(_Failure(429, headers) for _ in range(count))

    def received(self, path: str) -> list[dict[str, Any]]:
        """The JSON bodies of the requests received at ``path`` (failed ones included), in order."""
        with self._lock:
            return [body for p, body in self.requests if p == path]

    def _take(self, path: str, body: dict[str, Any]) -> _Failure | None:
        with self._lock:
            self.requests.append((path, body))
            pending = self._failures.get(path)
            return pending.pop(0) if pending else None

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        failure = self._take("/v1/chat/completions", body)
        if failure is not None:
            return _rate_limited(failure)
        prompt = " ".join(str(m.get("content", "")) for m in body["messages"])
        question = str(body["messages"][-1]["content"])
        content = f"Answer to: {' '.join(words(question))}"
        prompt_tokens, completion_tokens = tokens(prompt), tokens(content)
        number = len(self.received("/v1/chat/completions"))
        return JSONResponse({
            "id": f"chatcmpl-{number}", "object": "chat.completion", "created": 1_700_000_000 + number,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def embeddings(self, request: Request) -> JSONResponse:
        body = await request.json()
        failure = self._take("/v1/embeddings", body)
        if failure is not None:
            return _rate_limited(failure)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        used = sum(tokens(text) for text in inputs)
        return JSONResponse({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": embedding(text)}
                     for i, text in enumerate(inputs)],
            "usage": {"prompt_tokens": used, "total_tokens": used},
        })


def _rate_limited(failure: _Failure) -> JSONResponse:
    return JSONResponse({"error": {"message": "Rate limit reached for requests", "type": "requests",
                                   "param": None, "code": "rate_limit_exceeded"}},
                        status_code=failure.status, headers=failure.headers)


@contextmanager
def running_openai_server() -> Iterator[OpenAIServer]:
    """Start the server on a free loopback port; stop it on exit."""
    state = OpenAIServer(port=free_port())
    app = Starlette(routes=[Route("/v1/chat/completions", state.chat, methods=["POST"]),
                            Route("/v1/embeddings", state.embeddings, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=state.port, log_level="warning", lifespan="off",
                            ws="none", http="h11", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="openai-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the local OpenAI-compatible server did not start")
        time.sleep(0.01)
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=30)
