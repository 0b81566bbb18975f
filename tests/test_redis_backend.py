"""What only the Redis tier does: URL validation, one round trip per batch, auto-pipelining, tag sets without
KEYS/SCAN, one pool per event loop, asyncio-only, unix sockets. Round trips are counted by the server itself
(``INFO commandstats``)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import anyio
import pytest
import redis

from cachelayers import BackendError, ConfigError, Settings, StoreItem, TieredCache, multilevel_cached
from cachelayers.backends import create_backend
from cachelayers.backends.redis import RedisBackend
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking at the server behind the backend's back."""
    c = redis.Redis.from_url(redis_url)
    c.config_resetstat()
    yield c
    c.close()


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


class TestURLs:
    @pytest.mark.parametrize("url", [
        "redis://localhost", "redis://localhost:6380/3", "redis://:pw@cache.internal:6379/0?timeout=250ms",
        "redis://user:pw@h/1?max_connections=20&connect_timeout=1s&health_check_interval=30s&client_name=app",
        "rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        "redis+cluster://node1:7000", "redis+cluster://node1:7000/0?ssl=true&ssl_cert_reqs=none",
        "unix:///run/redis.sock", "unix:///run/redis.sock?db=2&timeout=1",
    ])
    def test_good_urls_are_accepted_without_connecting(self, url: str) -> None:
        assert Settings(tiers={"redis": url}).tier_urls["redis"] == url

    @pytest.mark.parametrize(("url", "field"), [
        ("redis://h/0?timeot=1", "tiers['redis']?timeot"),
        ("redis://h/0?timeout=-1", "tiers['redis']?timeout"),
        ("redis://h/0?timeout=soon", "tiers['redis']?timeout"),
        ("redis://h/0?max_connections=0", "tiers['redis']?max_connections"),
        ("redis://h/x", "tiers['redis']"),
        ("redis://h/0?db=1", "tiers['redis']?db"),
        ("redis:///0", "tiers['redis']"),
        ("redis://h:99999/0", "tiers['redis']"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "tiers['redis']?ssl_ca_certs"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "tiers['redis']?ssl_cert_reqs"),
        ("redis://h/0?ssl=true", "tiers['redis']?ssl"),
        ("redis+cluster://h:7000/2", "tiers['redis']"),
        ("unix://relative.sock", "tiers['redis']"),
        ("unix:///run/redis.sock?db=one", "tiers['redis']?db"),
    ])
    def test_bad_urls_raise_config_error_naming_the_field(self, url: str, field: str) -> None:
        with pytest.raises(ConfigError) as info:
            Settings(tiers={"redis": url})
        assert info.value.field == field

    def test_the_password_never_shows_in_errors(self) -> None:
        with pytest.raises(ConfigError) as info:
            Settings(tiers={"redis": "redis://user:hunter2@h/0?bogus=1"})
        assert "hunter2" not in str(info.value)


@pytest.fixture
async def backend(redis_url: str) -> RedisBackend:
    return RedisBackend(redis_url)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
