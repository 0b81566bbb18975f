"""@rate_limited and its engine `RateLimiter` on the memory storage: limits, fairness, timeouts, cancellation,
several limits per call, Retry-After, AIMD, corrections, configuration errors.

Tests that depend on time run on virtual time (`tests.virtual_time`, asyncio and trio): the engine and its
memory storage read ``anyio.current_time``, so windows, resets and deadlines are exact and cost no real time.
A few tests run on the real clock to show the same on ``time.time`` (timeouts within 50 ms). The Redis and
multi-process tests are in ``test_rate_limit_redis.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, assert_type

import anyio
import pytest
import trio

import cachelayers
from cachelayers import (
    Adaptive,
    ConfigError,
    RateLimiter,
    RateLimitExceeded,
    Settings,
    SyncRateLimitedFunction,
    rate_limited,
)
from cachelayers.backends.limits_storage import MemoryLimitStorage
from cachelayers.engines.limiter import parse_limit, rate_limit_retry_after
from tests.virtual_time import VIRTUAL_BACKENDS, run_virtual

pytestmark = pytest.mark.anyio

SETTINGS = Settings(limits={"rpm": "5/second", "tpm": "100/second", "tiny": "2/second", "ten": "10/second",
                            "twenty": "20/second", "minute": "100/minute"})
MARGIN = 0.001  # the engine wakes this long after a window's reset time


def limiter(storage: Any = "memory://", **kwargs: Any) -> RateLimiter:
    """An engine on the loop's clock (virtual in virtual-time tests) with the test limits."""
    return RateLimiter(SETTINGS, storage=storage, clock=anyio.current_time, **kwargs)


class GatedStorage(MemoryLimitStorage):
    """Memory storage whose hits can be held at a gate, like a slow network store (so calls suspend)."""

    never_suspends = False

    def __init__(self) -> None:
        super().__init__(clock=anyio.current_time)
        self.gate: anyio.Event | None = None
        self.entered: anyio.Event | None = None

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if self.gate is not None:
            if self.entered is not None:
                self.entered.set()
            await self.gate.wait()
        return await super().acquire_entry(key, limit, expiry, amount)


class ProviderRateLimitError(Exception):
    """Shaped like openai's / anthropic's RateLimitError: a response with status 429 and headers."""

    def __init__(self, retry_after: str | None = None) -> None:
        super().__init__("429 Too Many Requests")
        headers = {} if retry_after is None else {"retry-after": retry_after}
        self.response = SimpleNamespace(status_code=429, headers=headers)


async def remaining(lim: RateLimiter, limit: str, key: str = "") -> int:
    return (await lim.window(limit, key))[1]


# -- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["3500/minuet", "0/second", "10 per fortnight", "ten/second", "5/second;x",
                                  "10 per 0 second", "5/second;10 per 00 minutes", "1 per 2000 year"])
