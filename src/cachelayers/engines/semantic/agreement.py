"""Answer agreement: check some would-be semantic hits by computing them, and keep the wrong ones rare.

A similarity threshold cannot tell a paraphrase from a different question that reads almost the same; the
function's own answers can. `AnswerAgreement` runs the function instead of serving a would-be hit with a
probability that follows the disagreements it has seen: where the cache has been answering wrongly it checks
nearly every would-be hit (and the distinct question it computed becomes an entry of its own); where it has
been answering rightly it checks fewer and fewer. Served answers then disagree with the function's at about
``max_error`` of would-be hits or less, whatever the threshold — the idea of vCache (arXiv 2502.03771),
estimated over the whole function rather than per entry, so that questions asked once still teach it.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from cachelayers.errors import ConfigError

__all__ = ["AnswerAgreement"]


def _equal(new: Any, cached: Any) -> bool:
    return bool(new == cached)


class AnswerAgreement:
    """Check would-be semantic hits by running the function, often enough to keep wrong answers rare.

    Pass one as ``semantic_cached(check=...)``. A would-be hit (a candidate that passed the threshold, the
    margin and the verifier) is *checked* with probability `rate`: the function runs, its result is returned
    and stored as an entry of its own, and ``agree(result, cached_value)`` tells whether the cached answer would
    have been right. The rate is ``1 - max_error / e``, where ``e`` estimates the share of would-be hits that
    disagree over the last ``window`` checks (with one agreeing and one disagreeing check assumed a priori), so a
    cold cache checks nearly everything and a cache that keeps agreeing checks ``min_rate`` of its hits.

    Use it where the function's answers can be compared: a deterministic function, or an ``agree`` that compares
    what matters (the message text of a completion, not its id and timestamp). With an ``agree`` that never
    holds, every would-be hit is checked, so the cache answers nothing semantically (it stays correct).

    The state is one estimate per instance: give each decorated function its own.

    Args:
        max_error: The share of would-be hits allowed to disagree when served, in ``(0, 1)``.
        window: How many of the latest checks the estimate looks at; ``1 / max_error`` by default (at least 10),
            the fewest that let a window of agreements bring the rate down to ``min_rate``.
        min_rate: The least probability of checking a would-be hit, in ``[0, 1]`` (1 % by default): keeps the
            estimate fresh when the answers change.
        agree: ``(result, cached_value) -> bool``; ``==`` by default. If it raises, the answers disagree.
        seed: Seed of the random draws (tests); the system's entropy by default.

    Raises:
        ConfigError: An argument is out of range, naming it.
    """

    __slots__ = ("_agree", "_outcomes", "_random", "checks", "disagreements", "max_error", "min_rate", "window")

    def __init__(self, max_error: float = 0.02, *, window: int | None = None, min_rate: float = 0.01,
                 agree: Callable[[Any, Any], bool] | None = None, seed: int | None = None) -> None:
        if (isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not math.isfinite(max_error)
                or not 0.0 < max_error < 1.0):
            raise ConfigError("max_error", max_error, "expected a share in (0, 1), e.g. 0.02")
        if window is None:
            window = max(10, math.ceil(1.0 / max_error))
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError("window", window, "expected a positive number of checks")
        if window + 2 <= 1.0 / max_error:  # even a window of agreements would keep the estimate above max_error
            raise ConfigError("window", window, f"too short for max_error={max_error}: a window of n agreeing "
                              f"checks estimates 1/(n+2), so it needs at least {math.floor(1.0 / max_error) - 1}")
        if (isinstance(min_rate, bool) or not isinstance(min_rate, (int, float)) or not math.isfinite(min_rate)
                or not 0.0 <= min_rate <= 1.0):
            raise ConfigError("min_rate", min_rate, "expected a probability in [0, 1]")
        if agree is not None and not callable(agree):
            raise ConfigError("agree", agree, "expected a function (result, cached_value) -> bool")
        self.max_error = float(max_error)
        self.window = window
        self.min_rate = float(min_rate)
        self._agree = agree if agree is not None else _equal
        self._random = random.Random(seed)
        self._outcomes: deque[bool] = deque(maxlen=window)
        self.checks = 0
        """Would-be hits checked so far."""
        self.disagreements = 0
        """Checks whose cached answer disagreed with the function's."""

    @property
    def estimated_error(self) -> float:
        """The estimated share of would-be hits whose cached answer disagrees with the function's."""
        outcomes = self._outcomes
        return (outcomes.count(False) + 1) / (len(outcomes) + 2)

    @property
    def rate(self) -> float:
        """The probability that the next would-be hit is checked."""
        return min(1.0, max(self.min_rate, 1.0 - self.max_error / self.estimated_error))

    def should_check(self) -> bool:
        """Draw whether to check this would-be hit."""
        rate = self.rate
        return rate >= 1.0 or (rate > 0.0 and self._random.random() < rate)

    def observe(self, result: Any, cached: Any) -> bool:
        """Record a check: whether ``cached`` (the would-be answer) agrees with ``result`` (the function's)."""
        try:
            agreed = bool(self._agree(result, cached))
        except Exception:  # an answer that cannot be compared is not one to serve
            agreed = False
        self._outcomes.append(agreed)
        self.checks += 1
        if not agreed:
            self.disagreements += 1
        return agreed

    def __repr__(self) -> str:
        return (f"AnswerAgreement(max_error={self.max_error}, window={self.window}, min_rate={self.min_rate}, "
                f"rate={self.rate:.3f})")
