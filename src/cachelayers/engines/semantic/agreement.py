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

import cmath
import dataclasses
import inspect
import math
import random
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cachelayers.errors import ConfigError
from cachelayers.validation import positive_int, probability

__all__ = ["AnswerAgreement"]


_REAL = (int, float, np.integer, np.floating)


def _equal(new: Any, cached: Any) -> bool:
    """``new == cached`` as one verdict: arrays (numpy, pandas) whole and only against arrays, mappings, lists and
    tuples item by item, dataclasses and pydantic models whose ``==`` meets arrays inside field by field, NaN
    equal to NaN (a result read back from a store is a new object holding the same value)."""
    if new is cached:
        return True
    new_array, cached_array = isinstance(new, np.ndarray), isinstance(cached, np.ndarray)
    if new_array or cached_array:
        return new_array and cached_array and _arrays_equal(new, cached)
    if isinstance(new, Mapping) and type(new) is type(cached):
        return new.keys() == cached.keys() and all(_equal(v, cached[k]) for k, v in new.items())
    if type(new) in (list, tuple) and type(cached) is type(new):
        return len(new) == len(cached) and all(_equal(a, b) for a, b in zip(new, cached, strict=True))
    if _is_nan(new) and _is_nan(cached):
        return True
    if type(new) is type(cached) and type(new).__module__.partition(".")[0] == "pandas" \
            and callable(getattr(new, "equals", None)):
        return bool(new.equals(cached))  # == compares pandas objects element by element (or raises)
    try:
        if new == cached:
            return True
        ambiguous: Exception | None = None
    except (ValueError, TypeError) as exc:  # an ambiguous verdict: arrays compared inside an object
        if type(new) is not type(cached):
            raise
        ambiguous = exc
    # Unequal or ambiguous: a dataclass or pydantic model is compared again field by field, where arrays
    # compare whole and NaN equals NaN (its own == says a NaN field differs from itself).
    if type(new) is type(cached):
        if dataclasses.is_dataclass(new):
            return all(_equal(getattr(new, f.name), getattr(cached, f.name))
                       for f in dataclasses.fields(new) if f.compare)
        if hasattr(type(new), "model_fields") and hasattr(new, "__dict__"):  # a pydantic model: what its == compares
            return all(_equal(getattr(new, part, None), getattr(cached, part, None))
                       for part in ("__dict__", "__pydantic_extra__", "__pydantic_private__"))
    if ambiguous is not None:
        raise ambiguous  # `AnswerAgreement.observe` counts a disagreement
    return False


def _is_nan(value: Any) -> bool:
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, (complex, np.complexfloating)):
        return cmath.isnan(value)
    return False


def _arrays_equal(new: Any, cached: Any) -> bool:
    try:
        return bool(np.array_equal(new, cached, equal_nan=True))
    except TypeError:  # equal_nan on a dtype without NaN (strings, objects)
        return bool(np.array_equal(new, cached))