def test_a_malformed_inline_limit_is_a_config_error_at_decoration_naming_the_field(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        @rate_limited("rpm", spec)
        async def f() -> None: ...
    assert info.value.field == "rate_limited.limits[1]"
    assert info.value.value == spec
    assert spec in str(info.value)


def test_a_malformed_named_limit_is_a_config_error_of_the_settings() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(limits={"llm-rpm": "3500/minuet"})
    assert info.value.field == "limits['llm-rpm']"


@pytest.mark.parametrize(("spec", "reason"), [
    ("0/minute", "at least 1 unit"),
    ("10/second;0/minute", "at least 1 unit"),
    ("10 per 0 second", "at least 1 second, not 0"),  # limits alone reads it as 10 per 1 second
    ("10/second;5 per 0 minutes", "at least 1 minute, not 0"),
    ("1 per 2000 year", "at most 1000 years"),  # its window is too long for Redis to count
])
def test_a_named_limit_the_limiter_would_refuse_is_refused_when_the_settings_are_made(spec: str, reason: str) -> None:
    """The settings make every check of the limiter's parse (not only the text's shape): the error comes from
    ``Settings(...)`` (or ``from_env``) naming the limit, never from the first call."""
    with pytest.raises(ConfigError, match=reason) as info:
        Settings(limits={"llm-rpm": spec})
    assert info.value.field == "limits['llm-rpm']"
    with pytest.raises(ConfigError, match=reason) as info:
        Settings.from_env({"CACHELAYERS_LIMITS": f"llm-rpm={spec}"})
    assert info.value.field == "CACHELAYERS_LIMITS['llm-rpm']"
    with pytest.raises(ConfigError, match=reason) as info:
        @rate_limited(spec)
        async def f() -> None: ...
    assert info.value.field == "rate_limited.limits[0]"


@pytest.mark.parametrize("spec", ["0/second", "10 per 0 second", "1 per 2000 year", "10/second;100/minute"])
def test_an_invalidation_limit_the_limiter_would_refuse_is_refused_when_the_settings_are_made(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(invalidation_limit=spec)
    assert info.value.field == "invalidation_limit"


LIMIT_TEXTS = ["3500/minute", "3500 per minute", "10 per 2 seconds", "10/second;500/minute", "100/HOUR",
               " 5 per 3 hours ", "10per2seconds", "1/day|2/month", "1/second,2/minute", "1 per 1000 years",
               "1 per 1013 year", "1 per 12166 months", "0/second", "10 per 0 second", "10 per 000 days",
               "1 per 1014 year", "1 per 12167 month", "99999999999999999999 per 1 second", "10/sec",
               "10/seconds;", ";10/second", "10/second:;5/minute", "10 / second", "ten/second", "10/fortnight",
               "-1/second", "10 per -1 second", "1.5/second", "10/second;x", "10/secondss", "10/s"]


def config_error(make: Callable[[], object]) -> ConfigError | None:
    """The `ConfigError` that ``make()`` raises, if any."""
    try:
        make()
    except ConfigError as exc:
        return exc
    return None


@pytest.mark.parametrize("spec", LIMIT_TEXTS)
def test_the_settings_accept_a_named_limit_exactly_when_the_limiter_accepts_it_inline(spec: str) -> None:
    """One check for both: a text the settings take as a named limit is one ``@rate_limited`` takes inline
    (refused for the same reason otherwise), and its windows are those limits counts with."""

    def decorate() -> None:
        @rate_limited(spec)
        async def f() -> None: ...

    named = config_error(lambda: Settings(limits={"llm-rpm": spec}))
    inline = config_error(decorate)
    if named is not None or inline is not None:
        assert named is not None
        assert inline is not None
        assert (named.field, named.reason) == ("limits['llm-rpm']", inline.reason)
    else:
        parsed = parse_limit(spec)
        assert all(item.amount >= 1 and 1 <= item.get_expiry() <= 1000 * 365 * 86400 for item in parsed.items)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"cost": {"nope": 3}}, "cost['nope']"),
    ({"cost": -1}, "cost"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "soon"}, "timeout"),
    ({"strategy": "leaky-bucket"}, "strategy"),
    ({"retries": -1}, "retries"),
    ({"backoff": 0}, "backoff"),
    ({"adaptive": Adaptive}, "adaptive"),
    ({"storage": "memcached://localhost:11211"}, "storage"),
])
def test_bad_options_are_config_errors_naming_the_option(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        @rate_limited("rpm", **kwargs)
        async def f() -> None: ...
    assert info.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"decrease": 1.5}, "adaptive.decrease"), ({"increase": 0}, "adaptive.increase"),
    ({"floor": -0.1}, "adaptive.floor"), ({"period": "forever"}, "adaptive.period")])
def test_bad_adaptive_settings_are_config_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Adaptive(**kwargs)
    assert info.value.field == field


def test_no_limits_bare_use_and_non_functions_are_rejected_at_decoration() -> None:
    """(Issue 14 made sync functions welcome: they get a `SyncRateLimitedFunction`, see tests/test_sync.py.)"""
    with pytest.raises(ConfigError, match="at least one limit"):
        @rate_limited()
        async def f() -> None: ...
    with pytest.raises(TypeError, match="needs its limits"):
        @rate_limited  # type: ignore[arg-type]
        async def g() -> None: ...
    with pytest.raises(TypeError, match="needs a function"):
        rate_limited("10/second")(42)  # type: ignore[call-overload]

    @rate_limited("10/second")
    def h() -> None: ...

    assert isinstance(h, SyncRateLimitedFunction)


def test_a_fixed_cost_larger_than_an_inline_limit_is_a_config_error_at_decoration() -> None:
    with pytest.raises(ConfigError, match="can never fit") as info:
        @rate_limited("3/second", cost=4)
        async def f() -> None: ...
    assert info.value.field == "cost"


async def test_an_unknown_limit_name_is_a_config_error_at_call_time_naming_it() -> None:
    @rate_limited("llm-rpm")
    async def f() -> None: ...

    with pytest.raises(ConfigError, match="no limit named 'llm-rpm'") as info:
        await f()
    assert info.value.field == "limits['llm-rpm']"
    cachelayers.configure(limits={"llm-rpm": "3500/minute"})  # configured later (after import): now it works
    await f()


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_cost_larger_than_its_limit_raises_at_call_time_and_takes_nothing() -> None:
    lim = limiter()
    calls: list[int] = []

    @rate_limited("rpm", "tpm", cost=lambda tokens: tokens, limiter=lim)
    async def complete(tokens: int) -> None:
        calls.append(tokens)

    with pytest.raises(RateLimitExceeded, match=r"cost of 101 can never fit limit tpm") as info:
        await complete(101)
    assert info.value.retry_after is None
    assert info.value.limit == "tpm"
    with pytest.raises(ValueError, match="must not be negative"):
        await complete(-1)
    assert calls == []
    assert await remaining(lim, "rpm") == 5
    assert await remaining(lim, "tpm") == 100
    await complete(100)
    assert calls == [100]


