"""A worker process for the invalidation fault tests: ``python -m tests.inval_worker '<json options>'``.

It caches ``value(x)`` (tag ``"t"``), whose source of truth is the text of the file ``options["source"]``, in
memory + Redis (``options["redis"]``, maybe through a proxy), and obeys one JSON command per line on stdin,
answering one JSON object per line on stdout:

* ``{"op": "read", "n": 10}``: ``{"values": [...]}``, ``n`` calls of ``value(1)``;
* ``{"op": "invalidate"}``: ``invalidate_tags("t")``; ``{"ok": true}`` or ``{"error": "<type>", ...}``;
* ``{"op": "status"}``: ``{"queued": <invalidations waiting for replay>, "stamp": <last invalidation heard>,
  "landed": <last invalidation known>, "subscribed": <bool>}``;
* ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio

from cachelayers import Settings, TieredCache, multilevel_cached


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def serve(options: dict[str, Any]) -> None:
    source = Path(options["source"])
    cache = TieredCache(Settings(tiers={"memory": "memory://", "redis": options["redis"]}, default_ttl="10m",
                                 breaker_cooldown="200ms"))

    @multilevel_cached(cache=cache, name="faults", tags=["t"])
    async def value(x: int) -> str:
        return source.read_text()  # noqa: ASYNC240 - a tiny file, the test's source of truth

    await cache.follow_invalidations()
    say(event="ready")
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        op = command["op"]
        if op == "read":
            say(values=[await value(1) for _ in range(command.get("n", 1))])
        elif op == "invalidate":
            try:
                await cache.invalidate_tags("t")
            except Exception as exc:
                say(error=type(exc).__name__, message=str(exc))
            else:
                say(ok=True)
        elif op == "status":
            outbox = getattr(cache, "invalidations", None)  # the code before issue 11 had none
            listener = cache.listener
            epochs = getattr(cache, "epochs", None)
            say(queued=0 if outbox is None else outbox.queued, stamp=0 if epochs is None else epochs.stamp,
                landed=0 if epochs is None else max(epochs.last.values(), default=0),
                subscribed=listener is not None and listener.subscribed)
        else:
            break
    await cache.aclose()


def main() -> None:
    anyio.run(serve, json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
