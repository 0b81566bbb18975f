"""The Redis tier's URL options: checked without importing redis-py, turned into client arguments."""

from __future__ import annotations

import contextlib
from typing import Any, Final

from cachelayers.backends.base import BackendURL
from cachelayers.durations import parse_duration
from cachelayers.errors import ConfigError

__all__ = ["CERT_REQS", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_PORT", "DEFAULT_TIMEOUT", "OPTIONS", "SSL_OPTIONS",
           "client_kwargs", "close_client", "make_client", "validate_redis_url"]

DEFAULT_PORT: Final = 6379
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_MAX_CONNECTIONS: Final = 100  # per event loop; a command waits for a free one (up to the tier timeout)
SSL_OPTIONS: Final = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})
CERT_REQS: Final = frozenset({"none", "optional", "required"})
OPTIONS: Final = frozenset({"timeout", "connect_timeout", "max_connections", "health_check_interval", "client_name",
                            "db", "ssl", *SSL_OPTIONS})


def validate_redis_url(url: BackendURL) -> None:
    """Check the address, database number and options of a Redis URL (the generic checks done).

    Raises:
        ConfigError: The address, database number or an option is malformed (the error names it).
    """
    opts = url.options
    if url.scheme == "unix":
        if url.host or not url.path.startswith("/"):
            raise ConfigError(url.field, url.redacted(), "expected unix:///absolute/path/to/redis.sock")
        if "db" in opts and not opts["db"].isdecimal():
            raise ConfigError(url.option_field("db"), opts["db"], "expected a database number (0, 1, ...)")
    else:
        if not url.host:
            raise ConfigError(url.field, url.redacted(), f"needs a host, e.g. {url.scheme}://localhost:6379/0")
        db = url.path.strip("/")
        if db and not db.isdecimal():
            raise ConfigError(url.field, url.redacted(), f"the path must be a database number, got {db!r}")
        if "db" in opts:
            raise ConfigError(url.option_field("db"), opts["db"], "put the database number in the path: /0")
        if url.scheme == "redis+cluster" and db not in ("", "0"):
            raise ConfigError(url.field, url.redacted(), "a Redis cluster has database 0 only")
    for name in ("timeout", "connect_timeout"):
        if name in opts and parse_duration(opts[name], url.option_field(name)) <= 0:
            raise ConfigError(url.option_field(name), opts[name], "must be positive")
    if "health_check_interval" in opts:
        parse_duration(opts["health_check_interval"], url.option_field("health_check_interval"))
    raw = opts.get("max_connections")
    if raw is not None and (not raw.isdecimal() or int(raw) <= 0):
        raise ConfigError(url.option_field("max_connections"), raw, "expected a positive integer")
    if "ssl" in opts:
        if url.scheme != "redis+cluster":
            raise ConfigError(url.option_field("ssl"), opts["ssl"], "use rediss:// for TLS")
        if opts["ssl"].lower() not in ("true", "false", "1", "0"):
            raise ConfigError(url.option_field("ssl"), opts["ssl"], "expected true or false")
    tls = url.scheme == "rediss" or opts.get("ssl", "").lower() in ("true", "1")
    for name in sorted(SSL_OPTIONS & set(opts)):
        if not tls:
            raise ConfigError(url.option_field(name), opts[name], "TLS options need rediss:// (or ?ssl=true)")
    if "ssl_cert_reqs" in opts and opts["ssl_cert_reqs"] not in CERT_REQS:
        raise ConfigError(url.option_field("ssl_cert_reqs"), opts["ssl_cert_reqs"],
                          f"expected one of {', '.join(sorted(CERT_REQS))}")


def client_kwargs(url: BackendURL) -> dict[str, Any]:
    """The keyword arguments of redis-py's client for ``url`` (already validated)."""
    opts = url.options
    timeout = parse_duration(opts["timeout"], "timeout") if "timeout" in opts else DEFAULT_TIMEOUT
    kwargs: dict[str, Any] = {
        "username": url.username,
        "password": url.password,
        "socket_timeout": timeout,
        "socket_connect_timeout": (parse_duration(opts["connect_timeout"], "connect_timeout")
                                   if "connect_timeout" in opts else timeout),
        # One immediate retry: a pooled connection that died with a restarted server is replaced at once;
        # anything longer is the engine's business (tier timeout, circuit breaker).
        "retries": 1,
        "decode_responses": False,
    }
    if "health_check_interval" in opts:
        kwargs["health_check_interval"] = parse_duration(opts["health_check_interval"], "health_check_interval")
    if "client_name" in opts:
        kwargs["client_name"] = opts["client_name"]
    kwargs["max_connections"] = int(opts.get("max_connections", DEFAULT_MAX_CONNECTIONS))
    if url.scheme == "unix":
        kwargs["path"] = url.path
        kwargs["db"] = int(opts.get("db", "0"))
    else:
        kwargs["host"] = url.host
        kwargs["port"] = url.port or DEFAULT_PORT
        if url.scheme != "redis+cluster":
            kwargs["db"] = int(url.path.strip("/") or 0)
    if url.scheme == "rediss" or opts.get("ssl", "").lower() in ("true", "1"):
        kwargs["ssl"] = True
        for name in SSL_OPTIONS & set(opts):
            kwargs[name] = opts[name]
    return kwargs


def make_client(kwargs: dict[str, Any], *, cluster: bool) -> Any:
    """A redis-py asyncio client (or cluster client) from `client_kwargs`."""
    # redis-py is imported here, not at module level: validating a URL must not load the driver.
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    kwargs = dict(kwargs)
    kwargs["retry"] = Retry(NoBackoff(), kwargs.pop("retries"))
    if cluster:
        kwargs.pop("max_connections", None)
        kwargs.pop("health_check_interval", None)
        return RedisCluster(**kwargs)
    # A pool that waits for a connection when all are in use, rather than raising MaxConnectionsError: under a
    # burst, a command queues; the engine's tier timeout bounds the wait (the socket timeout, if longer).
    kwargs["timeout"] = kwargs.get("socket_timeout")
    if "path" in kwargs:
        kwargs.pop("ssl", None)
        pool = aredis.BlockingConnectionPool(connection_class=aredis.UnixDomainSocketConnection, **kwargs)
    elif kwargs.pop("ssl", False):
        pool = aredis.BlockingConnectionPool(connection_class=aredis.SSLConnection, **kwargs)
    else:
        pool = aredis.BlockingConnectionPool(**kwargs)
    return aredis.Redis(connection_pool=pool)


async def close_client(client: Any) -> None:
    """Close ``client`` and its connection pool, ignoring errors."""
    with contextlib.suppress(Exception):
        if hasattr(client, "connection_pool"):
            await client.aclose(close_connection_pool=True)
        else:
            await client.aclose()
