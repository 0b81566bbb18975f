"""Rate limiting: the cost of an uncontended acquisition, and storage calls per admission under contention.

Contenders, all in this process and run:

**Uncontended acquire** (a limit so large nothing waits), interleaved in random order each round:

* **limits hit()**: limits' own ``MovingWindowRateLimiter.hit(item, key)``: the floor, since cachelayers
  calls exactly this once per acquisition (same storage object, same strategy, same limit);
* **cachelayers acquire**: the engine's acquisition as ``@rate_limited`` runs it (queue lookup, FIFO and
  pause checks, the hit);
* **cachelayers acquire()**: the public ``RateLimiter.acquire(...)`` (resolves the limit by name, makes a
  ``Permit``);
* **aiolimiter**: ``AsyncLimiter.acquire()`` (a leaky bucket in process memory, no storage at all).

on the memory storage, and on Redis when a ``redis-server`` can be started (or ``--redis URL`` is given).
The target: cachelayers acquire at most limits' hit() + 1 us.

**Public path: @rate_limited vs limits.hit, 1,000 keys** (acceptance of issue 10): ``await f(key)`` through the
decorator (an ``async def`` with ``key=``, memory storage) against limits' own ``await hit(item, key)`` on
limits' ``MemoryStorage``, cycling over 1,000 keys, for the moving and the fixed window, in many short
interleaved rounds. The target: at most +1 us (the median of the per-round differences).

**Contention**: ``--tasks`` tasks call as fast as they are admitted under one ``--limit`` for ``--seconds``;
storage calls per admission, counted by the engine (the window's own calls, and with the reads of the
pause flags shared by processes). The peer is what limits offers without a waiting engine: retry ``hit()``
after a short sleep (a polling loop, every 10 ms). On memory, on Redis in one process, and on Redis from
``--processes`` processes. The target: at most 1.2 window calls per admission.

Run ``python benchmarks/bench_limiter.py`` (``--json`` for machine-readable output, ``--check`` to exit 1 when
a target is missed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiolimiter import AsyncLimiter
from limits import parse
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from _util import (
    RedisServer,
    Series,
    environment,
    floor_row,
    gc_paused,
    interleaved,
    make_parser,
    render_table,
    time_async,
    to_json,
)
from cachelayers import RateLimiter, Settings, rate_limited
from cachelayers.backends.limits_storage import create_limits_storage

ACQUIRE_TARGET_NS = 1_000.0  # acceptance: our acquisition at most limits' hit() + 1 us ...
CALLS_TARGET = 1.2  # ... and at most 1.2 of the window's storage calls per admission under contention
HUGE = "1000000000 per 1 second"
PACKAGES = ("cachelayers", "limits", "aiolimiter", "redis")

Op = Callable[[], Awaitable[object]]


@dataclass
class Contender:
    name: str
    op: Op
    floor: bool = False
    series: Series = field(default_factory=Series)


async def uncontended(storage: Storage, rounds: int, budget_ms: float, with_aiolimiter: bool) -> list[Contender]:
    """Interleaved rounds of the uncontended contenders on ``storage``."""
    strategy = MovingWindowRateLimiter(storage)
    item = parse(HUGE)
    engine = RateLimiter(Settings(limits={"huge": HUGE}), storage=storage)
    resolved, engine_strategy = engine._limits(["huge"], None)
    queue = engine._queue(resolved, "key", engine_strategy)
    costs = (1,)
    await engine.acquire("huge", key="key")  # binds the storage and the strategy

    async def limits_hit() -> object:
        return await strategy.hit(item, "key")

    async def ours() -> object:
        return await engine._acquire(queue, costs, None)

    async def ours_public() -> object:
        return await engine.acquire("huge", key="key")

    contenders = [Contender("limits hit() (floor)", limits_hit, floor=True),
                  Contender("cachelayers acquire", ours), Contender("cachelayers acquire()", ours_public)]
    if with_aiolimiter:
        bucket = AsyncLimiter(1e12, 1)

        async def aiolimiter() -> object:
            await bucket.acquire()
            return None

        contenders.append(Contender("aiolimiter acquire()", aiolimiter))
    sizes: dict[str, int] = {}
    for c in contenders:  # calibrate: about budget_ms per measurement
        per = await time_async(c.op, 20)
        sizes[c.name] = max(20, int(budget_ms * 1e6 / max(per, 1.0)))
    rng = random.Random(1)
    for order in interleaved(contenders, rounds, rng):
        for c in order:
            c.series.samples.append(await time_async(c.op, sizes[c.name]))
    return contenders


def uncontended_rows(contenders: list[Contender]) -> list[list[str]]:
    floor = next(c for c in contenders if c.floor)
    return [floor_row(c.name, c.series, floor.series) for c in contenders]


async def contention(storage_url: str | Storage, limit: str, tasks: int, seconds: float) -> dict[str, float]:
    """Storage calls per admission for ``tasks`` tasks saturating ``limit`` in this process."""
    engine = RateLimiter(Settings(limits={"l": limit}), storage=storage_url)

    @rate_limited("l", limiter=engine)
    async def call() -> None:
        return None

    async def client() -> None:
        while True:
            await call()

    async def run() -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(tasks):
                tg.create_task(client())

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run(), seconds)
    info = engine.info()
    await engine.aclose()
    return {"admitted": info.admitted, "window": info.window_calls_per_admission, "all": info.calls_per_admission}


async def polling(storage: Storage, limit: str, tasks: int, seconds: float, interval: float = 0.01) -> dict[str, float]:
    """What limits alone offers: each caller retries ``hit()`` every ``interval`` until admitted."""
    strategy = MovingWindowRateLimiter(storage)
    item = parse(limit)
    counts = {"admitted": 0, "calls": 0}
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            counts["calls"] += 1
            if await strategy.hit(item, "poll"):
                counts["admitted"] += 1
            else:
                await asyncio.sleep(interval)

    async with asyncio.TaskGroup() as tg:
        for _ in range(tasks):
            tg.create_task(client())
    return {"admitted": counts["admitted"], "window": counts["calls"] / max(1, counts["admitted"]),
            "all": counts["calls"] / max(1, counts["admitted"])}


def processes(url: str, limit: str, count: int, tasks: int, seconds: float) -> dict[str, float]:
    """Storage calls per admission with ``count`` processes of ``tasks`` tasks each on one Redis limit."""
    args = json.dumps({"url": url, "limit": limit, "tasks": tasks, "seconds": seconds})
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", args], text=True, stdout=subprocess.PIPE)
             for _ in range(count)]
    infos = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    admitted = sum(i["admitted"] for i in infos)
    calls = sum(i["storage_calls"] for i in infos)
    reads = sum(i["pause_reads"] for i in infos)
    return {"admitted": admitted, "window": (calls - reads) / max(1, admitted), "all": calls / max(1, admitted)}


def worker(raw: str) -> None:
    args = json.loads(raw)

    async def main() -> dict[str, Any]:
        engine = RateLimiter(Settings(limits={"l": args["limit"]}), storage=args["url"])

        @rate_limited("l", limiter=engine)
        async def call() -> None:
            return None

        async def client() -> None:
            while True:
                await call()

        async def run() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(args["tasks"]):
                    tg.create_task(client())

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run(), args["seconds"])
        info = engine.info()._asdict()
        await engine.aclose()
        return info

    print(json.dumps(asyncio.run(main())))


# -- public path: @rate_limited vs limits.hit, 1,000 keys ------------------------------------------------------

PUBLIC_KEYS = 1_000
PUBLIC_TARGET_US = 1.0  # acceptance of issue 10: the decorator at most limits' hit() + 1 us
PUBLIC_FLOORS: dict[str, Any] = {"moving-window": MovingWindowRateLimiter, "fixed-window": FixedWindowRateLimiter}


async def public_path(strategy: str, rounds: int, budget_ms: float) -> tuple[list[float], list[float]]:
    """ns per call, per interleaved round: ``(limits hit(), @rate_limited)``, cycling over 1,000 keys.

    The floor is limits' own async strategy on limits' ``MemoryStorage``: ``await hit(item, key)``. Ours is
    the public decorator on an ``async def`` with ``key=`` and memory storage: ``await call(key)``.
    """
    from limits.aio.storage import MemoryStorage

    hit = PUBLIC_FLOORS[strategy](MemoryStorage()).hit
    item = parse(HUGE)
    keys = [f"tenant-{i}" for i in range(PUBLIC_KEYS)]

    @rate_limited(HUGE, key=lambda tenant: tenant, storage="memory://", strategy=strategy)
    async def call(tenant: str) -> None:
        return None

    # Two loops written out rather than one taking a callable: a wrapper call per key would add a frame to
    # both sides of a comparison at the microsecond.
    async def floor(n: int) -> float:
        with gc_paused():
            start = time.perf_counter_ns()
            for _ in range(n):
                for key in keys:
                    await hit(item, key)
            return (time.perf_counter_ns() - start) / (n * len(keys))

    async def ours(n: int) -> float:
        with gc_paused():
            start = time.perf_counter_ns()
            for _ in range(n):
                for key in keys:
                    await call(key)
            return (time.perf_counter_ns() - start) / (n * len(keys))

    await floor(1)
    await ours(1)  # binds the engine, makes the 1,000 queues
    passes = max(1, int(budget_ms * 1e6 / (await floor(1) * len(keys))))  # a short round: fine interleaving
    samples: tuple[list[float], list[float]] = ([], [])
    rng = random.Random(2)
    for _ in range(rounds):
        order = [0, 1]
        rng.shuffle(order)
        for side in order:
            samples[side].append(await (floor, ours)[side](passes))
    return samples


async def public_path_section(rounds: int, budget_ms: float) -> tuple[dict[str, Any], list[str]]:
    """Run and print the public-path comparison for both strategies; return the samples and missed targets."""
    rows, lines, result, problems = [], [], {}, []
    for strategy in PUBLIC_FLOORS:
        base, mine = await public_path(strategy, rounds, budget_ms)  # many short rounds: noise cancels better
        diffs = [m - b for m, b in zip(mine, base, strict=True)]
        result[strategy] = {"limits hit()": base, "@rate_limited": mine}
        for name, series in (("limits hit()", base), ("@rate_limited", mine)):
            rows.append([f"{strategy}: {name}", f"{min(series) / 1000:.2f}", f"{statistics.median(series) / 1000:.2f}",
                         ""])
        median_diff = statistics.median(diffs) / 1000
        rows[-1][3] = f"{median_diff:+.2f} (best {(min(mine) - min(base)) / 1000:+.2f})"
        ok = median_diff <= PUBLIC_TARGET_US
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {strategy}: @rate_limited - limits hit() = {median_diff:+.2f} us "
                     f"(median of per-round differences; target <= +{PUBLIC_TARGET_US:g} us)")
        if not ok:
            problems.append(f"public path, {strategy}: +{median_diff:.2f} us over limits' hit() "
                            f"(target {PUBLIC_TARGET_US:g})")
    print(f"\nPublic path: @rate_limited vs limits.hit, 1,000 keys (us per call; memory storage; {rounds} "
          f"interleaved rounds)")
    print(render_table(["contender", "best", "median", "- limits (us)"], rows))
    print("\n".join(lines))
    return result, problems


async def main(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"environment": environment(PACKAGES), "uncontended": {}, "contention": {}}
    result["public_path"], problems = await public_path_section(args.rounds * 8, args.budget_ms / 8)
    if args.public_path_only:
        return 1 if problems and args.check else 0
    server = RedisServer("bench-limiter-").start() if args.redis is None and RedisServer.installed() else None
    redis_url = args.redis or (server.url if server else None)
    try:
        stores: list[tuple[str, Storage]] = [("memory", create_limits_storage("memory://"))]
        if redis_url:
            stores.append(("redis", create_limits_storage(redis_url, key_prefix="bench:")))
        tables = []
        for name, storage in stores:
            rounds = args.rounds if name == "memory" else max(3, args.rounds // 2)
            contenders = await uncontended(storage, rounds, args.budget_ms, with_aiolimiter=name == "memory")
            rows = uncontended_rows(contenders)
            tables.append((name, rows))
            result["uncontended"][name] = {c.name: c.series.samples for c in contenders}
            diff = float(rows[1][4]) * 1000
            if diff > ACQUIRE_TARGET_NS:
                problems.append(f"{name}: cachelayers acquire costs {diff:.0f} ns more than limits' hit() "
                                f"(target {ACQUIRE_TARGET_NS:.0f})")
        for name, rows in tables:
            print(f"\nUncontended acquisition, {name} storage, moving window (us per acquisition; "
                  f"{args.rounds if name == 'memory' else max(3, args.rounds // 2)} interleaved rounds)")
            print(render_table(["contender", "best", "median", "x limits", "- limits (us)"], rows))

        rows = []
        plan: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
            ("cachelayers, memory, 1 process", lambda: contention("memory://", args.limit, args.tasks, args.seconds)),
            ("limits hit() polling every 10 ms, memory",
             lambda: polling(create_limits_storage("memory://"), args.limit, args.tasks, args.seconds)),
        ]
        if redis_url:
            url = redis_url
            plan += [
                ("cachelayers, Redis, 1 process", lambda: contention(url, args.limit, args.tasks, args.seconds)),
                ("limits hit() polling every 10 ms, Redis",
                 lambda: polling(create_limits_storage(url, key_prefix="bench-poll:"), args.limit, args.tasks,
                                 args.seconds)),
            ]
        for label, run in plan:
            figures = await run()
            result["contention"][label] = figures
            rows.append([label, f"{figures['admitted']:.0f}", f"{figures['window']:.3f}", f"{figures['all']:.3f}"])
            if label.startswith("cachelayers") and figures["window"] > CALLS_TARGET:
                problems.append(f"{label}: {figures['window']:.2f} storage calls per admission (target "
                                f"{CALLS_TARGET})")
        if redis_url:
            label = f"cachelayers, Redis, {args.processes} processes x {args.tasks // args.processes} tasks"
            figures = processes(redis_url, args.limit, args.processes, args.tasks // args.processes, args.seconds)
            result["contention"][label] = figures
            rows.append([label, f"{figures['admitted']:.0f}", f"{figures['window']:.3f}", f"{figures['all']:.3f}"])
        print(f"\nContention: {args.tasks} tasks on '{args.limit}' for {args.seconds:g}s "
              f"(storage calls per admission)")
        print(render_table(["contender", "admitted", "window calls", "with pause reads"], rows))
    finally:
        if server is not None:
            server.stop()
    if problems:
        print("\nTargets missed:\n  " + "\n  ".join(problems))
    if args.json:
        print(to_json({**result, "problems": problems}))
    return 1 if problems and args.check else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--budget-ms", type=float, default=40.0, help="time per measurement (default 40 ms)")
    parser.add_argument("--redis", default=None, help="Redis URL (default: start a redis-server if installed)")
    parser.add_argument("--limit", default="50 per 1 second", help="the contended limit (default 50 per 1 second)")
    parser.add_argument("--tasks", type=int, default=100, help="contending tasks (default 100)")
    parser.add_argument("--processes", type=int, default=4, help="processes in the multi-process run (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each contention run (default 3)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--public-path-only", action="store_true", help="run only the public-path comparison")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
