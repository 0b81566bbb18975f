"""The one settings object, where it comes from, and which one is in force.

`Settings` is immutable and validated when it is made: a bad value raises `ConfigError` naming the field.
It can be built from code, from a mapping (`Settings.from_mapping`) or from ``CACHELAYERS_*`` environment
variables (`Settings.from_env`, the only place the environment is read). `configure` sets the settings in
force; until it is called, the first use reads the environment once, and with no variables set that is the
embedded default: one bounded memory tier.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar, final

from cachelayers import audit
from cachelayers.backends import validate_backend_url
from cachelayers.backends.vectors.options import parse_vector_index
from cachelayers.codec.crypto import parse_encryption_keys, require_cryptography
from cachelayers.durations import parse_duration, parse_ttl
from cachelayers.errors import ConfigError, redact_urls
from cachelayers.validation import flag, limit_windows, positive_int

__all__ = ["DEFAULT_TIERS", "ENV_PREFIX", "PerSettings", "Settings", "SettingsTracker", "configure", "get_settings",
           "reset_settings", "tracker"]

T = TypeVar("T")

ENV_PREFIX: Final = "CACHELAYERS_"
DEFAULT_TIERS: Final = (("memory", "memory://?max_entries=10000&max_bytes=64MiB"),)


def _tiers(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, Mapping):
        pairs = [(str(name), url) for name, url in value.items()]
    elif isinstance(value, Sequence):
        pairs = []
        for item in value:
            if isinstance(item, tuple) and len(item) == 2:
                pairs.append((str(item[0]), item[1]))
            elif isinstance(item, str) and "=" in item.split("://", 1)[0]:
                name, _, url = item.partition("=")
                pairs.append((name.strip(), url.strip()))
            elif isinstance(item, str):
                base = item.split("://", 1)[0].split("+", 1)[0].lower() or "tier"
                name = base
                n = 2
                while any(existing == name for existing, _ in pairs):
                    name = f"{base}{n}"
                    n += 1
                pairs.append((name, item))
            else:
                raise ConfigError("tiers", value, "expected URLs, 'name=url' strings or a mapping of name to URL")
    else:
        raise ConfigError("tiers", value, "expected URLs, 'name=url' strings or a mapping of name to URL")
    if not pairs:
        raise ConfigError("tiers", value, "at least one tier is needed")
    seen: set[str] = set()
    for name, url in pairs:
        if not name or name in seen:
            raise ConfigError("tiers", value, f"tier names must be unique and non-empty, got {name!r} twice")
        seen.add(name)
        if not isinstance(url, str):
            raise ConfigError(f"tiers[{name!r}]", url, "expected a URL string")
        validate_backend_url(url, f"tiers[{name!r}]")
    return tuple(pairs)


def _check_key_prefix(prefix: object) -> None:
    """A prefix is non-empty, ends with ``:`` and holds no other ``:`` (nor whitespace): then no valid prefix
    starts with another, and clearing one configuration's keys never reaches another's (``app:`` would
    reach every key of ``app:v2:``)."""
    if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
        raise ConfigError("key_prefix", prefix, "expected a string without whitespace")
    if not prefix.rstrip(":"):
        raise ConfigError("key_prefix", prefix, "must not be empty: clear() would remove every key of the store, "
                          "including other applications'; use e.g. 'myapp:'")
    if not prefix.endswith(":") or ":" in prefix[:-1]:
        suggestion = prefix.rstrip(":").replace(":", "-") + ":"
        raise ConfigError("key_prefix", prefix, f"must end with ':' and hold no other ':' (e.g. {suggestion!r}), "
                          f"so that no prefix starts with another one and clearing one never removes another's keys")


def _limit_items(text: str) -> dict[str, str]:
    """Parse ``name=limit,name=limit``; an item without a name is an error, never dropped."""
    items: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, spec = part.partition("=")
        if not part:
            continue
        if not sep or not name.strip():
            raise ConfigError("limits", part, "expected name=limit items, e.g. 'llm-rpm=3500/minute'")
        items[name.strip()] = spec.strip()
    return items


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Configuration of cachelayers: which tiers, how keys look, how failures are handled.

    Every field is validated when the object is made. Change settings with `dataclasses.replace` or
    `Settings.with_`, which validate again.

    Attributes:
        tiers: Ordered tiers, fastest first, as ``name -> URL`` (a list of URLs is named after the
            schemes). Schemes: ``memory://?max_entries=&max_bytes=``; ``redis://``, ``rediss://``,
            ``redis+cluster://``, ``unix://`` and ``disk:///path?max_bytes=`` with their extras.
        default_ttl: Lifetime of entries when a decorator gives none, in seconds or ``"1h"``, at most 1000 years
            (`cachelayers.durations.LONGEST`); ``None`` keeps them until evicted.
        key_prefix: Prefix of every storage key, so several applications can share one Redis: non-empty,
            ending with ``:`` and with no other ``:`` (so that no prefix starts with another).
        secret: Key that signs every stored entry (16-64 bytes). Entries not signed with it are never served.
        encryption_keys: Keys that encrypt every entry stored outside the process (AES-256-GCM): Redis and
            disk values, semantic payloads, texts and vectors. ``"kid:base64key,kid2:base64key"`` (32-byte keys),
            a mapping ``{kid: key}`` or ``(kid, key)`` pairs; the first encrypts, all decrypt (rotation).
            Needs the ``encryption`` extra. Never printed.
        allow_pickle: Store values msgpack cannot encode with pickle. Needs ``secret`` or ``encryption_keys``
            (unpickling an entry anyone could write runs their code).
        tier_timeout: Longest wait for one tier operation before it counts as a miss (seconds or ``"250ms"``);
            Redis and disk count the time their server or thread was silent, not time lost to a busy loop.
        breaker_threshold: Consecutive failures of a tier that open its circuit breaker.
        breaker_cooldown: How long an open breaker skips its tier before one probe call (2s: a probe of a
            tier that is still down costs one call a failed attempt; a tier back up is used again quickly).
        strict: Raise cache failures to the caller instead of computing uncached (for tests and debugging).
        vector_index: Where the semantic cache keeps its entries: ``memory://`` (in-process),
            ``usearch:///path`` (on disk, reloaded on start) or ``redis://host:port/db`` (shared by processes).
        limits: Named rate limits, e.g. ``{"llm-rpm": "3500/minute"}``, checked as ``@rate_limited`` checks an
            inline limit (`cachelayers.validation.limit_windows`).
        semantic_max_entries: Entries of every semantically cached function of the process together (all
            functions, all partitions) before the least recently used of them is evicted; 500,000 by default.
        invalidation_limit: How fast this process may invalidate and clear, e.g. ``"100/second"``
            (``None``: unlimited); counted by the library's rate limiter.
        invalidation_limit_wait: Over the limit, wait until admitted instead of raising `RateLimitExceeded`.
        channel_clear_interval: Clears announced by other processes empty this process's memory tier at most
            once per interval (seconds or ``"500ms"``; ``0`` applies each at once): a flood of clears is
            coalesced.
        audit_sample_rate: Share of cache accesses recorded on the ``cachelayers.audit`` logger (namespace,
            partition digest, level, decorator, actor; never a value): a float in [0, 1], 0 (off) by default.
            Process-wide, taken from the settings in force (`configure`).
    """

    tiers: Any = DEFAULT_TIERS
    key_prefix: str = "cl:"
    default_ttl: Any = None
    secret: str | bytes | None = None
    encryption_keys: Any = ()
    allow_pickle: bool = False
    tier_timeout: Any = 0.25
    breaker_threshold: int = 5
    breaker_cooldown: Any = 2.0
    strict: bool = False
    vector_index: str = "memory://"
    limits: Any = dataclasses.field(default_factory=dict)
    semantic_max_entries: int = 500_000
    invalidation_limit: str | None = None
    invalidation_limit_wait: bool = False
    channel_clear_interval: Any = 1.0
    audit_sample_rate: Any = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "tiers", _tiers(self.tiers))
        _check_key_prefix(self.key_prefix)
        if self.default_ttl is not None:
            set_(self, "default_ttl", parse_ttl(self.default_ttl, "default_ttl"))
        if self.secret is not None:
            raw = self.secret.encode() if isinstance(self.secret, str) else self.secret
            if not isinstance(raw, bytes) or not 16 <= len(raw) <= 64:
                raise ConfigError("secret", "<redacted>", "must be 16 to 64 bytes long")
        keys = parse_encryption_keys(self.encryption_keys, "encryption_keys")
        if keys:
            require_cryptography("encryption_keys")
        set_(self, "encryption_keys", keys)
        set_(self, "allow_pickle", flag(self.allow_pickle, "allow_pickle"))
        if self.allow_pickle and self.secret is None and not keys:
            raise ConfigError("allow_pickle", True, "needs a secret (or encryption_keys): without one, anyone who "
                              "can write to a tier makes this process unpickle, and run, what they wrote")
        set_(self, "tier_timeout", parse_duration(self.tier_timeout, "tier_timeout"))
        set_(self, "breaker_threshold", positive_int(self.breaker_threshold, "breaker_threshold", text=True))
        set_(self, "breaker_cooldown", parse_duration(self.breaker_cooldown, "breaker_cooldown"))
        set_(self, "strict", flag(self.strict, "strict"))
        if not isinstance(self.vector_index, str):
            raise ConfigError("vector_index", self.vector_index,
                              "expected 'memory://', 'usearch:///path' or 'redis://host:port/db'")
        parse_vector_index(self.vector_index)
        limits = self.limits
        if isinstance(limits, str):
            limits = _limit_items(limits)
        elif isinstance(limits, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in limits):
            limits = dict(limits)  # the stored form, given back by with_() and dataclasses.replace()
        if not isinstance(limits, Mapping):
            raise ConfigError("limits", self.limits, "expected a mapping of name to a limit like '3500/minute'")
        for name, spec in limits.items():
            limit_windows(spec, f"limits[{name!r}]")  # every check of the rate limiter's parse_limit
        set_(self, "semantic_max_entries", positive_int(self.semantic_max_entries, "semantic_max_entries", text=True))
        set_(self, "limits", tuple(sorted((str(k), str(v).strip()) for k, v in limits.items())))
        self._check_audit_and_guard()

    def _check_audit_and_guard(self) -> None:
        set_ = object.__setattr__
        limit = self.invalidation_limit
        if isinstance(limit, str) and limit.strip().lower() in ("", "none"):
            limit = None
        if limit is not None and len(limit_windows(limit, "invalidation_limit")) != 1:
            raise ConfigError("invalidation_limit", limit, "expected one limit like '100/second' or '10 per minute'")
        set_(self, "invalidation_limit", limit.strip() if limit is not None else None)
        set_(self, "invalidation_limit_wait", flag(self.invalidation_limit_wait, "invalidation_limit_wait"))
        set_(self, "channel_clear_interval", parse_duration(self.channel_clear_interval, "channel_clear_interval",
                                                            allow_zero=True))
        rate = self.audit_sample_rate
        try:
            if isinstance(rate, bool):
                raise ValueError
            rate = float(rate.strip() if isinstance(rate, str) else rate)
        except (TypeError, ValueError):
            raise ConfigError("audit_sample_rate", rate, "expected a number between 0 and 1") from None
        if not 0.0 <= rate <= 1.0:  # NaN fails this too
            raise ConfigError("audit_sample_rate", rate, "expected a number between 0 and 1")
        set_(self, "audit_sample_rate", rate)

    @property
    def tier_urls(self) -> dict[str, str]:
        """The tiers as an ordered ``name -> URL`` dict."""
        return dict(self.tiers)

    @property
    def limit_specs(self) -> dict[str, str]:
        """The named limits as a dict."""
        return dict(self.limits)

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (and validated)."""
        unknown = sorted(set(changes) - _FIELDS)
        if unknown:
            raise ConfigError(unknown[0], changes[unknown[0]], f"unknown setting; known: {', '.join(sorted(_FIELDS))}")
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        current.update(changes)
        return Settings(**current)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Settings:
        """Build settings from a mapping of field names (e.g. a parsed TOML or YAML section).

        Raises:
            ConfigError: A key is not a setting, or a value is invalid.
        """
        unknown = sorted(set(mapping) - _FIELDS)
        if unknown:
            raise ConfigError(unknown[0], mapping[unknown[0]], f"unknown setting; known: {', '.join(sorted(_FIELDS))}")
        return cls(**dict(mapping))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``CACHELAYERS_<FIELD>`` variables (e.g. ``CACHELAYERS_TIERS``).

        ``CACHELAYERS_TIERS`` is comma-separated URLs or ``name=url`` items; ``CACHELAYERS_LIMITS`` is
        comma-separated ``name=limit`` items. Unset variables keep their defaults.

        Raises:
            ConfigError: A ``CACHELAYERS_`` variable is unknown or invalid; the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            field = name[len(ENV_PREFIX):].lower()
            if field not in _FIELDS:
                raise ConfigError(name, value, f"unknown setting; known: "
                                  f"{', '.join(ENV_PREFIX + f.upper() for f in sorted(_FIELDS))}")
            values[field] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            field = exc.field.split("[", 1)[0].split("?", 1)[0]
            raise ConfigError(ENV_PREFIX + field.upper() + exc.field[len(field):], exc.value, exc.reason) from None

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or (f.name == "limits" and not value):
                continue
            if f.name in _SECRET_FIELDS:
                parts.append(f"{f.name}=<redacted>" if f.name == "secret"
                             else f"{f.name}=<{len(value)} redacted>")
            else:
                parts.append(f"{f.name}={redact_urls(repr(value))}")
        return f"Settings({', '.join(parts)})"

    __str__ = __repr__


_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(Settings))
_SECRET_FIELDS: Final = frozenset({"secret", "encryption_keys"})

@final
class SettingsTracker:
    """How engines follow the settings in force: the one public way to notice that they changed.

    ``tracker.generation`` is a number that changes whenever the settings in force do (compare it on a hot
    path: it is a plain attribute); `subscribe` registers a listener called after each change.
    """

    __slots__ = ("_listeners", "generation")

    def __init__(self) -> None:
        self.generation = 0
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the settings in force change (engines drop what they bound)."""
        self._listeners.append(listener)

    def changed(self) -> None:
        """Record a change of the settings in force and tell the listeners (called by this module)."""
        self.generation += 1
        for listener in list(self._listeners):
            listener()


