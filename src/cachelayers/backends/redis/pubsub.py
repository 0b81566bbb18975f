"""Subscriptions of the Redis tier: each on a client of its own that never reconnects silently."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio

from cachelayers.backends.redis.options import close_client, make_client

__all__ = ["subscription"]


@contextlib.asynccontextmanager
async def subscription(kwargs: dict[str, Any], channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
    """Subscribe to ``channel`` with a client made from ``kwargs`` (`client_kwargs`); yields the messages.

    A lost connection ends the iteration with an error, so the engine knows it may have missed messages.
    """
    # A client of its own: no read timeout (it waits for messages) and no silent reconnect, so that a lost
    # connection ends the subscription and the engine knows it may have missed messages. On a cluster it
    # talks to the node of the URL: PUBLISH reaches every node.
    options = {k: v for k, v in kwargs.items() if k not in ("max_connections", "health_check_interval")}
    options.update(socket_timeout=None, retries=0)
    client = make_client(options, cluster=False)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        while True:  # the confirmation: from here on no published message is missed
            reply = await pubsub.get_message(timeout=None)
            if reply is not None and reply["type"] == "subscribe":
                break
        yield _messages(pubsub)
    finally:
        # The subscriber is usually cancelled (the engine closing): close the connection all the same.
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            await close_client(client)


async def _messages(pubsub: Any) -> AsyncIterator[bytes]:
    while True:
        reply = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        if reply is not None and reply["type"] == "message":
            yield reply["data"]
