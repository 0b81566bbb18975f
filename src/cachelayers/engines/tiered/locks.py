"""Single-flight across processes (``lock=``): a leased lock in the first `LockSupport` tier.

One process computes a missing key while the others wait for its release message on the invalidation
channel (or look again after an exponentially growing pause); a holder that died leaves a lock that expires
with its lease. If the lock tier fails, the call computes without it (fail open).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import anyio

from cachelayers.backends.base import MISSING, LockSupport
from cachelayers.engines.tiered.cache import TieredCache
from cachelayers.engines.tiered.tier import Tier

__all__ = ["compute_locked", "refresh_locked"]

# A lock waiter looks again after a pause that doubles up to LOCK_MAX_WAIT. When it hears release messages it
# is woken by them, and the pause only bounds the wait if a message is lost, so it starts longer.
LOCK_FIRST_WAIT: Final = 0.02
LOCK_FIRST_WAIT_NOTIFIED: Final = 0.25
LOCK_MAX_WAIT: Final = 1.0


def _lock_name(cache: TieredCache, storage_key: str) -> str:
    return cache.lock_prefix + storage_key[len(cache.settings.key_prefix):]


async def compute_locked(cache: TieredCache, storage_key: str, lease: float, read: Callable[[], Awaitable[Any]],
                         compute: Callable[[], Awaitable[Any]]) -> Any:
    """Compute under a leased lock so that one process computes while the others wait for its result.

    Args:
        cache: The engine; it has a lock tier.
        storage_key: The entry's storage key (the lock is named after it).
        lease: Seconds the lock is held without being extended.
        read: Looks the entry up in the tiers below memory: its value, or `MISSING`.
        compute: Computes and stores the entry, returning the value.

    Returns:
        The value computed here, or read once another process stored it.
    """
    tier = cache.lock_tier
    assert tier is not None
    backend = cast(LockSupport, tier.backend)
    name = _lock_name(cache, storage_key)
    token = os.urandom(16).hex()
    listener = cache.listener
    if listener is not None:
        await listener.follow()
    notified = listener is not None and listener.here()  # a release is heard, and can be awaited, in this loop
    pause = LOCK_FIRST_WAIT_NOTIFIED if notified else LOCK_FIRST_WAIT
    while True:
        woken = listener.waiter(name) if listener is not None and listener.here() else None
        acquired = await tier.call(lambda: backend.acquire_lock(name, token, lease), None)
        if acquired is None:
            return await compute()
        if acquired:
            break
        with anyio.move_on_after(pause):
            if woken is not None:
                await woken.wait()
            else:
                await anyio.sleep_forever()
        pause = min(pause * 2, LOCK_MAX_WAIT)
        value = await read()
        if value is not MISSING:
            return value
    release = cache.events.seal("l", name)
    try:
        # A second look now that we hold the lock: the previous holder may have stored it just before.
        value = await read()
        if value is not MISSING:
            return value
        async with anyio.create_task_group() as tg:
            tg.start_soon(_keep_lease, tier, backend, name, token, lease)
            try:
                return await compute()
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await tier.call(lambda: backend.release_lock(name, token, (cache.channel, release)), False)


async def _keep_lease(tier: Tier, backend: LockSupport, name: str, token: str, lease: float) -> None:
    """Extend the lease while the computation runs, so a long call keeps the others waiting."""
    while True:
        await anyio.sleep(lease / 3)
        if await tier.call(lambda: backend.extend_lock(name, token, lease), None) is False:
            return


async def refresh_locked(cache: TieredCache, storage_key: str, lease: float,
                         compute: Callable[[], Awaitable[Any]]) -> Any:
    """Refresh a stale entry unless another process holds its lock (then it refreshes; we keep serving).

    Returns:
        The value computed, or `MISSING` when another process holds the lock.
    """
    tier = cache.lock_tier
    assert tier is not None
    backend = cast(LockSupport, tier.backend)
    name = _lock_name(cache, storage_key)
    token = os.urandom(16).hex()
    acquired = await tier.call(lambda: backend.acquire_lock(name, token, lease), None)
    if acquired is False:
        return MISSING
    try:
        return await compute()
    finally:
        if acquired:
            release = cache.events.seal("l", name)
            with anyio.CancelScope(shield=True):
                await tier.call(lambda: backend.release_lock(name, token, (cache.channel, release)), False)