tracker: Final = SettingsTracker()
"""The tracker of the settings in force."""


@final
class PerSettings(Generic[T]):
    """A value made from the settings in force on first use, and made again after they change.

    Args:
        build: Makes the value from the settings in force.
    """

    __slots__ = ("_build", "_generation", "_value")

    def __init__(self, build: Callable[[Settings], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._generation = -1

    def get(self) -> T:
        """Return the value for the settings in force, building it if they changed since the last call."""
        settings = get_settings()  # first, so that reading the environment moves the generation before we look
        value = self._value
        if value is None or self._generation != tracker.generation:
            value = self._value = self._build(settings)
            self._generation = tracker.generation
        return value

    def current(self) -> T | None:
        """The value built last, if any, without building one."""
        return self._value


_lock = threading.Lock()
_current: Settings | None = None


def configure(settings: Settings | Mapping[str, Any] | None = None, /, **changes: Any) -> Settings:
    """Set the settings in force and return them.

    ``configure(Settings(...))`` replaces them; ``configure({"tiers": [...]})`` builds them from a mapping;
    ``configure(default_ttl="1h")`` changes fields of the current settings. Functions already decorated
    pick up the new settings on their next call.
    """
    global _current
    if settings is None:
        new = get_settings().with_(**changes)
    else:
        new = settings if isinstance(settings, Settings) else Settings.from_mapping(settings)
        if changes:
            new = new.with_(**changes)
    with _lock:
        old, _current = _current, new
    tracker.changed()
    audit.set_sample_rate(new.audit_sample_rate)
    audit.configuration(None if old is None else _audit_view(old), _audit_view(new))
    return new


def _audit_view(settings: Settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def get_settings() -> Settings:
    """Return the settings in force, reading ``CACHELAYERS_*`` from the environment on first use."""
    global _current
    current = _current
    if current is None:
        with _lock:
            if _current is None:
                _current = Settings.from_env()
                tracker.generation += 1
                audit.set_sample_rate(_current.audit_sample_rate)
            current = _current
    return current


def reset_settings() -> None:
    """Forget the configured settings; the next use reads the environment again (for tests)."""
    global _current
    with _lock:
        _current = None
    tracker.changed()
    audit.set_sample_rate(0.0)
