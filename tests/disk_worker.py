"""A worker process for the disk tier's multi-process tests: ``python -m tests.disk_worker <mode> '<json options>'``.

It prints one JSON object on stdout when done (``{"event": "done", ...}``). Modes:

* ``churn``: from ``start_at`` for ``seconds``, 8 tasks writing (``set_many`` of 1-3 entries of 100-4,000 bytes,
  with tags) and reading (``get_many``) random keys as fast as they can, each operation bounded as the engine
  bounds a tier call (``within(bound)``, when ``bound`` is given); report operations and failures (by type)
  (also the workload of ``benchmarks/bench_disk.py``'s process scenario);
* ``write-read``: write the ``write`` entries (key -> text), then read the ``read`` keys; report what was found.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from typing import Any

import anyio

from cachelayers import StoreItem
from cachelayers.backends.disk import DiskBackend


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def churn(options: dict[str, Any]) -> None:
    disk = DiskBackend(f"disk://{options['dir']}?max_bytes={options['max_bytes']}")
    rng = random.Random(options["seed"])
    counts: dict[str, Any] = {"ops": 0, "failures": 0, "errors": {}}
    bound = options.get("bound")
    within = getattr(disk, "within", anyio.fail_after)  # a checkout from before that hook: the wall clock
    await anyio.sleep(max(0.0, options["start_at"] - time.time()))
    deadline = time.time() + options["seconds"]

    async def client() -> None:
        while time.time() < deadline:
            keys = [f"k{rng.randrange(3000)}" for _ in range(rng.randint(1, 3))]
            try:
                with within(bound) if bound is not None else contextlib.nullcontext():
                    if rng.random() < 0.5:
                        await disk.get_many(keys)
                    else:
                        await disk.set_many([StoreItem(k, rng.randbytes(rng.randrange(100, 4000)), None,
                                                       (f"t{int(k[1:]) % 5}",)) for k in keys])
            except Exception as exc:
                counts["failures"] += 1
                counts["errors"][str(exc)] = counts["errors"].get(str(exc), 0) + 1
            counts["ops"] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(client)
    entries, used = await disk.usage()
    await disk.aclose()
    say(event="done", **counts, entries=entries, used=used, checkpoints=getattr(disk, "checkpoints", None))


async def write_read(options: dict[str, Any]) -> None:
    disk = DiskBackend(f"disk://{options['dir']}")
    await disk.set_many([StoreItem(key, value.encode(), None) for key, value in options["write"].items()])
    found = await disk.get_many(options["read"]) if options["read"] else []
    await disk.aclose()
    read = {key: None if blob is None else blob.decode() for key, blob in zip(options["read"], found, strict=True)}
    say(event="done", read=read, reopened=getattr(disk, "reopened", None))


def main() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    anyio.run({"churn": churn, "write-read": write_read}[mode], json.loads(raw))


if __name__ == "__main__":
    main()
