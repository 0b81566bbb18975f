"""Leased locks of the Redis tier (single-flight across processes): ``SET NX PX`` and two scripts."""

from __future__ import annotations

import math
from typing import Any, Final

__all__ = ["EXTEND_SCRIPT", "RELEASE_SCRIPT", "acquire_lock", "extend_lock", "release_lock"]

EXTEND_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Release and notify in one step, so a waiter woken by the message finds the lock already free. The message
# goes out even when the lease had run out: the value was written all the same.
RELEASE_SCRIPT: Final = """
local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) held = 1 end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return held
"""


async def acquire_lock(client: Any, name: str, token: str, lease: float) -> bool:
    """``SET name token NX PX lease``: whether the lock was taken."""
    return bool(await client.set(name, token, nx=True, px=max(1, math.ceil(lease * 1000))))


async def extend_lock(client: Any, name: str, token: str, lease: float) -> bool:
    """Reset the lease if ``token`` still holds the lock."""
    return bool(await client.eval(EXTEND_SCRIPT, 1, name, token, max(1, math.ceil(lease * 1000))))


async def release_lock(client: Any, name: str, token: str, notify: tuple[str, bytes] | None = None) -> bool:
    """Delete the lock if ``token`` holds it and publish ``notify``, atomically."""
    channel, message = notify if notify is not None else ("", b"")
    return bool(await client.eval(RELEASE_SCRIPT, 1, name, token, channel, message))