class AnswerAgreement:
    """Check would-be semantic hits by running the function, often enough to keep wrong answers rare.

    Pass one as ``semantic_cached(agreement=...)``. A would-be hit (a candidate that passed the threshold, the
    margin and the verifier) is *checked* with probability `rate`: the function runs and its result is returned,
    and ``agree(result, cached_value)`` tells whether the cached answer would have been right. A result that
    disagrees is stored as an entry of its own; one that agrees is not (the entry that agreed is marked used).
    The rate is ``1 - max_error / e``, where ``e`` estimates the share of would-be hits that disagree, over the
    last ``window`` checks with one agreeing and one disagreeing check assumed a priori: a cold cache checks
    nearly everything (96 % at ``max_error=0.02``), a cache whose checks keep agreeing checks ``min_rate``.

    What is bounded is the share of *would-be hits* served wrongly, about ``max_error`` once the estimate has
    settled: checks are drawn at random, so the answers served are wrong as often as would-be hits are (where
    half of them are wrong, about 4 % of would-be hits are served and half of those are wrong).

    Use it where the function's answers can be compared: a deterministic function, or an ``agree`` that compares
    what matters (the message text of a completion, not its id and timestamp). With an ``agree`` that never
    holds, about 98 % of would-be hits are checked and the other ~2 % are still served (wrongly, by that
    ``agree``): the cache then saves next to nothing.

    The estimate is the instance's state, in this process: a new process starts cold. An instance serves one
    decorated function (a second is refused).

    Args:
        max_error: The share of would-be hits allowed to disagree when served, in ``(0, 1)``.
        window: How many of the latest checks the estimate looks at: ``max(10, ceil(1 / max_error))`` by
            default. At least ``1 / max_error - 2``, so that a window of agreements brings the rate down to
            ``min_rate``.
        min_rate: The least probability of checking a would-be hit, in ``[0, 1]`` (1 % by default): keeps the
            estimate fresh when the answers change.
        agree: ``(result, cached_value) -> bool``, a plain function. By default ``==``, with numpy arrays and
            pandas objects compared whole (also inside mappings, lists, tuples, dataclasses and pydantic
            models), an array equal only to an array, and NaN equal to NaN. If it raises, the answers disagree
            and the error is logged (`error` keeps the latest).
        seed: Seed of the random draws (tests); the system's entropy by default.

    Raises:
        ConfigError: An argument is out of range, or ``agree`` is an async function, naming it.
    """

    __slots__ = ("_agree", "_outcomes", "_owner", "_random", "checks", "disagreements", "error", "max_error",
                 "min_rate", "window")

    def __init__(self, max_error: float = 0.02, *, window: int | None = None, min_rate: float = 0.01,
                 agree: Callable[[Any, Any], bool] | None = None, seed: int | str | bytes | None = None) -> None:
        if (isinstance(max_error, bool) or not isinstance(max_error, _REAL) or not math.isfinite(max_error)
                or not 0.0 < max_error < 1.0):
            raise ConfigError("max_error", max_error, "expected a share in (0, 1), e.g. 0.02")
        window = max(10, math.ceil(1.0 / max_error)) if window is None else positive_int(window, "window")
        if window + 2 < 1.0 / max_error:  # even a window of agreements would keep the estimate above max_error
            raise ConfigError("window", window, f"too short for max_error={max_error}: a window of n agreeing "
                              f"checks estimates 1/(n+2), so it needs at least {math.ceil(1.0 / max_error) - 2}")
        min_rate = probability(min_rate, "min_rate")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, str, bytes))):
            raise ConfigError("seed", seed, "expected an int, a str or bytes (or None for the system's entropy)")
        if agree is not None and not callable(agree):
            raise ConfigError("agree", agree, "expected a function (result, cached_value) -> bool")
        if agree is not None and (inspect.iscoroutinefunction(agree)
                                  or inspect.iscoroutinefunction(type(agree).__call__)):
            raise ConfigError("agree", agree, "expected a plain function (result, cached_value) -> bool, "
                              "not an async one")
        self.max_error = float(max_error)
        self.window = window
        self.min_rate = float(min_rate)
        self._agree = agree if agree is not None else _equal
        self._random = random.Random(seed)
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._owner: weakref.ref[Any] | None = None
        self.checks = 0
        """Would-be hits checked so far."""
        self.disagreements = 0
        """Checks whose cached answer disagreed with the function's."""
        self.error: Exception | None = None
        """What ``agree`` raised at the latest check, if it raised (that check counted as a disagreement)."""

    def claim(self, owner: Any, name: str) -> None:
        """Bind this policy to ``owner`` (a decorated function); refuse a second live one."""
        current = self._owner() if self._owner is not None else None
        if current is not None and current is not owner:
            raise ConfigError("agreement", self, f"already used by {current!r}: give {name} an "
                              "AnswerAgreement of its own (the estimate is per function)")
        self._owner = weakref.ref(owner)

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
        self.error = None
        try:
            verdict: Any = self._agree(result, cached)
            if inspect.isawaitable(verdict):  # an async agree slipped through (a lambda returning a coroutine)
                getattr(verdict, "close", lambda: None)()
                raise TypeError("agree returned an awaitable: it must be a plain function returning a bool")
            agreed = bool(verdict)
        except Exception as exc:  # an answer that cannot be compared is not one to serve
            self.error = exc
            agreed = False
        self._outcomes.append(agreed)
        self.checks += 1
        if not agreed:
            self.disagreements += 1
        return agreed

    def __repr__(self) -> str:
        return (f"AnswerAgreement(max_error={self.max_error}, window={self.window}, min_rate={self.min_rate}, "
                f"rate={self.rate:.3f})")
