"""One process of the multi-process rate-limit tests (``python -m tests.rate_limit_worker '<json>'``).

Modes:

* ``saturate``: prints ``ready`` once connected and reads ``{"start_at": …, "stop_at": …}`` (wall clock)
  from stdin; from ``start_at`` to ``stop_at``, ``tasks`` tasks call a function limited by ``limit`` over
  Redis as fast as they are admitted. Every admission is recorded twice: around the storage
  call that granted it (``before``/``after`` the moving-window hit: the time limits stored lies between) and
  around the decorated call (``called`` before it, ``started`` when its body began). At ``stop_at`` the
  waiters are cancelled. Prints one JSON object: ``grants``, ``calls``, ``info`` (the engine's counters).
* ``fairness``: like ``saturate`` (``limit``, ``tasks``, ``strategy``), but every grant is recorded as the
  storage saw it: the server's time of the granting script (Redis ``TIME``) and the window it counted in
  (see `Grant`). Prints ``{"grants": [[at, window, before, after], ...], "source": ...}``.
* ``probe``: prints ``ready`` once connected, waits for a line on stdin, then makes one call of the limited
  function and prints the wall-clock time its body began.

`run_fairness` runs ``fairness`` workers and `analyse` checks their grants; `tests/test_rate_limit_fairness.py`
and ``benchmarks/bench_fairness.py`` use both.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
from limits.aio.storage import RedisStorage

from cachelayers import RateLimiter, Settings, rate_limited
from cachelayers.backends.limits_storage import LIMITS_KEY_SUFFIX, limits_storage_url


class RecordingRedisStorage(RedisStorage):
    """limits' Redis storage noting when each grant made through limits' own scripts was sent and answered.

    ``grants`` holds ``[at, window, before, after]``: ``before``/``after`` bracket the storage call on this
    process's clock (``at`` is their middle, ``window`` is unknown: 0). Grants made by the engine's fair
    scripts are recorded by `record_fair_grants` instead, with the server's time.
    """

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        self.grants: list[list[float]] = []
        self.limit = 0

    def _note(self, before: float) -> None:
        after = time.time()
        self.grants.append([(before + after) / 2, 0.0, before, after])

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        before = time.time()
        ok = await super().acquire_entry(key, limit, expiry, amount)
        if ok and amount > 0:
            self._note(before)
        return bool(ok)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        before = time.time()
        value = await super().incr(key, expiry, amount)
        if amount > 0 and value <= self.limit:
            self._note(before)
        return value

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        before = time.time()
        ok = await super().acquire_sliding_window_entry(key, limit, expiry, amount)
        if ok and amount > 0:
            self._note(before)
        return bool(ok)


def record_fair_grants(grants: list[list[float]]) -> str:
    """Record the grants of the engine's fair Redis scripts in ``grants``; return where times come from.

    Each grant is ``[at, window, before, after]``: ``at`` the server's time (Redis ``TIME`` inside the
    granting script), ``window`` the end of the fixed window or counter bucket it was counted in (server
    time; 0 for the moving window), ``before``/``after`` this process's clock around the call. On code without
    the fair scripts, nothing is patched and ``"client"`` is returned (`RecordingRedisStorage` records).
    """
    try:
        from cachelayers.backends import limits_fair
    except ImportError:
        return "client"
    original = limits_fair.RedisFairLine.grant

    async def grant(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = time.time()
        result = await original(self, *args, **kwargs)
        if result.granted:
            grants.append([result.at, result.window, before, time.time()])
        return result

    limits_fair.RedisFairLine.grant = grant  # type: ignore[method-assign]
    return "server"


def recording_storage(url: str) -> RecordingRedisStorage:
    mapped, options = limits_storage_url(url)
    return RecordingRedisStorage(mapped, implementation="redispy", key_prefix=f"cl:{LIMITS_KEY_SUFFIX}", **options)


async def saturate(args: dict[str, Any]) -> dict[str, Any]:
    storage = recording_storage(args["url"])
    fair: list[list[float]] = []
    record_fair_grants(fair)
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
    grants = [(before, after) for _, _, before, after in storage.grants + fair]
    return {"grants": grants, "calls": calls, "info": info}


async def fairness(args: dict[str, Any]) -> dict[str, Any]:
    storage = recording_storage(args["url"])
    fair: list[list[float]] = []
    source = record_fair_grants(fair)
    name = args["name"]
    limiter = RateLimiter(Settings(limits={name: args["limit"]}), storage=storage, strategy=args["strategy"])
    storage.limit = limiter.resolve(name).amount

    @rate_limited(name, limiter=limiter)
    async def call() -> None:
        pass

    async def client() -> None:
        while True:
            await call()

    await storage.check()
    print("ready", flush=True)
    args.update(json.loads(await anyio.to_thread.run_sync(sys.stdin.readline)))
    await anyio.sleep(max(0.0, args["start_at"] - time.time()))
    with anyio.move_on_after(args["stop_at"] - time.time()):
        async with anyio.create_task_group() as tg:
            for _ in range(args["tasks"]):
                tg.start_soon(client)
    info = limiter.info()._asdict()
    await storage.bridge.get_connection().aclose()  # type: ignore[attr-defined]
    return {"grants": storage.grants + fair, "source": source, "info": info}


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


# -- running and checking fairness across processes ----------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
STARVED: Final = 0.15
"""A process with less than this share of the admissions is starved."""


@dataclass
class Fairness:
    """What one multi-process run gave: admissions per process and the fullest window.

    Attributes:
        counts: Admissions per process.
        max_in_window: The most admissions counted in one window of the limit, by the strategy's own notion of
            a window, from the times the storage recorded (the fixed window and the counter's buckets by the
            window the granting script counted the grant in; the moving window by server times in any closed
            interval of the window's length). From the client's clock (bracketing each call, counting only
            admissions whose whole bracket fits) when the code has no fair scripts; ``None`` for the counters
            then (their windows are not known).
        source: ``"server"`` (Redis ``TIME`` in the granting script) or ``"client"``.
    """

    counts: list[int]
    max_in_window: int | None
    source: str

    @property
    def shares(self) -> list[float]:
        """Each process's share of the admissions."""
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]

    @property
    def starved(self) -> bool:
        """Whether some process got less than `STARVED` of the admissions."""
        return min(self.shares) < STARVED


