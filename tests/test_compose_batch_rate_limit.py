"""`@batched` over `@rate_limited`: one batch is one admission, charged the sum of its items' weights."""

from __future__ import annotations

import pytest

from cachelayers import BatchError, RateLimitExceeded, batched, rate_limited

pytestmark = pytest.mark.anyio


async def test_a_batch_is_charged_once_with_the_sum_of_its_item_weights() -> None:
    batches: list[list[str]] = []

    @batched(max_size=4, max_wait="10ms")
    @rate_limited("100/minute", cost=lambda texts: sum(len(t) for t in texts), timeout=0)
    async def embed(texts: list[str]) -> list[int]:
        batches.append(list(texts))
        return [len(t) for t in texts]

    first = [f"{i}" * 10 for i in range(4)]
    second = [f"{i}" * 15 for i in range(4, 8)]
    assert await embed.many(first) == [10] * 4  # one batch: 40 of the 100 units
    assert await embed.many(second) == [15] * 4  # one batch: 60 more, the limit is now full
    assert batches == [first, second]
    # Charged per batch with the summed weights, the limit is exhausted after 8 items and 2 admissions; had
    # each item been charged 1 unit, this call would pass.
    with pytest.raises(BatchError) as failure:
        await embed("c")
    assert isinstance(failure.value.__cause__, RateLimitExceeded)
    assert len(batches) == 2
