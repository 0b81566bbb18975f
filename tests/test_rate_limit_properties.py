"""Property tests of the rate limiter on virtual time: the window bound and FIFO order, for any workload.

Hypothesis draws a limit, a strategy-independent workload (arrival times, costs, keys, timeouts, some
cancellations) and runs it on the memory storage with virtual time, where an admission's time is exactly
the time the storage recorded. Then, per key:

* never more than N cost units admitted in any closed window of W seconds (the moving window's promise);
* grants in arrival order (FIFO), whatever the costs;
* a caller with a timeout that is not admitted gives up no later than its deadline.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelayers import RateLimiter, RateLimitExceeded, Settings
from tests.virtual_time import run_virtual


@dataclass(frozen=True)
class Arrival:
    at: float
    cost: int
    key: str
    timeout: float | None
    cancel_after: float | None


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, int, list[Arrival]]:
    amount = draw(st.integers(1, 12))
    window = draw(st.sampled_from([1, 2, 3]))
    arrivals = draw(st.lists(st.builds(
        Arrival,
        at=st.floats(0, 6, allow_nan=False).map(lambda x: round(x, 3)),
        cost=st.integers(1, amount),
        key=st.sampled_from(["a", "b"]),
        timeout=st.none() | st.floats(0, 3).map(lambda x: round(x, 3)),
        cancel_after=st.none() | st.floats(0.001, 4).map(lambda x: round(x, 3)),
    ), min_size=1, max_size=40))
    return amount, window, arrivals


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from(["asyncio", "trio"]))
def test_never_more_than_n_units_in_any_window_and_fifo_per_key(
        workload: tuple[int, int, list[Arrival]], backend: str) -> None:
    amount, window, arrivals = workload
    spec = f"{amount} per {window} seconds"
    admitted: list[tuple[str, int, float, int]] = []  # key, seq, time, cost
    late: list[float] = []  # how far past its timeout a refused caller gave up (must be 0)
    counter = itertools.count()

    async def main() -> None:
        lim = RateLimiter(Settings(limits={"l": spec}), storage="memory://", clock=anyio.current_time)
        t0 = anyio.current_time()

        async def client(a: Arrival) -> None:
            await anyio.sleep(a.at)
            with anyio.move_on_after(a.cancel_after if a.cancel_after is not None else float("inf")):
                seq = next(counter)
                start = anyio.current_time()
                try:
                    await lim.acquire("l", cost=a.cost, key=a.key, timeout=a.timeout)
                except RateLimitExceeded:
                    assert a.timeout is not None
                    late.append(max(0.0, anyio.current_time() - start - a.timeout))
                    return
                admitted.append((a.key, seq, anyio.current_time() - t0, a.cost))

        async with anyio.create_task_group() as tg:
            for a in arrivals:
                tg.start_soon(client, a)

    run_virtual(backend, main)
    assert all(x < 1e-9 for x in late), late
    for key in ("a", "b"):
        mine = [(seq, at, cost) for k, seq, at, cost in admitted if k == key]
        assert [seq for seq, _, _ in mine] == sorted(seq for seq, _, _ in mine), "out-of-order grant"
        for _, start, _ in mine:
            in_window = sum(cost for _, at, cost in mine if start <= at <= start + window)
            assert in_window <= amount, (key, start, in_window, amount, window)
