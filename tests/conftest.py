"""Shared fixtures: anyio backends, a real redis-server per session, a fake clock, clean settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import cachelayers
from tests.memcached_server import MemcachedServer, memcached_available
from tests.redis_server import RedisServer, free_port, redis_available

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the trio runs of Redis and memcached tests: they cannot exist (redis-py's asyncio client and
    aiocache's memcached client have no trio support;
    the tests that choose trio on purpose, to check the clear error the Redis tier gives, are kept). Not
    collecting them, rather than collecting and skipping them, keeps every reported skip meaningful: with
    ``CI=true`` no Redis test is skipped.

    A Redis test is one marked ``redis`` (directly or through a Redis parameter) or with a Redis parameter in
    its id (the stateful configurations).
    """
    kept: list[pytest.Item] = []
    impossible: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        chosen = any("anyio_backend" in m.args[0] for m in item.iter_markers("parametrize"))
        trio = callspec is not None and callspec.params.get("anyio_backend") == "trio" and not chosen
        redis = any(item.get_closest_marker(name) is not None for name in ("redis", "memcached")) or (
            callspec is not None and any("redis" in part or "memcached" in part for part in callspec.id.split("-")))
        (impossible if trio and redis else kept).append(item)
    if impossible:
        config.hook.pytest_deselected(items=impossible)
        items[:] = kept


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


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, str]]:
    """A redis-server that also listens with TLS, its certificate issued by a CA made for the test.

    Yields the server (its plain port lets the test look behind the backend's back), the TLS port and the
    path of the CA certificate.
    """
    import trustme

    _require_redis()
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    server = RedisServer(extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert_file),
                                     "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file),
                                     "--tls-auth-clients", "no"]).start()
    yield server, tls_port, str(ca_file)
    server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill, pause or restart it."""
    _require_redis()
    server = RedisServer().start()
    yield server
    server.close()


def _require_memcached() -> None:
    if not memcached_available():
        if IN_CI:
            pytest.fail("memcached is not installed; CI must run the memcached tests (scripts/test installs it)")
        pytest.skip("memcached is not installed (scripts/test installs it)")


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedServer]:
    """One real memcached for the session, on a free loopback port."""
    _require_memcached()
    server = MemcachedServer().start()
    yield server
    server.close()


@pytest.fixture
def memcached_url(memcached_server: MemcachedServer) -> str:
    """URL of the session's memcached, flushed before each test (restarted if a test killed it)."""
    memcached_server.start()
    memcached_server.flush()
    return memcached_server.url


@pytest.fixture
def own_memcached() -> Iterator[MemcachedServer]:
    """A memcached of the test's own, for tests that kill or restart it."""
    _require_memcached()
    server = MemcachedServer().start()
    yield server
    server.close()
