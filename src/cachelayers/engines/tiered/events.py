"""Messages of the invalidation channel: sealing and opening them, replay protection, coalesced clears.

Without a secret a message is msgpack ``[sender, kind, items]``. With ``Settings.secret`` it is
``[sender, kind, items, timestamp_ms, nonce, mac]``: ``mac`` is a keyed BLAKE2b (160 bits, a key derived from
the secret for this purpose only) over the channel name, sender, kind, items, timestamp and nonce. A receiver
with the secret drops, and counts, a message that is

* **unsigned** (the three-item form, or not msgpack at all),
* **forged** (its MAC does not match),
* **expired** (its timestamp is more than `WINDOW` seconds from the receiver's clock), or
* **replayed** (its ``(sender, nonce)`` was accepted before, within the window).

The ``#<seq>:`` prefix of an invalidation published with its epoch is assigned by Redis inside the script
that publishes the sealed message (see `epochs`), so it is outside the MAC; anyone who can write to Redis can
change the epochs hash those numbers come from anyway (see the threat-model page).

"Clear everything" messages from other processes are coalesced (`ClearGate`): the first is applied at once,
those that follow within `Events.clear_interval` are applied as one clear when it has passed. A flood of
valid clears thus empties the memory tier at most once per interval.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import Any, Final

import msgpack

from cachelayers import audit

__all__ = ["WINDOW", "ClearGate", "EventStats", "Events"]

WINDOW: Final = 30.0
"""Seconds a signed message's timestamp may differ from the receiver's clock."""
_PERSON: Final = b"cl-events-v1"
_MAC_SIZE: Final = 20
_SWEEP_EVERY: Final = 1024


class EventStats:
    """Counters of the invalidation channel, shown in the pub/sub tier's `tier_stats` entry."""

    __slots__ = ("clears_applied", "clears_coalesced", "events_expired", "events_forged", "events_received",
                 "events_replayed", "events_unsigned")

    def __init__(self) -> None:
        self.events_received = 0
        self.events_forged = 0
        self.events_unsigned = 0
        self.events_replayed = 0
        self.events_expired = 0
        self.clears_applied = 0
        self.clears_coalesced = 0

    @property
    def events_dropped(self) -> int:
        """Messages refused: unsigned, forged, expired or replayed."""
        return self.events_forged + self.events_unsigned + self.events_replayed + self.events_expired

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict, with their sum ``events_dropped``."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out["events_dropped"] = self.events_dropped
        return out


