"""Options that would do nothing are refused, and user functions that fail behave alike (issue 11: configuration).

``stale=`` without a TTL and ``lock=`` without a tier that holds locks are `ConfigError`s naming the option —
at decoration with ``cache=``, else when the function first binds to the settings in force. A ``key=`` function
that raises behaves like a ``tags=`` function that raises: the call returns its result uncached, the error is
counted and logged once, and strict mode raises what the user function raised.
"""

from __future__ import annotations

import pytest

from cachelayers import ConfigError, Settings, TieredCache, configure, multilevel_cached

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Configuration checks; asyncio is enough."""
    return "asyncio"


def test_stale_without_a_ttl_is_refused_at_decoration_with_an_engine() -> None:
    """With ``cache=`` the engine is known: ``stale=`` and no TTL anywhere fails at once, naming ``stale``."""
    with pytest.raises(ConfigError, match="without a TTL") as info:

        @multilevel_cached(cache=TieredCache(Settings()), stale="30s")
        async def f(x: int) -> int:
            return x

    assert info.value.field == "stale"


async def test_stale_without_a_ttl_is_refused_when_the_settings_are_known() -> None:
    """Decorated at import (settings not yet configured), the check runs at the first call; a default TTL in
    the settings makes ``stale=`` effective."""

    @multilevel_cached(stale="30s")
    async def f(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="without a TTL"):
        await f(1)
    configure(default_ttl="1h")
    assert await f(1) == 1
    assert await f(1) == 1
    assert f.cache_info().hits == 1


def test_a_lock_without_a_lock_tier_is_refused() -> None:
    """``lock=True`` over memory (and disk) tiers would never lock anything: refused, naming ``lock``."""
    with pytest.raises(ConfigError, match="hold locks") as info:

        @multilevel_cached(cache=TieredCache(Settings()), ttl="1h", lock=True)
        async def f(x: int) -> int:
            return x

    assert info.value.field == "lock"


@pytest.mark.parametrize("failing", ["key", "tags"])
async def test_a_failing_key_or_tags_function_runs_the_call_uncached(failing: str) -> None:
    """The call returns the function's result, nothing is stored, and each failure is counted."""
    runs: list[int] = []

    def broken(**_: object) -> list[str]:
        raise RuntimeError("user function bug")

    options = {failing: broken}

    @multilevel_cached(cache=TieredCache(Settings()), **options)  # type: ignore[call-overload, untyped-decorator]
    async def f(x: int) -> int:
        runs.append(x)
        return 10 * x

    assert await f(2) == 20
    assert await f(2) == 20
    assert runs == [2, 2]
    info = f.cache_info()
    assert (info.hits, info.errors) == (0, 2)


@pytest.mark.parametrize("failing", ["key", "tags"])
async def test_strict_mode_raises_what_the_user_function_raised(failing: str) -> None:
    """With ``strict=True`` the user function's own exception reaches the caller, for both."""

    def broken(**_: object) -> list[str]:
        raise RuntimeError("user function bug")

    options = {failing: broken}

    @multilevel_cached(cache=TieredCache(Settings(strict=True)), **options)  # type: ignore[call-overload, untyped-decorator]
    async def f(x: int) -> int:
        return x

    with pytest.raises(RuntimeError, match="user function bug"):
        await f(1)