# -- admission and fairness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_admits_up_to_the_limit_then_sleeps_until_the_window_resets() -> None:
    lim = limiter()
    t0 = anyio.current_time()
    admitted: list[float] = []

    @rate_limited("3 per second", limiter=lim)
    async def call() -> None:
        admitted.append(anyio.current_time() - t0)

    async with anyio.create_task_group() as tg:
        for _ in range(7):
            tg.start_soon(call)
    assert admitted == pytest.approx([0, 0, 0, 1 + MARGIN, 1 + MARGIN, 1 + MARGIN, 2 + 2 * MARGIN], abs=1e-9)


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_waiting_head_makes_three_storage_calls_in_a_whole_window_no_polling() -> None:
    """Refused hit, window stats (the reset time), one hit after the reset: nothing in between."""
    lim = limiter()
    for _ in range(2):
        await lim.acquire("tiny")
    before = lim.info().storage_calls
    t0 = anyio.current_time()
    await lim.acquire("tiny")
    assert anyio.current_time() - t0 == pytest.approx(1 + MARGIN, abs=1e-9)
    assert lim.info().storage_calls - before == 3


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_grants_are_fifo_per_key_with_mixed_costs_and_arrivals() -> None:
    lim = limiter()
    rng = random.Random(5)
    counter = itertools.count()
    granted: dict[str, list[int]] = {"a": [], "b": []}

    @rate_limited("ten", cost=lambda units: units, key=lambda tenant, **_: tenant, limiter=lim)
    async def call(seq: int, units: int, tenant: str) -> None:
        granted[tenant].append(seq)

    async def client(delay: float, units: int, tenant: str) -> None:
        await anyio.sleep(delay)
        await call(next(counter), units, tenant)  # the sequence number is taken as the call enters the queue

    async with anyio.create_task_group() as tg:
        for _ in range(120):
            tg.start_soon(client, rng.uniform(0, 4), rng.choice([1, 1, 2, 3, 7, 10]), rng.choice("ab"))
    assert sum(len(v) for v in granted.values()) == 120
    for tenant, seqs in granted.items():
        assert seqs == sorted(seqs), f"out-of-order grants for {tenant}"
    assert lim.info().waited > 50  # the test did contend


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_large_cost_is_granted_within_a_bound_while_small_ones_keep_arriving() -> None:
    lim = limiter()
    t0 = anyio.current_time()
    small: list[tuple[float, float]] = []  # (arrival, grant) of cost-1 calls
    big: dict[str, float] = {}

    @rate_limited("ten", cost=lambda units: units, limiter=lim)
    async def call(units: int) -> None: ...

    async def one(units: int, at: float) -> None:
        await anyio.sleep(at)
        arrival = anyio.current_time() - t0
        if units == 10:
            big["ahead"] = sum(1 for _, g in small if math.isnan(g))  # small calls still waiting
        index = len(small)
        if units == 1:
            small.append((arrival, math.nan))
        await call(units)
        granted = anyio.current_time() - t0
        if units == 10:
            big.update(arrival=arrival, grant=granted)
        else:
            small[index] = (arrival, granted)

    async with anyio.create_task_group() as tg:
        for i in range(100):  # cost-1 calls at 20 per second against 10 per second: always a backlog
            tg.start_soon(one, 1, i * 0.05)
        tg.start_soon(one, 10, 1.02)
    ahead = big["ahead"]
    assert ahead >= 5  # there was a backlog of small calls ahead of the large one
    # FIFO: the backlog ahead needs ceil(ahead / 10) windows, the large cost one more.
    assert big["grant"] - big["arrival"] <= (math.ceil(ahead / 10) + 1) * (1 + MARGIN) + 1e-6
    overtakers = [a for a, g in small if a > big["arrival"] and g < big["grant"]]
    assert overtakers == []  # no small call that came later went first


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_at_most_1_2_storage_calls_per_admission_under_contention() -> None:
    lim = limiter()

    @rate_limited("twenty", limiter=lim)
    async def call() -> None: ...

    async def client() -> None:
        for _ in range(5):
            await call()

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(client)
    info = lim.info()
    assert info.admitted == 500
    assert info.waited >= 400
    assert info.calls_per_admission <= 1.2, info


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_keys_are_limited_independently() -> None:
    lim = limiter()
    admitted: list[tuple[str, float]] = []

    @rate_limited("tiny", key=lambda tenant, **_: tenant, limiter=lim)
    async def call(tenant: str) -> None:
        admitted.append((tenant, anyio.current_time()))

    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for tenant in "aaab":
            tg.start_soon(call, tenant)
    assert sorted((t, round(at - t0, 4)) for t, at in admitted) == [("a", 0), ("a", 0), ("a", 1.001), ("b", 0)]


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_named_limit_is_shared_by_every_function_that_uses_it_an_inline_one_is_not() -> None:
    lim = limiter()

    @rate_limited("tiny", limiter=lim)
    async def first() -> None: ...

    @rate_limited("tiny", limiter=lim)
    async def second() -> None: ...

    @rate_limited("2/second", limiter=lim)
    async def third() -> None: ...

    @rate_limited("2/second", limiter=lim)
    async def fourth() -> None: ...

    t0 = anyio.current_time()
    await first()
    await second()
    await third()
    await fourth()
    await fourth()
    assert anyio.current_time() == t0  # inline limits are per function: fourth had its own two units
    await first()  # the named limit's two units are spent by first and second together
    assert anyio.current_time() - t0 == pytest.approx(1 + MARGIN, abs=1e-9)


