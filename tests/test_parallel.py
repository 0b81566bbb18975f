"""The parallel helpers: `gather_bounded` (limit, overall timeout, per-job outcomes) and `with_fallbacks`.

Every test runs on asyncio and trio with virtual time (`tests.virtual_time`), so timeouts are exact and free.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, assert_type

import anyio
import pytest
import trio

from cachelayers import AllAttemptsFailedError, ConfigError, Outcome, gather_bounded, with_fallbacks
from tests.virtual_time import VIRTUAL_BACKENDS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=VIRTUAL_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio and trio, both on virtual time."""
    return request.param


def _backend(anyio_backend: Any) -> str:
    return str(anyio_backend[0])


class Jobs:
    """Jobs that sleep, return or raise, and record when they start, finish and clean up."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.cleaned: list[int] = []

    async def job(self, n: int, seconds: float = 0.0, error: Exception | None = None) -> int:
        self.started.append(n)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(seconds)
            if error is not None:
                raise error
            return n * 10
        finally:
            self.running -= 1
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.001)  # an asynchronous clean-up, which must finish before gather returns
            self.cleaned.append(n)


# -- gather_bounded -----------------------------------------------------------------------------------------


async def test_outcomes_come_in_order_and_one_failure_disturbs_no_other() -> None:
    jobs = Jobs()
    boom = ValueError("job 1 failed")
    work: list[Coroutine[Any, Any, int] | Callable[[], Awaitable[int]]] = [
        jobs.job(0, 0.3),
        jobs.job(1, 0.1, boom),
        functools.partial(jobs.job, 2, 0.2),  # a callable without arguments works too
    ]
    outcomes = await gather_bounded(work)
    assert_type(outcomes, list[Outcome[int]])
    assert [o.value for o in outcomes] == [0, None, 20]
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error is boom
    assert not any(o.timed_out for o in outcomes)
    assert outcomes[0].unwrap() == 0
    with pytest.raises(ValueError, match="job 1 failed"):
        outcomes[1].unwrap()


async def test_limit_bounds_the_jobs_running_at_once() -> None:
    jobs = Jobs()
    start = anyio.current_time()
    outcomes = await gather_bounded([functools.partial(jobs.job, n, 1.0) for n in range(10)], limit=3)
    assert [o.unwrap() for o in outcomes] == [n * 10 for n in range(10)]
    assert jobs.peak == 3
    assert jobs.started == list(range(10))  # in the order given
    assert anyio.current_time() - start == pytest.approx(4 * 1.001, abs=1e-6)  # ceil(10 / 3) rounds


async def test_the_overall_timeout_keeps_finished_outcomes_and_times_out_the_rest(anyio_backend: Any) -> None:
    jobs = Jobs()
    start = anyio.current_time()
    outcomes = await gather_bounded(
        [jobs.job(0, 1.0), jobs.job(1, 1.0), jobs.job(2, 5.0), jobs.job(3, 1.0)], limit=1, timeout=2.5)
    assert anyio.current_time() - start == pytest.approx(2.5 + 0.001, abs=1e-6)  # plus job 2's shielded clean-up
    assert [o.value for o in outcomes[:2]] == [0, 10]
    assert [o.timed_out for o in outcomes] == [False, False, True, True]
    assert isinstance(outcomes[2].error, TimeoutError)
    assert "was still running" in str(outcomes[2].error)
    assert "had not started" in str(outcomes[3].error)
    with pytest.raises(TimeoutError):
        outcomes[3].unwrap()
    # job 3 never started: its coroutine was closed, so no "never awaited" warning (warnings are errors here)
    assert jobs.started == [0, 1, 2]
    gc.collect()


async def test_no_task_is_left_behind_after_a_timeout(anyio_backend: Any) -> None:
    jobs = Jobs()
    if _backend(anyio_backend) == "asyncio":
        tasks_before = asyncio.all_tasks()
    else:
        living_before = trio.lowlevel.current_statistics().tasks_living
    outcomes = await gather_bounded([jobs.job(n, 10.0) for n in range(5)], timeout="1s")
    assert all(o.timed_out for o in outcomes)
    assert sorted(jobs.cleaned) == [0, 1, 2, 3, 4]  # every job's finally ran before gather returned
    assert jobs.running == 0
    if _backend(anyio_backend) == "asyncio":
        assert asyncio.all_tasks() == tasks_before
    else:
        assert trio.lowlevel.current_statistics().tasks_living == living_before


async def test_cancelling_the_caller_cancels_every_job_and_closes_unstarted_ones() -> None:
    jobs = Jobs()
    with anyio.move_on_after(0.5):
        await gather_bounded([jobs.job(n, 10.0) for n in range(6)], limit=2)
    assert jobs.started == [0, 1]
    assert sorted(jobs.cleaned) == [0, 1]
    gc.collect()  # the four unstarted coroutines were closed: no "never awaited" warning


async def test_a_job_timing_out_on_its_own_is_an_error_not_an_overall_timeout() -> None:
    async def impatient() -> int:
        with anyio.fail_after(0.1):
            await anyio.sleep(1)
        return 1

    [outcome] = await gather_bounded([impatient()], timeout=10)
    assert isinstance(outcome.error, TimeoutError)
    assert not outcome.timed_out


async def test_no_jobs_no_outcomes() -> None:
    assert await gather_bounded([]) == []


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"limit": 0}, "limit"),
    ({"limit": True}, "limit"),
    ({"timeout": "soon"}, "timeout"),
    ({"timeout": -1}, "timeout"),
])
async def test_bad_arguments_are_config_errors(kwargs: dict[str, Any], field: str) -> None:
    async def job() -> int:
        return 1

    with pytest.raises(ConfigError) as info:
        await gather_bounded([job], **kwargs)
    assert info.value.field == field


# -- with_fallbacks -----------------------------------------------------------------------------------------


class Provider:
    """An async function that takes ``seconds`` and then answers, or raises ``error``."""

    def __init__(self, name: str, seconds: float = 0.0, error: Exception | None = None) -> None:
        self.name = name
        self.seconds = seconds
        self.error = error
        self.calls: list[tuple[str, str]] = []
        self.cancelled = 0

    async def __call__(self, prompt: str, *, model: str = "m") -> str:
        self.calls.append((prompt, model))
        try:
            await anyio.sleep(self.seconds)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return f"{self.name}:{prompt}:{model}"


def _typed(provider: Provider) -> Callable[..., Awaitable[str]]:
    async def call(prompt: str, *, model: str = "m") -> str:
        return await provider(prompt, model=model)

    return call


async def test_the_primary_answers_and_the_fallbacks_are_not_called() -> None:
    primary, fallback = Provider("primary"), Provider("fallback")
    ask = with_fallbacks(primary, fallback)
    assert await ask("hi", model="big") == "primary:hi:big"
    assert fallback.calls == []


async def test_a_failing_primary_falls_back_with_the_same_arguments() -> None:
    primary, fallback = Provider("primary", error=ConnectionError("down")), Provider("fallback")
    ask = with_fallbacks(primary, fallback)
    assert await ask("hi", model="big") == "fallback:hi:big"
    assert primary.calls == fallback.calls == [("hi", "big")]


async def test_a_slow_attempt_is_cancelled_at_its_timeout_and_the_next_one_starts() -> None:
    primary, fallback = Provider("primary", seconds=10), Provider("fallback", seconds=0.5)
    ask = with_fallbacks(primary, fallback, attempt_timeout="2s")
    start = anyio.current_time()
    assert await ask("hi") == "fallback:hi:m"
    assert anyio.current_time() - start == pytest.approx(2.5)
    assert primary.cancelled == 1


async def test_when_every_attempt_fails_the_error_groups_them_in_order() -> None:
    down = ConnectionError("primary down")
    attempts = [Provider("primary", error=down), Provider("slow", seconds=5), Provider("last", error=KeyError("x"))]
    ask = with_fallbacks(*attempts, attempt_timeout=1)
    with pytest.raises(AllAttemptsFailedError) as info:
        await ask("hi")
    errors = info.value.exceptions
    assert errors[0] is down
    assert isinstance(errors[1], TimeoutError)
    assert str(errors[1]) == "Provider() did not finish within attempt_timeout=1s"
    assert isinstance(errors[2], KeyError)
    assert "all 3 attempts failed" in str(info.value)
    caught: list[BaseException] = []
    try:
        await ask("again")
    except* ConnectionError as group:  # an ExceptionGroup: except* finds the provider's error type
        caught.extend(group.exceptions)
    except* (TimeoutError, KeyError) as group:
        caught.extend(group.exceptions)
    assert caught[0] is down
    assert len(caught) == 3


async def test_an_error_outside_fallback_on_propagates_at_once() -> None:
    primary = Provider("primary", error=ValueError("bad prompt"))
    fallback = Provider("fallback")
    ask = with_fallbacks(primary, fallback, fallback_on=(ConnectionError, TimeoutError))
    with pytest.raises(ValueError, match="bad prompt"):
        await ask("hi")
    assert fallback.calls == []


async def test_the_overall_timeout_bounds_the_whole_chain() -> None:
    primary, second, third = Provider("primary", seconds=2), Provider("second", seconds=10), Provider("third")
    primary.error = ConnectionError("down")
    ask = with_fallbacks(primary, second, third, attempt_timeout=5, timeout=3)
    start = anyio.current_time()
    with pytest.raises(AllAttemptsFailedError) as info:
        await ask("hi")
    assert anyio.current_time() - start == pytest.approx(3)
    assert "within timeout=3s (2 of 3 tried)" in str(info.value)
    assert third.calls == []
    assert second.cancelled == 1
    assert [type(e) for e in info.value.exceptions] == [ConnectionError, TimeoutError]


async def test_the_chain_keeps_the_primary_signature_and_name() -> None:
    async def primary(prompt: str, *, model: str = "m") -> str:
        return f"primary:{prompt}"

    async def local(prompt: str, *, model: str = "m") -> str:
        return f"local:{prompt}"

    ask = with_fallbacks(primary, local)
    assert_type(await ask("x", model="y"), str)
    assert ask.__name__ == "primary"
    assert ask.__wrapped__ is primary  # type: ignore[attr-defined]
    assert await _typed(Provider("p"))("z") == "p:z:m"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"attempt_timeout": "fast"}, "attempt_timeout"),
    ({"timeout": 0}, "timeout"),
])
async def test_bad_fallback_settings_are_config_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_fallbacks(Provider("p"), **kwargs)
    assert info.value.field == field


async def test_a_non_callable_fallback_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        with_fallbacks(Provider("p"), "not a function")  # type: ignore[arg-type]
    assert info.value.field == "fallbacks[0]"


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_job_cancelled_by_other_code_is_its_own_outcome(timeout: float | None) -> None:
    """A job that awaited a task cancelled elsewhere ends in CancelledError: that is its outcome, and the others
    keep theirs (it crashed the gather without a timeout, and with one reported every job as timed out)."""

    async def awaits_a_cancelled_task() -> None:
        task = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()  # by shutdown logic elsewhere
        await task

    async def ok(n: int) -> int:
        await asyncio.sleep(0.01)
        return n

    async def main() -> list[Outcome[Any]]:
        return await gather_bounded([ok(1), awaits_a_cancelled_task(), ok(3)], timeout=timeout)

    first, failed, third = asyncio.run(main())
    assert (first.value, third.value) == (1, 3)
    assert isinstance(failed.error, RuntimeError)
    assert isinstance(failed.error.__cause__, asyncio.CancelledError)
    assert not failed.timed_out


def test_the_callers_own_cancellation_still_cancels_the_gather() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        gather = asyncio.ensure_future(gather_bounded([slow(), slow()]))
        await asyncio.sleep(0.01)
        gather.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gather

    asyncio.run(main())


@pytest.mark.parametrize("fallback_on", ["ConnectionError", ConnectionError("x"), 42, (ConnectionError, None), ()])
def test_fallback_on_must_name_exception_classes(fallback_on: Any) -> None:
    async def primary() -> int:
        return 1

    with pytest.raises(ConfigError, match="fallback_on"):
        with_fallbacks(primary, primary, fallback_on=fallback_on)
