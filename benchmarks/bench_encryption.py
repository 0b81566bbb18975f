"""What encryption at rest costs per hit: plain, signed (``secret``) and encrypted (``encryption_keys``) entries.

Scenarios, each measured for the three protections *interleaved* in ``--rounds`` rounds (a fresh random order
each round), ``@multilevel_cached`` on ``async def f(x: int) -> dict`` returning a value of ``--size`` bytes:

* **memory hit** (memory + Redis tiers): the value is in the memory tier; the codec is not involved (control);
* **Redis hit** (memory + Redis tiers): the memory tier is emptied before each pass, so every call reads the
  envelope from Redis, checks (and decrypts) it and back-fills memory;
* **disk hit** (memory + disk tiers): the same with the disk tier;
* **open**: `Codec.open` alone on one envelope (the CPU part of a lower-tier hit).

Reported per scenario: the median round in µs per call, and the ratio to the plain round of the same round
(median of the per-round ratios). Run ``python benchmarks/bench_encryption.py`` (``--json`` for the samples).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from _util import RedisServer, Series, emit, environment, environment_line, gc_paused, interleaved, render_table
from cachelayers import Settings, TieredCache, multilevel_cached
from cachelayers.codec import Codec

PROTECTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "signed": {"secret": "a-secret-of-32-bytes-for-signing"},
    "encrypted": {"encryption_keys": f"k1:{base64.b64encode(os.urandom(32)).decode()}"},
}


async def per_call(fn: Callable[[int], Awaitable[Any]], keys: int, before: Callable[[], None] | None) -> float:
    """Nanoseconds per call of ``fn(i)`` over ``keys`` keys, after ``before()`` (outside the timing)."""
    if before is not None:
        before()
    with gc_paused():
        start = time.perf_counter_ns()
        for i in range(keys):
            await fn(i)
        return (time.perf_counter_ns() - start) / keys


async def engines(tiers: dict[str, str], size: int, keys: int) -> dict[str, tuple[TieredCache, Any]]:
    """One engine per protection, its keys written (a miss pass) so that every later call is a hit."""
    pad = "v" * size
    out = {}
    for name, protection in PROTECTIONS.items():
        cache = TieredCache(Settings(tiers=tiers, key_prefix=f"bench-{name}:", **protection))

        @multilevel_cached(cache=cache, name=f"enc.{name}", ttl=3600)
        async def f(x: int) -> dict[str, Any]:
            return {"x": x, "pad": pad}

        for i in range(keys):
            await f(i)
        out[name] = (cache, f)
    return out


async def measure(tiers: dict[str, str], size: int, keys: int, rounds: int, rng: random.Random,
                  label: str) -> dict[str, dict[str, Series]]:
    built = await engines(tiers, size, keys)
    lower = {name: Series() for name in PROTECTIONS}
    memory = {name: Series() for name in PROTECTIONS}
    for order in interleaved(list(PROTECTIONS), rounds, rng):
        for name in order:
            cache, f = built[name]
            local = cache.local
            assert local is not None
            lower[name].samples.append(await per_call(f, keys, local.clear_now))
            memory[name].samples.append(await per_call(f, keys, None))
    for cache, _ in built.values():
        await cache.aclose()
    return {f"{label} hit": lower, "memory hit": memory}


def open_cost(size: int, rounds: int, rng: random.Random) -> dict[str, Series]:
    value = {"x": 1, "pad": "v" * size}
    codecs = {name: Codec(secret=p.get("secret"), encryption_keys=p.get("encryption_keys"))
              for name, p in PROTECTIONS.items()}
    sealed = {name: (codec, codec.seal("cl:f:abc", value, None)) for name, codec in codecs.items()}
    out = {name: Series() for name in PROTECTIONS}
    count = 20_000
    for order in interleaved(list(PROTECTIONS), rounds, rng):
        for name in order:
            codec, blob = sealed[name]
            with gc_paused():
                start = time.perf_counter_ns()
                for _ in range(count):
                    codec.open("cl:f:abc", blob)
                out[name].samples.append((time.perf_counter_ns() - start) / count)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    scenarios: dict[str, dict[str, Series]] = {}
    with RedisServer() as server:
        scenarios.update(await measure({"memory": "memory://", "redis": server.url}, args.size, args.keys,
                                       args.rounds, rng, "Redis"))
    with tempfile.TemporaryDirectory(prefix="bench-encryption-") as tmp:
        found = await measure({"memory": "memory://", "disk": f"disk://{Path(tmp)}"}, args.size, args.keys,
                              args.rounds, rng, "disk")
        scenarios["disk hit"] = found["disk hit"]
    scenarios["open"] = open_cost(args.size, args.rounds, rng)
    return {"environment": environment(["cachelayers", "cryptography", "redis"]), "size": args.size,
            "keys": args.keys, "rounds": args.rounds,
            "source": str(Path(sys.modules["cachelayers"].__file__ or "").parent),
            "scenarios": {s: {n: series.samples for n, series in by.items()} for s, by in scenarios.items()}}


def render(document: dict[str, Any]) -> str:
    rows = []
    for scenario, by_name in document["scenarios"].items():
        plain = Series(by_name["plain"])
        cells = [scenario]
        for name in PROTECTIONS:
            series = Series(by_name[name])
            cells.append(f"{series.median / 1000:.2f}")
            if name != "plain":
                cells.append(f"{series.median_ratio(plain):.2f}x  (+{(series.median - plain.median) / 1000:.2f})")
        rows.append(cells)
    headers = ["scenario", "plain µs", "signed µs", "signed/plain (+µs)", "encrypted µs", "encrypted/plain (+µs)"]
    return "\n".join([environment_line(document["environment"]),
                      f"{document['source']}: value of ~{document['size']:,} bytes, {document['keys']:,} keys, "
                      f"median of {document['rounds']} interleaved rounds, µs per call",
                      render_table(headers, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1000, help="bytes of padding in each value")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args(argv)
    document = anyio.run(run, args)
    emit(document, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
