"""What a shared tier holds under tags: current entries and their bytes per tag, read-only.

For ``cachelayers stats`` (entries per namespace: a namespace is the tag its entries carry first) and
``cachelayers invalidate`` (how many entries an invalidation removes). It lists keys, so it is for operators,
never for the hot path. Disk reads its database file, Redis its tag sets, memcached every key it holds.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

import anyio

from cachelayers.backends.base import Backend

__all__ = ["Usage", "tag_usage"]


class Usage(NamedTuple):
    """Entries under a tag and the bytes they take in the tier."""

    entries: int
    bytes: int


async def tag_usage(backend: Backend, tag_prefix: str) -> dict[str, Usage] | None:
    """Current entries and bytes per tag starting with ``tag_prefix``; ``None`` for a backend that cannot tell.

    Args:
        backend: A disk, Redis or memcached tier (any other gives ``None``).
        tag_prefix: Tags as the tier names them, e.g. ``"cl:~tag:ns\\x1f"`` for every namespace.

    Returns:
        ``{tag: Usage}`` for every tag with at least one current entry.

    Raises:
        Exception: Whatever the store raised (the tier is unreachable, the file unreadable).
    """
    module = type(backend).__module__
    if module.startswith("cachelayers.backends.disk"):
        path: Path = backend.path  # type: ignore[attr-defined]
        return await anyio.to_thread.run_sync(_disk_usage, path, tag_prefix, backend.clock())
    if module.startswith("cachelayers.backends.redis"):
        return await _redis_usage(backend, tag_prefix)
    if module.startswith("cachelayers.backends.memcached"):
        found: dict[str, tuple[int, int]] = await backend.tag_usage(tag_prefix)  # type: ignore[attr-defined]
        return {tag: Usage(*counts) for tag, counts in found.items()}
    return None


def _disk_usage(path: Path, tag_prefix: str, now: float) -> dict[str, Usage]:
    if not path.exists():
        return {}
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT t.tag, count(*), sum(e.size) FROM tags t JOIN entries e ON e.key = t.key "
            "WHERE substr(t.tag, 1, ?) = ? AND (e.expires_at IS NULL OR e.expires_at > ?) GROUP BY t.tag",
            (len(tag_prefix), tag_prefix, now)).fetchall()
    finally:
        db.close()
    return {str(tag): Usage(int(count), int(size or 0)) for tag, count, size in rows}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def _redis_usage(backend: Backend, tag_prefix: str) -> dict[str, Usage]:
    from cachelayers.backends.redis.options import client_kwargs, close_client, make_client

    client: Any = make_client(client_kwargs(backend.url), cluster=backend.url.scheme == "redis+cluster")
    usage: dict[str, Usage] = {}
    try:
        async for raw in client.scan_iter(match=_glob_escape(tag_prefix) + "*", count=1000, _type="SET"):
            members = list(await client.smembers(raw))
            pipe = client.pipeline(transaction=False)
            for member in members:
                pipe.strlen(member)
            sizes = [int(n) for n in await pipe.execute()] if members else []
            live = [n for n in sizes if n > 0]
            if live:
                tag = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
                usage[tag] = Usage(len(live), sum(live))
    finally:
        await close_client(client)
    return usage
