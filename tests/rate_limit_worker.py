"""One process of the multi-process rate-limit tests (``python -m tests.rate_limit_worker '<json>'``).

Modes:

* ``saturate``: prints ``ready`` once connected and reads ``{"start_at": …, "stop_at": …}`` (wall clock)
  from stdin; from ``start_at`` to ``stop_at``, ``tasks`` tasks call a function limited by ``limit`` over
  Redis as fast as they are admitted. Every admission is recorded twice: around the storage
  call that granted it (``before``/``after`` the moving-window hit: the time limits stored lies between) and
  around the decorated call (``called`` before it, ``started`` when its body began). At ``stop_at`` the
  waiters are cancelled. Prints one JSON object: ``grants``, ``calls``, ``info`` (the engine's counters).
* ``probe``: prints ``ready`` once connected, waits for a line on stdin, then makes one call of the limited
  function and prints the wall-clock time its body began.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
from limits.aio.storage import RedisStorage

from cachelayers import RateLimiter, Settings, rate_limited
from cachelayers.backends.limits_storage import LIMITS_KEY_SUFFIX, limits_storage_url


class RecordingRedisStorage(RedisStorage):
    """limits' Redis storage noting when each granted moving-window hit was sent and answered."""

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        self.grants: list[tuple[float, float]] = []

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        before = time.time()
        ok = await super().acquire_entry(key, limit, expiry, amount)
        if ok and amount > 0:
            self.grants.append((before, time.time()))
        return bool(ok)


async def saturate(args: dict[str, Any]) -> dict[str, Any]:
    mapped, options = limits_storage_url(args["url"])
    storage = RecordingRedisStorage(mapped, implementation="redispy", key_prefix=f"cl:{LIMITS_KEY_SUFFIX}",
                                    **options)
    limiter = RateLimiter(Settings(limits={"shared": args["limit"]}), storage=storage)
    calls: list[tuple[float, float]] = []

    @rate_limited("shared", limiter=limiter)
    async def call(called: float) -> None:
        calls.append((called, time.time()))

    async def client() -> None:
        while True:
            await call(time.time())

    await storage.check()  # connect before the clock matters
    print("ready", flush=True)
    args.update(json.loads(await anyio.to_thread.run_sync(sys.stdin.readline)))
    await anyio.sleep(max(0.0, args["start_at"] - time.time()))
    with anyio.move_on_after(args["stop_at"] - time.time()):
        async with anyio.create_task_group() as tg:
            for _ in range(args["tasks"]):
                tg.start_soon(client)
    info = limiter.info()._asdict()
    await storage.bridge.get_connection().aclose()  # type: ignore[attr-defined]
    return {"grants": storage.grants, "calls": calls, "info": info}


async def probe(args: dict[str, Any]) -> None:
    limiter = RateLimiter(Settings(limits={"shared": args["limit"]}), storage=args["url"],
                          pause_check=args.get("pause_check", 0.25))

    @rate_limited("shared", key=lambda model, **_: model, limiter=limiter)
    async def call(model: str) -> float:
        return time.time()

    await call("warm-up")  # connect and load the scripts before the clock matters
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    print(json.dumps({"started": await call(args["key"])}), flush=True)
    await limiter.aclose()


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["mode"] == "saturate":
        print(json.dumps(anyio.run(saturate, args)), flush=True)
    else:
        anyio.run(probe, args)


if __name__ == "__main__":
    main()