# -- timeouts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_timeout_shorter_than_the_reset_raises_at_once_with_retry_after() -> None:
    lim = limiter()
    await lim.acquire("tiny")
    await lim.acquire("tiny")
    t0 = anyio.current_time()
    with pytest.raises(RateLimitExceeded, match="tiny") as info:
        await lim.acquire("tiny", timeout=0.3)
    assert anyio.current_time() == t0
    assert info.value.retry_after == pytest.approx(1 + MARGIN, abs=1e-9)
    with pytest.raises(RateLimitExceeded):
        await lim.acquire("tiny", timeout=0)
    await anyio.sleep(1)
    assert await remaining(lim, "tiny") == 0  # a closed window: units taken exactly 1 s ago still count
    await anyio.sleep(MARGIN)
    assert await remaining(lim, "tiny") == 2  # the refused calls took nothing
    await lim.acquire("tiny", timeout=0)
    assert lim.info().timeouts == 2


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_queued_waiter_times_out_exactly_at_its_deadline() -> None:
    storage = GatedStorage()
    lim = limiter(storage)
    storage.gate = anyio.Event()
    outcome: dict[str, Any] = {}

    async def head() -> None:
        await lim.acquire("rpm")  # stuck in the storage call until the gate opens

    async def second() -> None:
        t0 = anyio.current_time()
        try:
            await lim.acquire("rpm", timeout=0.3)
        except RateLimitExceeded as exc:
            outcome.update(elapsed=anyio.current_time() - t0, exc=exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(head)
        await anyio.sleep(0.01)
        tg.start_soon(second)
        await anyio.sleep(1)
        storage.gate.set()
    assert outcome["elapsed"] == pytest.approx(0.3, abs=1e-9)
    assert await remaining(lim, "rpm") == 4  # the head's unit only


# -- cancellation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_cancelled_waiters_take_nothing_and_the_queue_moves_on() -> None:
    lim = limiter()
    await lim.acquire("tiny")
    await lim.acquire("tiny")
    t0 = anyio.current_time()
    granted: list[tuple[str, float]] = []

    async def waiter(name: str, cancel_after: float | None) -> None:
        with anyio.move_on_after(math.inf if cancel_after is None else cancel_after):
            await lim.acquire("tiny")
            granted.append((name, anyio.current_time() - t0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "head, cancelled while sleeping", 0.5)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(waiter, "queued, cancelled", 0.4)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(waiter, "third", None)
    assert [name for name, _ in granted] == ["third"]
    assert granted[0][1] == pytest.approx(1 + MARGIN, abs=1e-9)
    assert await remaining(lim, "tiny") == 1
    assert lim.info().cancelled == 2


async def _hold_the_head_in_the_storage(storage: GatedStorage) -> None:
    """Close the gate while the head sleeps for the reset (t=1.001); open it at t=2, when it is cancelled."""
    await anyio.sleep(0.5)
    storage.gate = anyio.Event()
    storage.entered = anyio.Event()
    await storage.entered.wait()  # the head is inside its storage call, at t=1.001
    await anyio.sleep(1)  # its cancellation (at t=1.5) lands while it is there
    storage.gate.set()  # the call then succeeds: the engine must hand the unit back


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_a_head_cancelled_during_its_storage_call_gives_the_units_back() -> None:
    storage = GatedStorage()
    lim = limiter(storage)
    await lim.acquire("tiny")
    await lim.acquire("tiny")
    admitted = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold_the_head_in_the_storage, storage)
        with anyio.move_on_after(1.5) as scope:
            await lim.acquire("tiny")
            admitted.append(True)
    assert scope.cancelled_caught
    assert admitted == []
    storage.gate = None
    assert await remaining(lim, "tiny") == 2
    assert lim.info().cancelled == 1
    assert lim.info().refunds == 1


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS[:1])
async def test_a_native_asyncio_cancellation_during_the_storage_call_gives_the_units_back() -> None:
    storage = GatedStorage()
    lim = limiter(storage)
    await lim.acquire("tiny")
    await lim.acquire("tiny")
    holder = asyncio.ensure_future(_hold_the_head_in_the_storage(storage))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lim.acquire("tiny"), 1.5)  # asyncio's own timeout: a plain Task.cancel()
    await holder
    storage.gate = None
    assert await remaining(lim, "tiny") == 2
    assert lim.info().refunds == 1


