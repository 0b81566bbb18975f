"""The disk tier under 1,000 concurrent callers: does it keep up, or time out on its own contention?

Scenarios, each with 1,000 callers started at once (``anyio`` task group) on a fresh directory, the engine's
default ``tier_timeout`` (250 ms):

* **memory+disk miss** / **memory+disk hit**: ``@multilevel_cached`` with
  ``Settings(tiers={"memory": "memory://", "disk": "disk://..."})`` on ``async def f(x: int) -> dict`` (a
  ~1 KB value), 1,000 distinct keys: first all missing (each caller reads the disk, computes and writes), then
  the same keys from a new engine on the same directory (empty memory tier: every value must come from disk).
* **disk miss** / **disk hit**: the same with the disk as the only tier.
* **backend mix**: 1,000 callers on `DiskBackend` directly, each doing 5 operations (70 % ``get_many`` of 1-3
  keys, 30 % ``set_many`` of 1-3 entries), each bounded by 250 ms as the engine bounds a tier call
  (``DiskBackend.within``).
* **4 processes**: ``--processes`` processes (4) on one directory with ``max_bytes=1MiB`` (so the log is
  checkpointed often), 8 tasks each writing (``set_many`` of 1-3 entries of 100-4,000 bytes, 50 %) and reading
  (``get_many``) random keys as fast as they can for ``--process-seconds`` (5), every operation bounded like the
  backend mix (the workload of ``tests/disk_worker.py churn``, which the multi-process tests run). Calls =
  operations of all processes; landed = operations that returned / operations.

Reported per scenario (median over ``--rounds``): wall time and calls per second; **failures** = the disk
tier's timeouts + errors + skipped calls (skipped: its circuit breaker was open after failures; for the
backend mix, operations that timed out or raised); **landed** = entries in the database afterwards (misses)
or calls answered by the disk (hits); for the backend mix, entries in the database / distinct keys whose
``set_many`` returned (a timed-out write may land too).

``--before SRC`` runs the same benchmark again in a subprocess with ``PYTHONPATH=SRC`` (an older checkout's
``src``) and prints both tables. Run ``python benchmarks/bench_disk.py`` (``--json`` for the raw results).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from _util import environment, environment_line, render_table
from cachelayers import Settings, StoreItem, TieredCache, multilevel_cached
from cachelayers.backends.disk import DiskBackend

CALLERS = 1000
PAD = "v" * 1000
OPS_PER_CALLER = 5
OP_TIMEOUT = 0.25
ROOT = Path(__file__).resolve().parent.parent  # the processes run the multi-process tests' worker from here


def value_of(x: int) -> dict[str, Any]:
    return {"x": x, "pad": PAD}


async def run_callers(call: Callable[[int], Awaitable[object]]) -> tuple[float, int]:
    """Start every caller at once; return the wall time and how many raised."""
    raised = 0

    async def one(i: int) -> None:
        nonlocal raised
        try:
            await call(i)
        except Exception:
            raised += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(CALLERS):
            tg.start_soon(one, i)
    return time.perf_counter() - started, raised


async def entries_in(directory: Path) -> int:
    disk = DiskBackend(f"disk://{directory}")
    entries, _ = await disk.usage()
    await disk.aclose()
    return entries


def tier_failures(stats: dict[str, Any]) -> int:
    return int(stats.get("timeouts", 0) + stats.get("errors", 0) + stats.get("skipped", 0))


async def engine_rounds(directory: Path, with_memory: bool, name: str) -> list[dict[str, Any]]:
    """A miss round and a hit round through ``@multilevel_cached``."""
    tiers = {"memory": "memory://"} if with_memory else {}
    tiers["disk"] = f"disk://{directory}"
    computed = 0
    results = []
    for phase in ("miss", "hit"):
        cache = TieredCache(Settings(tiers=tiers))

        @multilevel_cached(cache=cache, name=name, ttl=3600)
        async def f(x: int) -> dict[str, Any]:
            nonlocal computed
            computed += 1
            return value_of(x)

        async def call(x: int, f: Callable[[int], Awaitable[dict[str, Any]]] = f) -> None:
            if await f(x) != value_of(x):
                raise AssertionError(f"wrong value for {x}")

        before = computed
        seconds, raised = await run_callers(call)
        stats = cache.tier_stats()["disk"]
        await cache.aclose()
        landed = await entries_in(directory) if phase == "miss" else int(stats.get("hits", 0))
        results.append({"scenario": f"{'memory+disk' if with_memory else 'disk'} {phase}", "seconds": seconds,
                        "failures": tier_failures(stats) + raised, "landed": landed,
                        "computed": computed - before, "calls": CALLERS})
    return results


async def backend_mix(directory: Path, seed: int) -> dict[str, Any]:
    """1,000 callers on the backend itself, every operation bounded by the tier timeout."""
    disk = DiskBackend(f"disk://{directory}")
    # As the engine bounds a tier call (`Backend.within`); a checkout from before that hook: the wall clock.
    bound = getattr(disk, "within", anyio.fail_after)
    rng = random.Random(seed)
    failures = 0
    written: set[str] = set()

    async def call(i: int) -> None:
        nonlocal failures
        for n in range(OPS_PER_CALLER):
            keys = [f"k{rng.randrange(3 * CALLERS)}" for _ in range(rng.randint(1, 3))]
            try:
                with bound(OP_TIMEOUT):
                    if rng.random() < 0.7:
                        await disk.get_many(keys)
                    else:
                        await disk.set_many([StoreItem(k, PAD.encode(), None, (f"t{i % 7}",)) for k in keys])
                        written.update(keys)
            except Exception:
                failures += 1
            del n

    seconds, raised = await run_callers(call)
    await disk.aclose()
    landed = await entries_in(directory)
    return {"scenario": "backend mix", "seconds": seconds, "failures": failures + raised, "landed": landed,
            "computed": 0, "calls": CALLERS * OPS_PER_CALLER, "wanted": len(written)}


def processes(directory: Path, count: int, seconds: float) -> dict[str, Any]:
    """The **4 processes** scenario: ``count`` worker processes started together on ``directory``."""
    start_at = time.time() + 2  # time for every interpreter to start
    options = {"dir": str(directory), "max_bytes": 1024**2, "seconds": seconds, "start_at": start_at,
               "bound": OP_TIMEOUT}
    command = [sys.executable, "-m", "tests.disk_worker", "churn"]
    workers = [subprocess.Popen([*command, json.dumps({**options, "seed": i})], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True) for i in range(count)]
    reports = [json.loads(worker.communicate()[0].strip().splitlines()[-1]) for worker in workers]
    ops = sum(r["ops"] for r in reports)
    failures = sum(r["failures"] for r in reports)
    return {"scenario": f"{count} processes", "seconds": seconds, "failures": failures, "landed": ops - failures,
            "computed": 0, "calls": ops, "wanted": ops}


async def run(rounds: int, process_count: int, process_seconds: float) -> dict[str, Any]:
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as tmp:
        for round_ in range(rounds):
            found = [*await engine_rounds(Path(tmp, f"md{round_}"), True, f"md{round_}"),
                     *await engine_rounds(Path(tmp, f"d{round_}"), False, f"d{round_}"),
                     await backend_mix(Path(tmp, f"mix{round_}"), round_)]
            if process_count:
                found.append(await anyio.to_thread.run_sync(processes, Path(tmp, f"p{round_}"), process_count,
                                                            process_seconds))
            for result in found:
                by_scenario.setdefault(result["scenario"], []).append(result)
    return {"environment": environment(["cachelayers", "anyio"]), "rounds": rounds,
            "source": str(Path(sys.modules["cachelayers"].__file__ or "").parent), "scenarios": by_scenario}


def summary_rows(document: dict[str, Any]) -> list[list[str]]:
    rows = []
    for scenario, results in document["scenarios"].items():
        seconds = statistics.median(r["seconds"] for r in results)
        calls = round(statistics.median(r["calls"] for r in results))
        failures = [r["failures"] for r in results]
        # landed / wanted of the median round by landed (for the backend mix, each round wants other keys)
        landed = sorted(results, key=lambda r: r["landed"])[len(results) // 2]
        rows.append([scenario, f"{calls:,}", f"{seconds:.2f}", f"{calls / seconds:,.0f}",
                     f"{statistics.median(failures):,.0f} ({min(failures):,}-{max(failures):,})",
                     f"{landed['landed']:,} / {landed.get('wanted', CALLERS):,}"])
    return rows


HEADERS = ["scenario", "calls", "wall s", "calls/s", "failures (min-max)", "landed"]


def render(document: dict[str, Any], title: str) -> str:
    return "\n".join([f"{title}: {document['source']} (median of {document['rounds']} rounds)",
                      render_table(HEADERS, summary_rows(document))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    parser.add_argument("--before", type=Path, default=None,
                        help="an older checkout's src directory, measured first in a subprocess")
    parser.add_argument("--processes", type=int, default=4, help="processes of the last scenario (0: skip it)")
    parser.add_argument("--process-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    before = None
    if args.before is not None:
        env = {**os.environ, "PYTHONPATH": str(args.before)}
        out = subprocess.run([sys.executable, __file__, "--json", "--rounds", str(args.rounds), "--processes",
                              str(args.processes), "--process-seconds", str(args.process_seconds)], env=env,
                             check=True, capture_output=True, text=True).stdout
        before = json.loads(out)
    document = anyio.run(run, args.rounds, args.processes, args.process_seconds)
    if args.json:
        print(json.dumps(document, indent=1))
        return 0
    print(environment_line(document["environment"]))
    print(f"{CALLERS:,} concurrent callers, tier_timeout 250 ms; failures = disk-tier timeouts + errors + skipped; "
          "calls/s counts every call, also those whose disk call failed (they return sooner)")
    if before is not None:
        print(render(before, "before"))
        print()
    print(render(document, "after" if before is not None else "this checkout"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