class TestRoundTrips:
    async def test_concurrent_reads_of_one_tick_go_as_one_mget(self, backend: RedisBackend,
                                                               client: redis.Redis) -> None:
        await backend.set_many([StoreItem(f"k{i}", str(i).encode(), None) for i in range(50)])
        client.config_resetstat()

        async def burst() -> list[list[bytes | None]]:
            return await asyncio.gather(*(backend.get_many([f"k{i}"]) for i in range(50)),
                                        backend.get_many(["missing", "k3"]))

        # From idle, the first read goes at once (a lone caller pays no extra loop turn) and the rest of the
        # tick follows it as one MGET ...
        results = await burst()
        assert results[:50] == [[str(i).encode()] for i in range(50)]
        assert results[50] == [None, b"3"]
        assert calls(client, "mget") == 2
        # ... and while reads keep coming, each tick's reads are one MGET.
        client.config_resetstat()
        assert await burst() == results
        assert calls(client, "mget") == 1
        assert calls(client, "get") == 0
        await backend.aclose()

    async def test_a_lone_read_is_sent_without_waiting_for_company(self, backend: RedisBackend,
                                                                   client: redis.Redis) -> None:
        await backend.set_many([StoreItem("k", b"v", None)])
        for _ in range(3):
            assert await backend.get_many(["k"]) == [b"v"]
        state = backend._loop_state()
        assert not state.crowded
        assert state.in_flight == 0
        await backend.aclose()

    async def test_a_batch_is_one_mget_and_a_batch_write_one_transaction(self, backend: RedisBackend,
                                                                           client: redis.Redis) -> None:
        items = [StoreItem(f"k{i}", b"v", time.time() + 60, ("a", "b")) for i in range(100)]
        await backend.set_many(items)
        assert (calls(client, "multi"), calls(client, "exec"), calls(client, "set")) == (1, 1, 100)
        assert await backend.get_many([f"k{i}" for i in range(100)]) == [b"v"] * 100
        assert calls(client, "mget") == 1
        await backend.aclose()

    async def test_tags_are_sets_and_invalidating_one_never_scans(self, backend: RedisBackend,
                                                                  client: redis.Redis) -> None:
        now = time.time()
        await backend.set_many([StoreItem("x", b"1", now + 100, ("cl:~tag:t",)),
                                StoreItem("y", b"2", now + 500, ("cl:~tag:t",))])
        assert client.smembers("cl:~tag:t") == {b"x", b"y"}
        # The set lives as long as its longest-lived member.
        assert 499_000 < client.pttl("cl:~tag:t") <= 500_000
        await backend.set_many([StoreItem("z", b"3", None, ("cl:~tag:t",))])
        assert client.pttl("cl:~tag:t") == -1
        client.config_resetstat()
        await backend.delete_tags(["cl:~tag:t"])
        assert client.exists("x", "y", "z", "cl:~tag:t") == 0
        assert calls(client, "keys") == calls(client, "scan") == 0
        await backend.aclose()

    async def test_each_event_loop_gets_its_own_pool_and_an_ended_loop_leaves_no_open_socket(
            self, redis_url: str) -> None:
        backend = RedisBackend(redis_url)

        async def use(value: bytes) -> list[bytes | None]:
            await backend.set_many([StoreItem("k", value, None)])
            return await backend.get_many(["k"])

        # Other loops, in threads, one after another and never closed: the next loop's first call drops the
        # previous pool, closing its sockets (filterwarnings=error turns a leaked socket into a failure).
        for value in (b"a", b"b", b"c"):
            assert await anyio.to_thread.run_sync(asyncio.run, use(value)) == [value]
        assert await use(b"d") == [b"d"]
        await backend.aclose()
        gc.collect()

    async def test_a_backend_dropped_with_an_ended_loop_warns_about_nothing(self, redis_url: str) -> None:
        async def use() -> None:
            backend = RedisBackend(redis_url)
            await backend.set_many([StoreItem("k", b"v", None)])
            assert await backend.get_many(["k"]) == [b"v"]
            leaked.append(backend)

        leaked: list[RedisBackend] = []
        await anyio.to_thread.run_sync(asyncio.run, use())
        leaked.clear()
        gc.collect()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_every_operation_fails_with_a_clear_error(redis_url: str) -> None:
    backend = create_backend(redis_url)
    with pytest.raises(BackendError, match="asyncio only"):
        await backend.get_many(["k"])
    with pytest.raises(BackendError, match="asyncio only"):
        await backend.set_many([StoreItem("k", b"v", None)])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_unix_socket_urls_reach_the_server() -> None:
    directory = tempfile.mkdtemp(prefix="cl-sock-")
    path = os.path.join(directory, "redis.sock")
    server = RedisServer(extra_args=["--unixsocket", path, "--unixsocketperm", "700"]).start()
    try:
        backend = create_backend(f"unix://{path}?db=2")
        await backend.set_many([StoreItem("k", b"over the socket", None)])
        assert await backend.get_many(["k"]) == [b"over the socket"]
        assert redis.Redis(unix_socket_path=path, db=2).get("k") == b"over the socket"
        await backend.aclose()
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[str]:
    """A real three-node Redis cluster (no replicas) on free ports; yields its ``redis+cluster://`` URL."""
    from tests.conftest import _require_redis
    from tests.redis_server import free_port

    _require_redis()

    def cluster_port() -> int:
        # A cluster node also listens on port + 10000 (its bus), which must be a valid, free port too.
        while True:
            port = free_port()
            if port < 55_000:
                with socket.socket() as bus:
                    try:
                        bus.bind(("127.0.0.1", port + 10_000))
                    except OSError:
                        continue
                return port

    ports = [cluster_port() for _ in range(3)]
    servers = [RedisServer(port=p, extra_args=["--cluster-enabled", "yes", "--cluster-config-file",
                                               f"nodes-{p}.conf", "--cluster-node-timeout", "2000"]).start()
               for p in ports]
    try:
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while b"cluster_state:ok" not in subprocess.run(["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                                                         capture_output=True, timeout=10).stdout:
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for server in servers:
            server.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cluster_stores_reads_tags_and_locks_across_its_nodes(redis_cluster: str) -> None:
    backend = create_backend(redis_cluster)
    keys = [f"cl:ns:{i}" for i in range(30)]  # spread over the three nodes' slots
    await backend.set_many([StoreItem(k, k.encode(), time.time() + 60, ("cl:~tag:even" if i % 2 == 0 else
                                                                        "cl:~tag:odd",)) for i, k in enumerate(keys)])
    assert await backend.get_many(keys) == [k.encode() for k in keys]
    await backend.delete_tags(["cl:~tag:even"])
    assert await backend.get_many(keys) == [None if i % 2 == 0 else k.encode() for i, k in enumerate(keys)]
    await backend.delete_many(keys[1:3])
    assert await backend.get_many(keys[1:4]) == [None, None, keys[3].encode()]
    assert isinstance(backend, RedisBackend)
    assert await backend.acquire_lock("cl:~lock:x", "me", 5)
    assert not await backend.acquire_lock("cl:~lock:x", "you", 5)
    assert await backend.release_lock("cl:~lock:x", "me")
    await backend.clear_prefix("cl:")
    assert await backend.get_many(keys) == [None] * 30
    await backend.aclose()

    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": redis_cluster}))
    computed: list[int] = []

    @multilevel_cached(cache=cache, tags=lambda x: [f"mod3:{x % 3}"])
    async def triple(x: int) -> int:
        computed.append(x)
        return 3 * x

    assert [await triple(x) for x in range(12)] == [3 * x for x in range(12)]
    assert cache.local is not None
    cache.local.clear_now()
    assert [await triple(x) for x in range(12)] == [3 * x for x in range(12)]
    assert len(computed) == 12  # the second pass came from the cluster
    await cache.invalidate_tags("mod3:1")
    cache.local.clear_now()
    assert [await triple(x) for x in range(12)] == [3 * x for x in range(12)]
    assert sorted(computed[12:]) == [1, 4, 7, 10]
    await cache.aclose()


# -- TLS: rediss:// against a real server with a throwaway CA -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_rediss_stores_and_reads_over_a_verified_tls_connection(tls_redis: tuple[RedisServer, int, str]) -> None:
    """``rediss://`` with the CA that issued the server's certificate: entries go to that server and come back."""
    server, tls_port, ca_file = tls_redis
    plain = redis.Redis(port=server.port)
    plain.flushall()
    url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca_file}&ssl_cert_reqs=required"
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": url}))
    computed: list[int] = []

    @multilevel_cached(cache=cache)
    async def square(x: int) -> int:
        computed.append(x)
        return x * x

    assert [await square(x) for x in range(5)] == [0, 1, 4, 9, 16]
    assert len([k for k in plain.keys("*") if b"~tag:" not in k]) == 5  # the entries are on that server
    assert cache.local is not None
    cache.local.clear_now()
    assert [await square(x) for x in range(5)] == [0, 1, 4, 9, 16]
    assert computed == [0, 1, 2, 3, 4]
    assert square.cache_info().hits_by_tier == {"redis": 5}
    assert cache.tier_stats()["redis"]["errors"] == 0
    await cache.aclose()
    plain.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_rediss_verifies_the_server_by_default(tls_redis: tuple[RedisServer, int, str]) -> None:
    """Without the issuing CA the server's certificate is not trusted: the tier fails (and is counted), nothing
    is sent to the server, and the decorated call still returns its result."""
    server, tls_port, _ = tls_redis
    plain = redis.Redis(port=server.port)
    plain.flushall()
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": f"rediss://localhost:{tls_port}/0"}))

    @multilevel_cached(cache=cache)
    async def double(x: int) -> int:
        return 2 * x

    assert await double(21) == 42
    assert cache.tier_stats()["redis"]["errors"] >= 1
    assert plain.dbsize() == 0
    await cache.aclose()
    plain.close()