# -- several limits per call ----------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_several_limits_a_waiting_call_holds_none_of_the_other_limits_units() -> None:
    lim = limiter()
    observed: list[int] = []

    @rate_limited("rpm", "tiny", limiter=lim)
    async def call() -> None: ...

    async def observer() -> None:
        await anyio.sleep(0.5)
        observed.append(await remaining(lim, "rpm"))
        observed.append(await remaining(lim, "tiny"))

    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(call)
        tg.start_soon(observer)
    # While the third call waits for "tiny", "rpm" has lost only the two admitted calls' units: the third
    # call's first attempt took one from "rpm" before "tiny" refused, and gave it back at once.
    assert observed == [3, 0]
    assert anyio.current_time() - t0 == pytest.approx(1 + MARGIN, abs=1e-9)
    assert await remaining(lim, "rpm") == 4  # the first two expired with the window; the third's unit
    assert lim.info().refunds == 1


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_requests_and_tokens_a_single_cost_weighs_every_limit_but_the_first() -> None:
    lim = limiter()

    @rate_limited("rpm", "tpm", cost=lambda prompt: len(prompt), limiter=lim)
    async def complete(prompt: str, model: str = "m") -> str:
        return prompt.upper()

    assert await complete("x" * 60) == "X" * 60
    assert await remaining(lim, "rpm") == 4
    assert await remaining(lim, "tpm") == 40
    t0 = anyio.current_time()
    await complete("y" * 60)  # 60 tokens do not fit in the 40 left: waits for the window
    assert anyio.current_time() - t0 == pytest.approx(1 + MARGIN, abs=1e-9)


# -- rate-limit errors, Retry-After, retries, AIMD, corrections ------------------------------------------------