def max_in_window(grants: list[list[float]], strategy: str, window: float, source: str) -> int | None:
    """The fullest window among ``grants`` (``[at, window, before, after]``, see `record_fair_grants`)."""
    if not grants:
        return 0
    if source == "client":
        if strategy != "moving-window":
            return None
        spans = sorted((g[2], g[3]) for g in grants)
        return max(sum(1 for b, a in spans if b >= start and a <= start + window) for start, _ in spans)
    if strategy == "moving-window":
        times = sorted(g[0] for g in grants)
        best, low = 0, 0
        for high, t in enumerate(times):  # closed interval [times[low], t] no longer than the window
            while t - times[low] > window:
                low += 1
            best = max(best, high - low + 1)
        return best
    ends = sorted(g[1] for g in grants)  # the window each grant was counted in, by its end (ms precision)
    best, run = 1, 1
    for previous, end in itertools.pairwise(ends):
        run = run + 1 if end - previous < 0.05 else 1  # windows are at least a second apart
        best = max(best, run)
    return best


def run_fairness(url: str, strategy: str, *, limit: str = "20/second", window: float = 1.0, seconds: float = 3.0,
                 processes: int = 4, tasks: int = 20, name: str = "fair") -> Fairness:
    """Run ``processes`` workers of ``tasks`` tasks each on one Redis limit for ``seconds``; collect the grants.

    Raises:
        RuntimeError: A worker failed.
    """
    args = {"mode": "fairness", "url": url, "limit": limit, "tasks": tasks, "strategy": strategy, "name": name}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.rate_limit_worker", json.dumps(args)], cwd=ROOT,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(processes)]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"worker not ready: {line!r} {p.stderr.read() if p.stderr else ''}")
        start_at = time.time() + 0.3
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"start_at": start_at, "stop_at": start_at + seconds}) + "\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60 + seconds) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("; ".join(err[-2000:] for _, err in outputs))
    results = [json.loads(out) for out, _ in outputs]
    source = results[0]["source"]
    grants = [g for r in results for g in r["grants"]]
    return Fairness([len(r["grants"]) for r in results], max_in_window(grants, strategy, window, source), source)


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["mode"] == "saturate":
        print(json.dumps(anyio.run(saturate, args)), flush=True)
    elif args["mode"] == "fairness":
        print(json.dumps(anyio.run(fairness, args)), flush=True)
    else:
        anyio.run(probe, args)


if __name__ == "__main__":
    main()
