"""FastAPI through a real ASGI app and a real HTTP client: request-scoped parameters are left out of keys by
type, `RateLimitExceeded` becomes 429 with ``Retry-After``, and an ``X-Cache`` header tells hits from misses."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import numpy as np
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request, Response, WebSocket
from fastapi.testclient import TestClient

from cachelayers import RateLimitExceeded, multilevel_cached, rate_limited, semantic_cached
from cachelayers.errors import ConfigError, UnkeyableArgumentError
from cachelayers.integrations.fastapi import (
    add_exception_handlers,
    cache_status,
    mark_computed,
    rate_limit_exceeded_handler,
    retry_after_header,
)
from cachelayers.keys import (
    KeyBuilder,
    canonical_bytes,
    closure_fingerprint,
    ignore_type,
    ignored_parameters,
    ignored_types,
)


@pytest.fixture
def anyio_backend() -> str:
    """FastAPI runs on asyncio here (its trio support is anyio's, tested elsewhere)."""
    return "asyncio"


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    """Make a real HTTP client talking to an app through httpx's ASGI transport."""
    clients: list[httpx.AsyncClient] = []

    def make(app: FastAPI) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


class Tracer:
    """A user's request-scoped object, registered with ``ignore_type(Tracer)`` by a test."""


class Span:
    """Another, registered by name as ``"tests.test_fastapi:Span"``."""


# -- request-scoped parameters are left out of keys by type ---------------------------------------------------

@pytest.mark.anyio
async def test_endpoint_with_request_response_and_background_tasks_is_cached(client_for: Any) -> None:
    """An endpoint taking ``Request``, ``Response`` and ``BackgroundTasks`` is cached on its other parameters."""
    app = FastAPI()
    runs: list[tuple[int, str]] = []

    @app.get("/items/{item_id}")
    @multilevel_cached(ttl="1m")
    async def item(item_id: int, request: Request, response: Response, tasks: BackgroundTasks,
                   q: str = "") -> dict[str, Any]:
        runs.append((item_id, q))
        return {"item": item_id, "q": q, "path": request.url.path}

    client = client_for(app)
    first = await client.get("/items/3", params={"q": "a"})
    again = await client.get("/items/3", params={"q": "a"})
    other = await client.get("/items/4", params={"q": "a"})
    other_q = await client.get("/items/3", params={"q": "b"})
    assert [r.status_code for r in (first, again, other, other_q)] == [200] * 4
    assert first.json() == again.json() == {"item": 3, "q": "a", "path": "/items/3"}
    assert other.json()["item"] == 4
    assert other_q.json()["q"] == "b"
    assert runs == [(3, "a"), (4, "a"), (3, "b")]  # the second /items/3?q=a was a hit
    assert item.cache_info().hits == 1


@pytest.mark.anyio
async def test_semantic_partition_leaves_the_request_out(client_for: Any) -> None:
    """A semantically cached endpoint taking a ``Request`` partitions on its other arguments only."""
    app = FastAPI()
    runs: list[str] = []

    def embed(texts: list[str]) -> np.ndarray[Any, Any]:
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, len(text.strip(" ?!").lower()) % 8] = 1.0
        return out

    @app.get("/ask")
    @semantic_cached(embed=embed, text="question", threshold=0.99)
    async def ask(question: str, request: Request, model: str = "small") -> dict[str, str]:
        runs.append(question)
        return {"answer": f"about {question}", "model": model}

    client = client_for(app)
    assert (await client.get("/ask", params={"question": "what is rag"})).status_code == 200
    again = await client.get("/ask", params={"question": "What is RAG?"})
    assert again.json() == {"answer": "about what is rag", "model": "small"}
    await client.get("/ask", params={"question": "what is rag", "model": "large"})
    assert runs == ["what is rag", "what is rag"]  # the other model is another partition


def test_websocket_endpoint_is_cached_on_its_other_parameters() -> None:
    """A cached helper taking the ``WebSocket`` keys on the message only (the socket differs per connection)."""
    app = FastAPI()
    runs: list[str] = []

    @multilevel_cached(ttl="1m")
    async def reply(websocket: WebSocket, message: str) -> str:
        runs.append(message)
        return message.upper()

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        await websocket.send_text(await reply(websocket, message))
        await websocket.close()

    with TestClient(app) as client:
        for _ in range(2):  # two connections: two WebSocket objects
            with client.websocket_connect("/ws") as ws:
                ws.send_text("hi")
                assert ws.receive_text() == "HI"
    assert runs == ["hi"]