def test_rate_limit_errors_are_recognised_by_duck_typing() -> None:
    class HTTPStatusError(Exception):  # httpx
        def __init__(self, status: int, headers: dict[str, str]) -> None:
            super().__init__("status")
            self.response = SimpleNamespace(status_code=status, headers=headers)

    class ClientResponseError(Exception):  # aiohttp
        def __init__(self, status: int, headers: dict[str, str]) -> None:
            super().__init__("status")
            self.status = status
            self.headers = headers

    now = 1_700_000_000.0
    date = "Tue, 14 Nov 2023 22:13:40 GMT"  # now + 20 s
    assert rate_limit_retry_after(HTTPStatusError(429, {"Retry-After": "7"}), now=now) == 7
    assert rate_limit_retry_after(HTTPStatusError(429, {"retry-after": date}), now=now) == pytest.approx(20)
    assert rate_limit_retry_after(HTTPStatusError(429, {"retry-after-ms": "1500"}), now=now) == 1.5
    assert rate_limit_retry_after(HTTPStatusError(429, {}), now=now) is None
    assert rate_limit_retry_after(HTTPStatusError(500, {"retry-after": "7"}), now=now) == -1
    assert rate_limit_retry_after(ClientResponseError(429, {"Retry-After": "3"}), now=now) == 3
    assert rate_limit_retry_after(ProviderRateLimitError("2.5"), now=now) == 2.5

    class RateLimitError(Exception):  # a provider SDK's class, without a response
        retry_after = 4.0

    assert rate_limit_retry_after(RateLimitError(), now=now) == 4
    assert rate_limit_retry_after(ValueError("no"), now=now) == -1
    assert rate_limit_retry_after(RateLimitExceeded("ours"), now=now) == -1  # our own refusal is not the provider's
    assert rate_limit_retry_after(ValueError("busy"), lambda e: "busy" in str(e), now=now) is None
    assert rate_limit_retry_after(ValueError("busy"), lambda e: 9.0, now=now) == 9
    assert rate_limit_retry_after(RateLimitError(), lambda e: False, now=now) == -1
    assert rate_limit_retry_after(RateLimitError(), lambda e: None, now=now) == 4


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_retry_after_pauses_the_key_and_the_call_is_retried_after_it() -> None:
    lim = limiter()
    t0 = anyio.current_time()
    sent: list[tuple[str, float]] = []

    @rate_limited("rpm", key=lambda model, **_: model, retries=2, limiter=lim)
    async def complete(prompt: str, model: str) -> str:
        sent.append((prompt, anyio.current_time() - t0))
        if prompt == "first" and len(sent) == 1:
            raise ProviderRateLimitError("3")
        return prompt

    async def later(prompt: str, model: str, at: float) -> None:
        await anyio.sleep(at)
        assert await complete(prompt, model) == prompt

    async with anyio.create_task_group() as tg:
        tg.start_soon(later, "first", "gpt", 0)
        tg.start_soon(later, "second", "gpt", 1)
        tg.start_soon(later, "other model", "claude", 1)
    times = {p: round(t, 6) for p, t in sent[1:]}
    assert sent[0] == ("first", 0.0)
    assert times["other model"] == 1  # another key is not paused
    assert times["second"] >= 3  # waited for the pause although its limit had room
    assert times["first"] >= 3  # the retry came after the Retry-After
    info = lim.info()
    assert (info.rate_limit_errors, info.retries, info.pauses) == (1, 1, 1)


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_retries_back_off_exponentially_with_jitter_then_the_error_propagates() -> None:
    random.seed(11)
    lim = limiter()
    sent: list[float] = []

    @rate_limited("rpm", retries=3, backoff=1, limiter=lim)
    async def complete() -> None:
        sent.append(anyio.current_time())
        raise ProviderRateLimitError()  # no Retry-After: the back-off decides

    with pytest.raises(ProviderRateLimitError):
        await complete()
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(gaps) == 3
    for n, gap in enumerate(gaps):
        assert 0.5 * 2**n <= gap <= 2**n + 0.01, gaps  # equal jitter: between half the back-off and all of it
    assert len({round(g / 2**n, 6) for n, g in enumerate(gaps)}) > 1  # jittered, not a fixed schedule
    assert lim.info().retries == 3


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_adaptive_mode_lowers_the_rate_on_errors_and_restores_it_after_sustained_success() -> None:
    lim = limiter()
    failing = {"on": True}

    class Busy(Exception):
        pass

    @rate_limited("ten", adaptive=Adaptive(decrease=0.5, increase=0.1, floor=0.2, period=2),
                  rate_limit_error=lambda e: 0.0 if isinstance(e, Busy) else None, limiter=lim)
    async def call() -> None:
        if failing["on"]:
            raise Busy()

    levels = [lim.effective_limit("ten")]
    for _ in range(3):
        with pytest.raises(Busy):
            await call()
        levels.append(lim.effective_limit("ten"))
    assert levels == [10, 5, 2, 2]  # halved, then held at the floor (20 %)

    # While lowered, a window admits only the effective amount.
    failing["on"] = False
    await anyio.sleep(1.01)
    t0 = anyio.current_time()
    admitted: list[float] = []

    async def timed() -> None:
        await call()
        admitted.append(anyio.current_time() - t0)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(timed)
    assert sorted(round(a, 3) for a in admitted)[:2] == [0, 0]
    assert all(a >= 1 for a in sorted(admitted)[2:])

    # Sustained success: one step of 10 % of the configured rate per period (2 s) with a success.
    restored = [lim.effective_limit("ten")]
    while restored[-1] < 10:
        await anyio.sleep(2)
        await call()
        restored.append(lim.effective_limit("ten"))
    assert restored[0] in (2, 3)
    assert restored == list(range(restored[0], 11))


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_errors_of_calls_sent_before_a_decrease_do_not_decrease_it_again() -> None:
    lim = limiter()
    release = anyio.Event()

    @rate_limited("ten", adaptive=True, limiter=lim, rate_limit_error=lambda e: 0.0)
    async def call() -> None:
        await release.wait()
        raise RuntimeError("429")

    async def one() -> None:
        with pytest.raises(RuntimeError):
            await call()

    async with anyio.create_task_group() as tg:
        for _ in range(5):  # five calls in flight when the provider starts refusing
            tg.start_soon(one)
        await anyio.sleep(0.1)
        release.set()
    assert lim.effective_limit("ten") == 5  # one multiplicative decrease, not five


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_the_actual_cost_is_charged_or_returned_after_the_call() -> None:
    lim = limiter()

    @rate_limited("minute", cost=lambda estimate, **_: estimate, actual=lambda result: result, limiter=lim)
    async def complete(estimate: int, used: int) -> int:
        return used

    await complete(10, 30)
    assert await remaining(lim, "minute") == 70  # 10 estimated + 20 charged afterwards
    await complete(50, 20)
    assert await remaining(lim, "minute") == 50  # 50 estimated, 30 returned
    await complete(45, 60)  # 45 fit, the 15 more do not: carried to the next call as a debt
    assert await remaining(lim, "minute") == 5
    t0 = anyio.current_time()
    await complete(1, 1)  # 1 + the debt of 15 must fit: waits for the window
    assert anyio.current_time() - t0 > 59
    assert lim.info().refunds == 30


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_the_engine_context_manager_settles_rate_limit_errors_and_reports() -> None:
    lim = limiter()
    async with lim.limit("rpm", "tpm", cost=40, key="m") as permit:
        permit.report(25)
    assert await remaining(lim, "tpm", "m") == 75
    with pytest.raises(ProviderRateLimitError):
        async with lim.limit("rpm", key="m"):
            raise ProviderRateLimitError("2")
    t0 = anyio.current_time()
    await lim.acquire("rpm", key="m")
    assert anyio.current_time() - t0 == pytest.approx(2, abs=1e-6)  # paused by the Retry-After
    permit = await lim.acquire("tpm", cost=30)
    await permit.refund()
    assert await remaining(lim, "tpm") == 100


