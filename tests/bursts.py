"""A burst of concurrent misses through ``@multilevel_cached``: what the burst tests of every tier share."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel

from cachelayers import TieredCache, multilevel_cached


async def burst(cache: TieredCache, n: int, computed: list[int], *, name: str = "burst") -> tuple[list[int], Any]:
    """Call a cached ``double`` on ``0..n-1`` all at once (asyncio or trio); return the results in order and
    its ``cache_info()``. ``computed`` collects the arguments the function itself ran for."""
    @multilevel_cached(cache=cache, name=name)
    async def double(x: int) -> int:
        computed.append(x)
        await anyio.lowlevel.checkpoint()
        return 2 * x

    results = [-1] * n

    async def call(x: int) -> None:
        results[x] = await double(x)

    async with anyio.create_task_group() as tg:
        for x in range(n):
            tg.start_soon(call, x)
    return results, double.cache_info()