def test_annotations_that_are_ignored() -> None:
    """``Annotated[T, ...]``, ``T | None`` and string annotations of an ignored type leave the parameter out."""

    def dependency() -> int:
        return 1

    async def endpoint(a: int, request: Annotated[Request, Depends(dependency)], tasks: BackgroundTasks | None,
                       client: httpx.AsyncClient | None = None, n: int | None = None) -> None:
        return None

    assert ignored_parameters(endpoint) == {"request", "tasks", "client"}
    assert KeyBuilder(endpoint).ignored == {"request", "tasks", "client"}
    assert KeyBuilder(endpoint, ignore=("a",)).ignored == {"a", "request", "tasks", "client"}


def test_unannotated_argument_of_an_ignored_type_keys_as_a_marker() -> None:
    """A value of an ignored type without an annotation keys as one fixed marker: any two clients agree."""

    async def fetch(client: Any, url: str) -> str:
        return url

    builder = KeyBuilder(fetch)
    assert builder.ignored == frozenset()
    with httpx.Client() as one, httpx.Client() as two:
        assert builder.local((one, "https://a"), {}) == builder.local((two,), {"url": "https://a"})
        assert builder.local((one, "https://a"), {}) != builder.local((one, "https://b"), {})
        assert canonical_bytes([one]) == canonical_bytes([two])
        # Inside containers too: a list of clients is as good as another of the same length.
        assert canonical_bytes({"c": [one, two]}) == canonical_bytes({"c": [two, two]})


def test_closures_over_a_client_are_not_interchangeable() -> None:
    """Two closures over two clients (two providers, say) are told apart, not given one identity: a client is
    left out of a call's key, not out of what a function closes over."""
    with httpx.Client(base_url="http://a") as one:
        def make(client: httpx.Client) -> Any:
            async def fetch(url: str) -> str:
                return str(client.base_url) + url
            return fetch

        assert closure_fingerprint(make(one)) is None  # like any other value that cannot be keyed


def test_unregistered_object_is_still_unkeyable() -> None:
    """Only registered types are left out: any other object still fails loudly, naming the argument."""

    async def fetch(session: Any, url: str) -> str:
        return url

    with pytest.raises(UnkeyableArgumentError, match="'session'"):
        KeyBuilder(fetch).local((object(), "u"), {})


def test_ignore_type_registers_user_types() -> None:
    """``ignore_type(cls)`` and ``ignore_type("module:Name")`` leave the user's own types out of keys."""

    async def work(tracer: Tracer, span: Any, x: int) -> int:
        return x

    before = KeyBuilder(work)
    with pytest.raises(UnkeyableArgumentError):
        before.local((Tracer(), None, 1), {})
    ignore_type(Tracer)
    ignore_type(f"{__name__}:Span")  # by name: resolved once the module is imported (it is)
    assert Tracer in ignored_types()
    assert Span in ignored_types()
    builder = KeyBuilder(work)
    assert builder.ignored == {"tracer"}
    assert builder.local((Tracer(), Span(), 1), {}) == builder.local((Tracer(), Span(), 1), {})
    assert builder.local((Tracer(), Span(), 1), {}) != builder.local((Tracer(), Span(), 2), {})


@pytest.mark.parametrize("bad", [str, int, object, dict, "no-colon", "mod:not an identifier", 3])
def test_ignore_type_refuses_keyed_types_and_bad_names(bad: Any) -> None:
    """Ignoring ``str`` or ``object`` would collapse keys: refused with a `ConfigError` naming the field."""
    with pytest.raises(ConfigError, match="ignore_type"):
        ignore_type(bad)


