"""Throughput of memory hits under a flood of "clear everything" messages on the invalidation channel.

The issue 12 attack: anyone who can ``PUBLISH`` on ``<prefix>~events`` sends a clear every 2 ms. Contenders,
all ``@multilevel_cached`` on memory + Redis over ``--keys`` hot keys, in this process, measured interleaved
in ``--rounds`` rounds (a fresh random order each round), each for ``--seconds``:

* **secret, quiet**: ``secret=`` set, no flood (the baseline of the ratios);
* **secret, forged flood**: an attacker without the secret floods forged clears (dropped and counted);
* **secret, valid flood**: a process holding the secret floods signed clears (coalesced: at most one
  applied per ``channel_clear_interval``, default 1 s);
* **no secret, flood**: unsigned clears, accepted but coalesced the same way;
* **no secret, flood, uncoalesced**: ``channel_clear_interval=0``, every clear applied (the old behaviour).

The flood is published by a thread with a plain redis client, every 2 ms. Reported: calls/s (median round)
and its ratio to the quiet baseline (median of per-round ratios). Run ``python benchmarks/bench_channel_flood.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgpack
import redis

from _util import RedisServer, Series, emit, environment, environment_line, interleaved, render_table
from cachelayers import Settings, TieredCache, multilevel_cached
from cachelayers.engines.tiered.events import Events

SECRET = "bench-channel-secret-0123"
BASELINE = "secret, quiet"


def _forged() -> bytes:
    return bytes(msgpack.packb([os.urandom(8), "c", [], int(time.time() * 1000), os.urandom(12), os.urandom(20)],
                               use_bin_type=True))


def _unsigned() -> bytes:
    return bytes(msgpack.packb([os.urandom(8), "c", []], use_bin_type=True))


class Flood:
    """A thread publishing one message every ``every`` seconds until stopped."""

    def __init__(self, url: str, channel: str, make: Callable[[], bytes] | None, every: float = 0.002) -> None:
        self.url, self.channel, self.make, self.every = url, channel, make, every
        self.stop = threading.Event()
        self.sent = 0
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Flood:
        if self.make is not None:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        client = redis.Redis.from_url(self.url)
        assert self.make is not None
        while not self.stop.wait(self.every):
            client.publish(self.channel, self.make())
            self.sent += 1
        client.close()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with RedisServer() as server:
        url = server.url
        tiers = {"memory": "memory://", "redis": url}
        interval = {} if args.interval is None else {"channel_clear_interval": args.interval}
        engines = {"secret": TieredCache(Settings(tiers=tiers, secret=SECRET, key_prefix="sec:", **interval)),
                   "plain": TieredCache(Settings(tiers=tiers, key_prefix="plain:", **interval)),
                   "plain0": TieredCache(Settings(tiers=tiers, channel_clear_interval=0, key_prefix="zero:"))}
        insider = Events("sec:~events", os.urandom(8), SECRET, 0.0)
        contenders: dict[str, tuple[str, Callable[[], bytes] | None]] = {
            BASELINE: ("secret", None),
            "secret, forged flood": ("secret", _forged),
            "secret, valid flood": ("secret", lambda: insider.seal("c", [])),
            "no secret, flood": ("plain", _unsigned),
            "no secret, flood, uncoalesced": ("plain0", _unsigned),
        }
        functions = {}
        for name, engine in engines.items():
            @multilevel_cached(cache=engine, namespace=f"bench.{name}")
            async def f(x: int) -> int:
                return 2 * x + 1

            functions[name] = f
            for x in range(args.keys):
                await f(x)
        series = {name: Series() for name in contenders}
        for order in interleaved(list(contenders), args.rounds, rng):
            for name in order:
                engine_name, make = contenders[name]
                fn = functions[engine_name]
                with Flood(url, engines[engine_name].channel, make):
                    await anyio.sleep(0.05)
                    calls, start = 0, time.perf_counter()
                    deadline = start + args.seconds
                    while time.perf_counter() < deadline:
                        for x in range(args.keys):
                            await fn(x)
                        calls += args.keys
                    series[name].samples.append(calls / (time.perf_counter() - start))
        stats = {name: {k: v for k, v in engine.tier_stats()["redis"].items() if k.startswith(("events", "clears"))}
                 for name, engine in engines.items()}
        for engine in engines.values():
            await engine.aclose()
    return {"environment": environment(["cachelayers", "redis"]), "keys": args.keys, "rounds": args.rounds,
            "seconds": args.seconds, "interval": engines["secret"].settings.channel_clear_interval,
            "source": str(Path(sys.modules["cachelayers"].__file__ or "").parent),
            "samples": {n: s.samples for n, s in series.items()}, "channel": stats}


def render(document: dict[str, Any]) -> str:
    base = Series(document["samples"][BASELINE])
    rows = []
    for name, samples in document["samples"].items():
        series = Series(samples)
        rows.append([name, f"{series.median:,.0f}", f"{series.median_ratio(base):.3f}"])
    channel = "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in s.items() if v) for n, s in
                        document["channel"].items())
    return "\n".join([environment_line(document["environment"]),
                      f"{document['source']}: {document['keys']:,} hot keys, memory + Redis, flood every 2 ms, "
                      f"median of {document['rounds']} interleaved rounds of {document['seconds']} s, "
                      f"channel_clear_interval={document['interval']} s",
                      render_table(["scenario", "calls/s", "ratio to quiet"], rows),
                      f"channel counters: {channel}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval", type=float, default=None,
                        help="channel_clear_interval of the coalescing engines (default: the setting's default)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args(argv)
    document = anyio.run(run, args)
    emit(document, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
