"""One factory per backend kind, so that a test runs over every tier by adding one parameter.

``pytest.mark.parametrize("kind", backend_params())`` gives the kinds with their marks (``memory``, ``redis``,
``disk``, ``memcached``); `make_backend` builds a fresh backend of a kind for the running test. Redis and
memcached are asyncio-only (redis-py's and aiocache's asyncio clients): under trio their parameters are
skipped with that reason, never failed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import pytest
from _pytest.mark.structures import ParameterSet

from cachelayers import Backend, MemoryBackend
from cachelayers.backends import create_backend
from tests.conftest import FakeClock

__all__ = ["ASYNCIO_ONLY", "KINDS", "MEMCACHED_ON_TRIO", "REDIS_ON_TRIO", "backend_params", "eventually",
           "make_backend", "skip_unless_supported"]

KINDS: Final = ("memory", "redis", "disk", "memcached")
REDIS_ON_TRIO: Final = "the Redis tier runs on asyncio only (redis-py's asyncio client has no trio support)"
MEMCACHED_ON_TRIO: Final = "the memcached tier runs on asyncio only (aiocache's memcached client has no trio support)"
ASYNCIO_ONLY: Final = {"redis": REDIS_ON_TRIO, "memcached": MEMCACHED_ON_TRIO}
_disk_dirs = itertools.count()


def backend_params(kinds: Sequence[str] = KINDS) -> list[ParameterSet]:
    """``pytest.param`` per kind, marked with the kind."""
    return [pytest.param(kind, marks=getattr(pytest.mark, kind), id=kind) for kind in kinds]


def skip_unless_supported(kind: str, request: pytest.FixtureRequest) -> None:
    """Skip a Redis or memcached parameter under trio (the only combinations that cannot run)."""
    if kind in ASYNCIO_ONLY and "anyio_backend" in request.fixturenames and \
            request.getfixturevalue("anyio_backend") == "trio":
        pytest.skip(ASYNCIO_ONLY[kind])


def make_backend(kind: str, request: pytest.FixtureRequest, clock: FakeClock | None = None,
                 *, query: str = "") -> Backend:
    """A fresh backend of ``kind`` for the running test (the caller closes it).

    Args:
        kind: ``"memory"``, ``"redis"``, ``"disk"`` or ``"memcached"``.
        request: The test's request, for the ``redis_url``, ``memcached_url`` and ``tmp_path`` fixtures.
        clock: Fake clock for expiry; real time when omitted.
        query: URL options, e.g. ``"max_bytes=4096"``.
    """
    skip_unless_supported(kind, request)
    options = f"?{query}" if query else ""
    if kind == "memory":
        url = f"memory://{options}"
    elif kind == "redis":
        url = str(request.getfixturevalue("redis_url")) + options
    elif kind == "disk":
        directory = request.getfixturevalue("tmp_path") / f"disk{next(_disk_dirs)}"
        url = f"disk://{directory}{options}"
    elif kind == "memcached":
        url = str(request.getfixturevalue("memcached_url")) + options
    else:
        raise ValueError(f"unknown backend kind {kind!r}")
    backend = create_backend(url, clock=clock)
    assert not isinstance(backend, MemoryBackend) or kind == "memory"
    return backend


async def eventually(condition: Callable[[], object], seconds: float, interval: float = 0.002) -> float:
    """Wait until ``condition()`` is true; return how long it took. Fails (``TimeoutError``) after ``seconds``.

    For state that changes in another task or process (a background refresh, a pub/sub message): there is no
    event of ours to wait on, so the test looks every ``interval``.
    """
    started = anyio.current_time()
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - watching state we do not own
            await anyio.sleep(interval)
    return anyio.current_time() - started