def test_importing_cachelayers_does_not_import_web_frameworks() -> None:
    """The built-in entries are found by module name: ``import cachelayers`` and keying import none of them;
    without starlette, the integration module says which extra to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["starlette"] = None  # as if not installed
        import cachelayers
        from cachelayers.keys import KeyBuilder, ignored_types

        async def f(x: int, request: object = None) -> int:
            return x

        KeyBuilder(f).local((1,), {})
        assert ignored_types() == (), ignored_types()
        assert not {"fastapi", "httpx", "openai", "redis", "aiohttp"} & set(sys.modules), sorted(sys.modules)
        try:
            import cachelayers.integrations.fastapi
        except cachelayers.MissingDependencyError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "pip install 'cachelayers[fastapi]'" in result.stdout


# -- RateLimitExceeded as 429 with Retry-After -----------------------------------------------------------------

@pytest.mark.anyio
async def test_rate_limit_exceeded_becomes_429_with_retry_after(client_for: Any) -> None:
    """Past its limit an endpoint answers 429 with a whole-second ``Retry-After``, not 500."""
    app = FastAPI()
    add_exception_handlers(app)

    @rate_limited("2/minute", timeout=0, key=lambda user, **_: user, storage="memory://")
    async def llm(user: str, prompt: str) -> str:
        return f"answer to {prompt}"

    @app.get("/chat")
    async def chat(user: str, prompt: str, request: Request) -> dict[str, str]:
        return {"answer": await llm(user, prompt)}

    client = client_for(app)
    ok = [await client.get("/chat", params={"user": "ann", "prompt": str(i)}) for i in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    refused = await client.get("/chat", params={"user": "ann", "prompt": "3"})
    assert refused.status_code == 429
    # The window is closed: the first unit frees just past 60 s after it was taken (the limiter's 1 ms
    # margin), so a call refused within a millisecond is told 60.001 s, which the header rounds up to 61.
    wait = refused.json()["retry_after"]
    assert 59 < wait <= 60.001
    assert refused.headers["Retry-After"] == str(math.ceil(wait))
    assert refused.json()["detail"] == "rate limit exceeded"
    other_user = await client.get("/chat", params={"user": "bob", "prompt": "3"})
    assert other_user.status_code == 200


@pytest.mark.anyio
async def test_without_the_handler_rate_limit_is_a_server_error(client_for: Any) -> None:
    """The behaviour the handler changes: unhandled, the exception is a 500."""

    def make_app() -> FastAPI:
        app = FastAPI()

        @app.get("/x")
        async def endpoint() -> None:
            raise RateLimitExceeded("full", retry_after=2.5)

        return app

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(), raise_app_exceptions=False),
                               base_url="http://testserver")
    async with client:
        assert (await client.get("/x")).status_code == 500
    app = make_app()
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    answered = await client_for(app).get("/x")
    assert answered.status_code == 429
    assert answered.headers["Retry-After"] == "3"


@pytest.mark.anyio
async def test_cost_that_never_fits_is_429_without_retry_after(client_for: Any) -> None:
    """A wait that is unknown (a cost larger than the limit) gives 429 with no ``Retry-After``."""
    app = FastAPI()
    add_exception_handlers(app)

    @rate_limited("10/minute", cost=lambda n: n, timeout=0, storage="memory://")
    async def spend(n: int) -> int:
        return n

    @app.get("/spend/{n}")
    async def endpoint(n: int) -> dict[str, int]:
        return {"spent": await spend(n)}

    answered = await client_for(app).get("/spend/11")
    assert answered.status_code == 429
    assert "Retry-After" not in answered.headers
    assert answered.json()["retry_after"] is None


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (59.9, "60"),
                                                 (None, None), (float("inf"), None)])
def test_retry_after_header_is_whole_seconds_rounded_up(seconds: float | None, header: str | None) -> None:
    """``Retry-After`` is delta-seconds (an integer): rounded up so a client never retries too early."""
    assert retry_after_header(seconds) == header


def test_add_exception_handlers_refuses_what_is_not_an_app() -> None:
    """A wrong object is a clear `TypeError`, not an ``AttributeError`` later."""
    with pytest.raises(TypeError, match="FastAPI or Starlette"):
        add_exception_handlers(object())


# -- X-Cache ----------------------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_x_cache_header_says_hit_or_miss(client_for: Any) -> None:
    """The ``X-Cache`` example: MISS when the cached function ran, HIT when a cache answered."""
    app = FastAPI()

    @multilevel_cached(ttl="1m")
    async def product(product_id: int) -> dict[str, int]:
        mark_computed()
        return {"id": product_id}

    @app.get("/products/{product_id}")
    async def endpoint(product_id: int, response: Response) -> dict[str, int]:
        with cache_status() as status:
            result = await product(product_id)
        response.headers["X-Cache"] = status.header
        return result

    client = client_for(app)
    headers = [(await client.get(f"/products/{n}")).headers["X-Cache"] for n in (1, 1, 2, 1)]
    assert headers == ["MISS", "HIT", "MISS", "HIT"]


@pytest.mark.anyio
async def test_x_cache_header_reports_semantic_hits(client_for: Any) -> None:
    """A semantically cached call reports itself: MISS, then HIT-SEMANTIC for a paraphrase, HIT for a repeat."""
    app = FastAPI()

    def embed(texts: list[str]) -> np.ndarray[Any, Any]:
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, len(text.strip(" ?!").lower()) % 8] = 1.0
        return out

    @semantic_cached(embed=embed, threshold=0.99)
    async def ask(question: str) -> str:
        return f"about {question}"

    @app.get("/ask")
    async def endpoint(question: str, response: Response) -> dict[str, str]:
        with cache_status() as status:
            answer = await ask(question)
        response.headers["X-Cache"] = status.header
        return {"answer": answer}

    client = client_for(app)
    headers = [(await client.get("/ask", params={"question": q})).headers["X-Cache"]
               for q in ("what is rag", "What is RAG?", "what is rag")]
    assert headers == ["MISS", "HIT-SEMANTIC", "HIT"]
