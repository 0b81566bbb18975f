"""Audit records: who invalidated or cleared what, integrity failures and configuration changes.

Every record goes to the ``cachelayers.audit`` logger at level INFO (integrity failures at WARNING) with one
attribute ``audit``: a dict of the documented fields (see the audit guide). Values and prompts are never in
it. The actor is taken from a context variable the application sets::

    with cachelayers.audit.actor("alice"):
        await cache.invalidate_tags("prices")

Records are built only when the logger is enabled for their level, and counted by event in `counts` (exported
as ``cachelayers_audit_events`` by `cachelayers.exporters`).

With ``Settings.audit_sample_rate`` above 0, a sample of cache accesses is recorded too (`access`): the engines
then answer calls through their watched path (see `cachelayers.engines.tiered.control`), which is what makes
sampling free when it is off.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from cachelayers.errors import redact_urls

__all__ = ["EVENTS", "SAMPLING", "access", "actor", "clear", "configuration", "counts", "current_actor",
           "integrity_failure", "invalidation", "logger", "on_sampling", "record", "reset_actor", "sample_rate",
           "sampled", "set_actor", "set_random", "set_sample_rate"]

logger: Final = logging.getLogger("cachelayers.audit")
"""The audit logger: attach a handler (a file, syslog, an OpenTelemetry ``LoggingHandler``) to keep records.
It has a `logging.NullHandler`, so that without any handler configured records are not printed to stderr."""
logger.addHandler(logging.NullHandler())

EVENTS: Final = ("invalidate", "clear", "integrity", "config", "access")
"""The values of the ``event`` field."""

_SECRET_FIELDS: Final = frozenset({"secret", "encryption_keys"})
_actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("cachelayers_audit_actor", default=None)
_counts: Counter[str] = Counter()
_counts_lock: Final = threading.Lock()

SAMPLING: Final[list[float]] = [0.0]
"""The access sample rate in force (a one-item list, read by the engines' watched paths): 0 when off."""
_random: list[Callable[[], float]] = [random.random]
_sampling_lock: Final = threading.Lock()
_sampling_listeners: list[Callable[[bool], None]] = []


def set_actor(name: str | None) -> contextvars.Token[str | None]:
    """Set the actor of the records made in this context (a user, a service, a request id).

    Args:
        name: Who acts; ``None`` for nobody in particular.

    Returns:
        A token for `reset_actor`.
    """
    return _actor.set(name)


def reset_actor(token: contextvars.Token[str | None]) -> None:
    """Restore the actor in force before `set_actor` returned ``token``."""
    _actor.reset(token)


@contextlib.contextmanager
def actor(name: str | None) -> Iterator[None]:
    """Make ``name`` the actor of the records made inside the block (``with audit.actor("alice"): ...``)."""
    token = _actor.set(name)
    try:
        yield
    finally:
        _actor.reset(token)


def current_actor() -> str | None:
    """The actor set for this context, or ``None``."""
    return _actor.get()


def counts() -> dict[str, int]:
    """Records made so far in this process, by event (whether or not a handler kept them)."""
    with _counts_lock:
        return dict(_counts)


def record(event: str, message: str, severity: int = logging.INFO, **fields: Any) -> None:
    """Make one audit record (counted even when the logger is disabled).

    Args:
        event: One of `EVENTS`.
        message: The human-readable line (the ``audit`` attribute holds the fields).
        severity: The logging level.
        fields: The event's fields; ``event`` and ``actor`` are added.
    """
    with _counts_lock:
        _counts[event] += 1
    if not logger.isEnabledFor(severity):
        return
    data = {"event": event, "actor": _actor.get(), **fields}
    logger.log(severity, "cachelayers audit: %s", redact_urls(message), extra={"audit": data})


def invalidation(kind: str, items: Iterable[str], tiers: Iterable[str], outcome: str, *, prefix: str,
                 count: int | None = None, error: str | None = None) -> None:
    """Record an invalidation (``kind`` ``"tags"``, ``"keys"`` or ``"namespace"``) and its outcome.

    Args:
        kind: What was invalidated.
        items: The tags, namespaces or storage keys.
        tiers: The tiers it went to.
        outcome: ``"ok"``, ``"queued"`` (did not land everywhere: replayed), ``"refused"`` (rate limit) or
            ``"error"``.
        prefix: The engine's key prefix.
        count: Entries removed, when known.
        error: The error's message, when the outcome is not ``"ok"``.
    """
    listed = list(items)
    record("invalidate", f"invalidate {kind} {listed!r} in {prefix!r}: {outcome}", kind=kind, items=listed,
           tiers=list(tiers), outcome=outcome, prefix=prefix, count=count, error=error)


def clear(tiers: Iterable[str], outcome: str, *, prefix: str, count: int | None = None,
          error: str | None = None, origin: str = "local") -> None:
    """Record a clear of everything under ``prefix`` (``origin`` ``"remote"``: applied from the channel)."""
    record("clear", f"clear {prefix!r} ({origin}): {outcome}", kind="clear", items=[], tiers=list(tiers),
           outcome=outcome, prefix=prefix, count=count, error=error, origin=origin)


def integrity_failure(source: str, what: str, *, reason: str, count: int = 1) -> None:
    """Record entries or messages refused by their integrity check (at WARNING).

    Args:
        source: A tier name, ``"channel"`` or ``"semantic"``.
        what: The storage key, channel or file concerned (never a value).
        reason: Why it was refused.
        count: How many so far.
    """
    record("integrity", f"{reason} in {source} ({what})", logging.WARNING, source=source, target=what,
           reason=reason, count=count)


def configuration(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Record a change of the settings in force: the fields that changed, secrets redacted, URLs hidden."""
    changes: dict[str, Any] = {}
    for name, value in new.items():
        if old is not None and old.get(name) == value:
            continue
        if name in _SECRET_FIELDS:
            changes[name] = "<redacted>" if value else None
        else:
            changes[name] = redact_urls(repr(value))
    record("config", f"settings changed: {', '.join(sorted(changes)) or 'nothing'}", changes=changes)


def sample_rate() -> float:
    """The share of cache accesses recorded (0: none; see `set_sample_rate`)."""
    return SAMPLING[0]


def set_sample_rate(rate: float) -> None:
    """Record ``rate`` of cache accesses from now on (``Settings.audit_sample_rate`` sets it on `configure`).

    When sampling turns on or off, the `on_sampling` listeners are told (the exact cache then switches its
    callers to, or back from, its watched path).

    Args:
        rate: A share in [0, 1].

    Raises:
        ValueError: ``rate`` is outside [0, 1].
    """
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"audit sample rate must be in [0, 1], got {rate!r}")
    with _sampling_lock:
        was = SAMPLING[0] > 0
        SAMPLING[0] = rate
        if was != (rate > 0):
            for listener in list(_sampling_listeners):
                listener(rate > 0)


def on_sampling(listener: Callable[[bool], None]) -> None:
    """Call ``listener(True)`` when access sampling turns on, ``listener(False)`` when it turns off (and
    ``listener(True)`` at once if it is on now)."""
    with _sampling_lock:
        _sampling_listeners.append(listener)
        if SAMPLING[0] > 0:
            listener(True)


def set_random(source: Callable[[], float] | None) -> None:
    """Draw the sampling decisions from ``source`` (a ``random.Random(seed).random``, for tests); ``None``
    restores `random.random`."""
    _random[0] = source if source is not None else random.random


def sampled() -> bool:
    """Draw whether this access is in the sample (always ``False`` when sampling is off)."""
    rate = SAMPLING[0]
    return rate > 0 and (rate >= 1 or _random[0]() < rate)


def access(namespace: str, level: str, decorator: str, *, partition: str | None = None,
           function: str | None = None, tier: str | None = None) -> None:
    """Record one sampled cache access (the caller drew it with `sampled`).

    Args:
        namespace: The function's namespace (the tenant boundary of the exact cache).
        level: How the call was answered: a tier name (``"memory"``, ``"redis"``...), ``"stale"``,
            ``"in-flight"``, ``"exact"``, ``"semantic"``, ``"computed"`` or ``"uncached"``.
        decorator: ``"multilevel_cached"`` or ``"semantic_cached"``.
        partition: For a semantic call, the hex digest of its partition; never a value or an argument.
        function: The function's identity.
        tier: The tier that answered, when one did.
    """
    record("access", f"{decorator} {namespace!r}: {level}", namespace=namespace, partition=partition,
           level=level, decorator=decorator, function=function, tier=tier)