# -- strategies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_fixed_window_strategy_waits_for_the_window_and_refused_hits_take_nothing() -> None:
    lim = limiter(strategy="fixed-window")
    t0 = anyio.current_time()
    admitted: list[float] = []

    @rate_limited("3/second", limiter=lim)
    async def call() -> None:
        admitted.append(round(anyio.current_time() - t0, 3))

    async with anyio.create_task_group() as tg:
        for _ in range(7):
            tg.start_soon(call)
    assert admitted[:3] == [0, 0, 0]
    assert [sum(1 for a in admitted if w <= a < w + 1) for w in range(3)] == [3, 3, 1]


async def test_sliding_window_counter_on_the_real_clock() -> None:
    lim = RateLimiter(SETTINGS, storage="memory://", strategy="sliding-window-counter")
    await lim.acquire("rpm")  # warm up: the storage is made on first use
    if time.time() % 1 > 0.5:  # limits' counter windows are aligned on whole seconds: start early in one
        await anyio.sleep(1.01 - time.time() % 1)
    first = time.time()
    for _ in range(4):
        await lim.acquire("4/second")
    assert lim.info().immediate == 5
    await lim.acquire("4/second")
    # It waited for the weighted count to drop, which cannot happen before the next counter window (limits'
    # sliding-window counter weighs the previous window's count by the part of it still in the window).
    assert lim.info().waited == 1
    assert int(time.time()) > int(first)


# -- real clock, asyncio and trio ------------------------------------------------------------------------


async def test_real_clock_admits_waits_and_honours_timeouts_within_50ms() -> None:
    lim = RateLimiter(SETTINGS, storage="memory://")
    await lim.acquire("rpm")  # warm up: the storage is made on first use
    start = time.monotonic()
    for _ in range(4):
        await lim.acquire("4/second")
    assert lim.info().immediate == 5
    t0 = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:
        await lim.acquire("4/second", timeout=0.25)  # the window resets after the deadline: raises at once
    assert time.monotonic() - t0 < 0.05
    assert info.value.retry_after is not None
    assert 0.9 < info.value.retry_after < 1.05
    await lim.acquire("4/second")
    assert 0.99 < time.monotonic() - start < 1.15


async def test_real_clock_a_queued_waiter_raises_at_its_deadline_within_50ms() -> None:
    storage = GatedStorage()
    storage.clock = time.time
    lim = RateLimiter(SETTINGS, storage=storage)
    storage.gate = anyio.Event()
    elapsed: list[float] = []

    async def stuck_head() -> None:
        await lim.acquire("rpm")

    async def second() -> None:
        t0 = time.monotonic()
        with pytest.raises(RateLimitExceeded):
            await lim.acquire("rpm", timeout=0.3)
        elapsed.append(time.monotonic() - t0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stuck_head)
        await anyio.sleep(0.01)
        tg.start_soon(second)
        await anyio.sleep(0.5)
        storage.gate.set()
    assert 0.3 <= elapsed[0] <= 0.35


# -- event loops, idleness, typing ----------------------------------------------------------------------------


