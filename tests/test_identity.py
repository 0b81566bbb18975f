"""Two live functions never share entries unless the user says so (issue 11: identity).

Functions that share ``module.qualname`` — closures made by one factory, a function redefined under the same
name — get distinct identities when the values they close over can be keyed, and are refused at decoration
(with a hint to pass ``name=`` or ``namespace=``) when they cannot be told apart.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cachelayers import CachedFunction, ConfigError, Settings, TieredCache, multilevel_cached, semantic_cached
from cachelayers.keys import closure_fingerprint, function_identity

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """These tests are about keys, not event loops."""
    return "asyncio"


class Client:
    """An object that cannot be keyed, like an SDK client."""

    def __init__(self, bonus: int) -> None:
        self.bonus = bonus


def adder(n: int, cache: TieredCache | None = None) -> CachedFunction[[int], int]:
    @multilevel_cached(cache=cache)
    async def add(x: int) -> int:
        return x + n

    return add


def client_adder(client: Client, *, name: str | None = None, namespace: str | None = None,
                 version: str = "0") -> CachedFunction[[int], int]:
    @multilevel_cached(name=name, namespace=namespace, version=version)
    async def add(x: int) -> int:
        return x + client.bonus

    return add


@pytest.mark.parametrize("tier", ["memory", "disk"])
async def test_factory_closures_over_keyable_values_keep_their_own_entries(tier: str, tmp_path: Path) -> None:
    """``make(1)(1)`` cached, then ``make(100)(1)`` is 101, not 2 — in memory and on disk."""
    url = "memory://" if tier == "memory" else f"disk://{tmp_path}"
    cache = TieredCache(Settings(tiers={tier: url}))
    try:
        one, hundred = adder(1, cache), adder(100, cache)
        assert await one(1) == 2
        assert await hundred(1) == 101
        assert await one(1) == 2
        assert one.cache_info().hits == 1
        # A closure made again with the same value is the same function: it finds the entry.
        again = adder(100, cache)
        assert await again(1) == 101
        assert again.cache_info().hits == 1
    finally:
        await cache.aclose()


def test_the_fingerprint_follows_the_closed_over_values() -> None:
    """Equal closed-over values give equal identities across factory calls; different values do not."""
    assert function_identity(adder(1)) == function_identity(adder(1))
    assert function_identity(adder(1)) != function_identity(adder(2))
    assert function_identity(adder(1)).startswith("tests.test_identity.adder.<locals>.add#")
    assert closure_fingerprint(Client) == ""  # nothing closed over
    client = Client(1)
    assert closure_fingerprint(lambda: client.bonus) is None  # closes over a value that cannot be keyed
    assert function_identity(lambda: client.bonus).endswith("<lambda>")


async def test_closures_over_unkeyable_values_are_refused_with_a_hint() -> None:
    """A second live closure over a client cannot be told apart from the first: ConfigError naming ``name=``."""
    first = client_adder(Client(1))
    with pytest.raises(ConfigError, match=r"name=.*namespace=") as info:
        client_adder(Client(100))
    assert info.value.field == "name"
    assert await first(1) == 2


async def test_a_name_or_namespace_tells_them_apart() -> None:
    """With ``name=`` (or ``namespace=``) each closure keeps its own entries."""
    low = client_adder(Client(1), name="adder-low")
    high = client_adder(Client(100), name="adder-high")
    spaced = client_adder(Client(1000), namespace="adder-spaced")
    assert (await low(1), await high(1), await spaced(1)) == (2, 101, 1001)
    assert (await low(1), await high(1), await spaced(1)) == (2, 101, 1001)


async def test_a_collected_function_gives_its_identity_back() -> None:
    """Once the first closure is gone a new one may take the identity (a notebook cell run again, a client
    rebuilt): like a redefined function it reads the entries under that identity, and ``version=`` starts anew.
    """
    first = client_adder(Client(1))
    assert await first(1) == 2
    del first
    gc.collect()
    second = client_adder(Client(5))
    assert await second(1) == 2  # the identity's entry: the closure over a client is identified by its code
    assert second.cache_info().hits == 1
    third = client_adder(Client(5), version="2")
    assert await third(1) == 6


async def test_one_function_decorated_twice_shares_its_entries() -> None:
    """The same function object under two decorations is one function: no refusal."""

    async def double(x: int) -> int:
        return 2 * x

    a = multilevel_cached(double)
    b = multilevel_cached(ttl=60)(double)
    assert await a(2) == 4
    assert await b(2) == 4


def test_a_function_redefined_under_the_same_name_is_refused() -> None:
    """Two different functions with one ``module.qualname`` (e.g. redefined in a loop or a cell) are refused."""
    kept: list[CachedFunction[[int], int]] = []
    for body in ("x + 1", "x * 10"):
        namespace: dict[str, Any] = {"__name__": "tests.redefined"}
        exec(f"async def compute(x):\n    return {body}\n", namespace)
        if not kept:
            kept.append(multilevel_cached(namespace["compute"]))
        else:
            with pytest.raises(ConfigError, match="another live function"):
                multilevel_cached(namespace["compute"])


async def test_the_semantic_cache_refuses_indistinct_closures_too() -> None:
    """`semantic_cached` keys its partitions by the same identity: the same rule holds."""

    def make(client: Client) -> Callable[[str], Awaitable[str]]:
        @semantic_cached(threshold=0.99)
        async def answer(question: str) -> str:
            return f"{client.bonus}:{question}"

        return answer

    first = make(Client(1))
    with pytest.raises(ConfigError, match="another live function"):
        make(Client(2))
    assert await first("hello") == "1:hello"


def test_ignore_as_one_string_is_refused() -> None:
    """``ignore="client"`` would be read letter by letter: ConfigError naming ``ignore``."""
    with pytest.raises(ConfigError, match="collection of parameter names") as info:

        @multilevel_cached(ignore="client")
        async def ask(question: str, client: object) -> str:
            return question

    assert info.value.field == "ignore"


def test_a_limit_without_a_name_in_the_environment_is_refused() -> None:
    """``CACHELAYERS_LIMITS=3500/minute`` (no name) is an error naming the variable, never dropped."""
    with pytest.raises(ConfigError, match="name=limit") as info:
        Settings.from_env({"CACHELAYERS_LIMITS": "3500/minute"})
    assert info.value.field == "CACHELAYERS_LIMITS"
    assert Settings.from_env({"CACHELAYERS_LIMITS": "a=1/second, b=2/minute"}).limit_specs == {
        "a": "1/second", "b": "2/minute"}


def test_claims_of_collected_functions_are_forgotten() -> None:
    """Thousands of short-lived closures leave no claims behind (the record does not grow without bound)."""
    from cachelayers import keys

    def claimed() -> int:
        return sum(1 for token in keys._claims if ".adder.<locals>.add#" in token)

    before = claimed()
    made = [adder(n) for n in range(1_000, 1_300)]
    assert claimed() == before + 300
    del made
    gc.collect()
    assert claimed() == before
