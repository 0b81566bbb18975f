"""Shared fixtures: anyio backends, a real redis-server per session, a fake clock, clean settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import cachelayers
from tests.redis_server import RedisServer, redis_available

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on asyncio and on trio (override in a module to narrow)."""
    return str(request.param)


class FakeClock:
    """A wall clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at a fixed time."""
    return FakeClock()


@pytest.fixture(autouse=True)
def _clean_settings() -> Iterator[None]:
    """Every test starts on the embedded default and leaves no settings behind."""
    cachelayers.reset_settings()
    yield
    cachelayers.reset_settings()


def _require_redis() -> None:
    if not redis_available():
        if IN_CI:
            pytest.fail("redis-server is not installed; CI must run the Redis tests (scripts/test installs it)")
        pytest.skip("redis-server is not installed (scripts/test installs it)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free loopback port."""
    _require_redis()
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, flushed before each test (restarted if a test killed it)."""
    import redis

    redis_server.start()
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill, pause or restart it."""
    _require_redis()
    server = RedisServer().start()
    yield server
    server.close()