@rate_limited("5/second", key=lambda tenant, **_: tenant)
async def module_level(tenant: str) -> str:
    """Decorated at import time, before any event loop exists."""
    return tenant


def test_not_bound_to_an_event_loop_at_import_runs_under_asyncio_then_trio() -> None:
    async def main() -> list[str]:
        return [await module_level("a"), await module_level("b")]

    assert anyio.run(main, backend="asyncio") == ["a", "b"]
    assert anyio.run(main, backend="trio") == ["a", "b"]
    assert run_virtual("asyncio", main) == ["a", "b"]


async def test_an_idle_limiter_leaves_no_task_and_no_timer(anyio_backend: str) -> None:
    lim = RateLimiter(SETTINGS, storage="memory://")
    if anyio_backend == "trio":
        before = trio.lowlevel.current_statistics()
    else:
        loop = asyncio.get_running_loop()
        tasks_before = asyncio.all_tasks()
    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(lim.acquire, "5/second")  # waits too: 5 now, 5 after 1 s, 2 after 2 s
    await anyio.lowlevel.checkpoint()
    if anyio_backend == "trio":
        after = trio.lowlevel.current_statistics()
        assert after.tasks_living == before.tasks_living
        assert after.seconds_to_next_deadline == math.inf
    else:
        assert asyncio.all_tasks() == tasks_before
        assert [h for h in loop._scheduled if not h.cancelled()] == []  # type: ignore[attr-defined]


async def test_methods_and_types() -> None:
    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

        @rate_limited("5/second", key=lambda self, **_: self.name)
        async def ask(self, question: str) -> str:
            return f"{self.name}: {question}"

    answer = await Client("a").ask("why?")
    assert_type(answer, str)
    assert answer == "a: why?"

    @rate_limited("5/second")
    async def plain(x: int) -> int:
        return x

    assert_type(await plain(1), int)
    assert plain.__wrapped__.__name__ == "plain"
    assert plain.rate_limit.limiter is cachelayers.engines.default_limiter()


def _assert_config(fn: Callable[[], Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        fn()
    assert info.value.field == field


def test_the_engine_rejects_bad_storage_and_strategy() -> None:
    _assert_config(lambda: RateLimiter(storage="ftp://x"), "storage")
    _assert_config(lambda: RateLimiter(strategy="token-bucket"), "strategy")
    _assert_config(lambda: RateLimiter(pause_check=-1), "pause_check")


@pytest.mark.parametrize("anyio_backend", VIRTUAL_BACKENDS)
async def test_under_a_cache_only_misses_wait_and_are_charged() -> None:
    lim = limiter()
    calls: list[str] = []

    @cachelayers.multilevel_cached(ttl="1h")
    @rate_limited("tiny", limiter=lim)
    async def complete(prompt: str) -> str:
        calls.append(prompt)
        return prompt.upper()

    t0 = anyio.current_time()
    assert [await complete(p) for p in ["a", "b", "a", "b", "a"]] == ["A", "B", "A", "B", "A"]
    assert anyio.current_time() == t0  # the hits did not wait for the spent limit
    assert calls == ["a", "b"]
    assert await remaining(lim, "tiny") == 0
    assert await complete("c") == "C"  # a miss waits for the window
    assert anyio.current_time() - t0 == pytest.approx(1 + MARGIN, abs=1e-9)


async def test_key_and_cost_functions_get_the_same_arguments_however_the_call_passes_them() -> None:
    """A call passing exactly the parameters by position skips binding the signature; the functions of the
    arguments see the same values as when the call passes them by name or relies on a default."""
    seen: list[tuple[Any, ...]] = []

    def key(tenant: str, **rest: Any) -> str:
        seen.append(("key", tenant, rest))
        return tenant

    def cost(units: int, scale: int = 2) -> int:
        seen.append(("cost", units, scale))
        return units * scale

    @rate_limited("1000/second", "100000/second", key=key, cost=cost, storage="memory://")
    async def call(tenant: str, units: int, scale: int = 3) -> int:
        return units * scale

    assert await call("a", 1, 3) == 3  # by position, every parameter
    assert await call("a", 1) == 3  # the default applied
    assert await call(tenant="a", units=1, scale=3) == 3  # by name
    assert seen == [("key", "a", {"units": 1, "scale": 3}), ("cost", 1, 3)] * 3

    class Client:
        name = "c"

        @rate_limited("1000/second", key=lambda self: self.name, cost=lambda self, n: n, storage="memory://")
        async def ask(self, n: int) -> int:
            return n

    assert await Client().ask(2) == 2
    assert Client.ask.rate_limit.limiter.info().admitted >= 1