class Events:
    """Seals the messages this engine publishes and opens those it receives.

    Args:
        channel: The channel name (bound into every MAC: a message of one prefix is refused on another).
        sender: This engine's random id.
        secret: ``Settings.secret``; ``None`` sends and accepts unsigned messages.
        clear_interval: Seconds between two clears of the memory tier caused by other processes' messages.
    """

    __slots__ = ("_key", "_sweep", "channel", "clear_interval", "clock", "seen", "sender", "stats", "window")

    def __init__(self, channel: str, sender: bytes, secret: str | bytes | None, clear_interval: float) -> None:
        self.channel = channel
        self.sender = sender
        raw = secret.encode() if isinstance(secret, str) else secret
        self._key = None if raw is None else hashlib.blake2b(raw, digest_size=32, person=_PERSON).digest()
        self.clock: Callable[[], float] = time.time
        """Wall clock for timestamps (tests move it)."""
        self.window = WINDOW
        self.clear_interval = clear_interval
        self.seen: dict[tuple[bytes, bytes], float] = {}
        """``(sender, nonce)`` of accepted signed messages, with the time they may be forgotten."""
        self._sweep = 0
        self.stats = EventStats()

    @property
    def signed(self) -> bool:
        """Whether messages are signed (a secret is set)."""
        return self._key is not None

    def _mac(self, sender: bytes, kind: str, items: Any, stamp: int, nonce: bytes) -> bytes:
        assert self._key is not None
        body = msgpack.packb([self.channel, sender, kind, items, stamp, nonce], use_bin_type=True)
        return hashlib.blake2b(body, key=self._key, digest_size=_MAC_SIZE).digest()

    def seal(self, kind: str, items: Any) -> bytes:
        """The message announcing ``kind`` (``"k"``, ``"t"``, ``"c"`` or ``"l"``) of ``items``."""
        if self._key is None:
            return msgpack.packb([self.sender, kind, items], use_bin_type=True)  # type: ignore[no-any-return]
        stamp = int(self.clock() * 1000)
        nonce = os.urandom(12)
        mac = self._mac(self.sender, kind, items, stamp, nonce)
        return msgpack.packb([self.sender, kind, items, stamp, nonce, mac],  # type: ignore[no-any-return]
                             use_bin_type=True)

    def open(self, data: bytes) -> tuple[bytes, str, Any] | None:
        """``(sender, kind, items)`` of a received message, or ``None`` when it is refused (counted).

        Raises:
            ValueError: The message is not one at all (without a secret: logged by the listener).
        """
        stats = self.stats
        stats.events_received += 1
        try:
            fields = msgpack.unpackb(data, raw=False)
        except Exception:
            if self._key is None:
                raise
            stats.events_unsigned += 1
            return None
        if self._key is None:
            sender, kind, items = fields[:3]
            return sender, kind, items
        if not isinstance(fields, list) or len(fields) != 6:
            stats.events_unsigned += 1
            return None
        sender, kind, items, stamp, nonce, mac = fields
        if not (isinstance(sender, bytes) and isinstance(kind, str) and isinstance(stamp, int)
                and isinstance(nonce, bytes) and isinstance(mac, bytes)):
            stats.events_forged += 1
            return None
        if not hmac.compare_digest(mac, self._mac(sender, kind, items, stamp, nonce)):
            stats.events_forged += 1
            return None
        now = self.clock()
        if abs(now - stamp / 1000) > self.window:
            stats.events_expired += 1
            return None
        ident = (sender, nonce)
        seen = self.seen
        if ident in seen:
            stats.events_replayed += 1
            return None
        seen[ident] = stamp / 1000 + self.window
        self._sweep += 1
        if self._sweep >= _SWEEP_EVERY:
            self._sweep = 0
            for old in [k for k, until in seen.items() if until < now - self.window]:
                del seen[old]
        return sender, kind, items


class ClearGate:
    """Applies other processes' clears at most once per interval: the first at once, the rest coalesced.

    Args:
        events: Where the interval and the counters are.
        apply: Clears the memory tier (and records the clear).
        later: Runs a coroutine function in the background.
        sleep: ``anyio.sleep`` (or a test double).
    """

    __slots__ = ("apply", "events", "last", "later", "monotonic", "pending", "sleep")

    def __init__(self, events: Events, apply: Callable[[], None], later: Callable[[Callable[[], Any]], None],
                 sleep: Callable[[float], Any], monotonic: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.apply = apply
        self.later = later
        self.sleep = sleep
        self.monotonic = monotonic
        self.last = float("-inf")
        self.pending = False

    def clear(self) -> None:
        """A clear arrived from another process."""
        interval = self.events.clear_interval
        now = self.monotonic()
        if now - self.last >= interval and not self.pending:
            self.last = now
            self._apply()
            return
        self.events.stats.clears_coalesced += 1
        if not self.pending:
            self.pending = True
            self.later(self._trailing)

    async def _trailing(self) -> None:
        try:
            wait = self.last + self.events.clear_interval - self.monotonic()
            if wait > 0:
                await self.sleep(wait)
        finally:
            self.pending = False
        self.last = self.monotonic()
        self._apply()

    def _apply(self) -> None:
        stats = self.events.stats
        stats.clears_applied += 1
        self.apply()
        audit.clear(["memory"], "ok", prefix=self.events.channel.removesuffix("~events"), origin="remote")
