"""Settings: one immutable object from code, a mapping or the environment; the one in force; the registry."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cachelayers import (
    Backend,
    ConfigError,
    MissingDependencyError,
    Settings,
    StoreItem,
    configure,
    get_settings,
    register_backend,
    reset_settings,
)
from cachelayers.backends import create_backend, unregister_backend
from cachelayers.settings import DEFAULT_TIERS, PerSettings, tracker

ROOT = Path(__file__).resolve().parent.parent
SECRET = "correct-horse-battery-staple-42"


def test_defaults_are_the_embedded_memory_tier() -> None:
    """No configuration at all means one bounded memory tier and conservative failure handling."""
    settings = Settings()
    assert settings.tiers == DEFAULT_TIERS
    assert settings.tier_urls == {"memory": "memory://?max_entries=10000&max_bytes=64MiB"}
    assert settings.default_ttl is None
    assert settings.secret is None
    assert settings.allow_pickle is False
    assert settings.strict is False
    assert settings.breaker_threshold == 5
    assert repr(settings) == "Settings()"


def test_values_are_normalised() -> None:
    """Durations become seconds, limits a sorted tuple, tiers ``(name, url)`` pairs named after their scheme."""
    settings = Settings(tiers=["memory://", "memory://?max_entries=5", "redis://localhost:6379/0"],
                        default_ttl="1h", tier_timeout="250ms", breaker_cooldown=30,
                        limits={"tpm": "90000/minute", "rpm": "3500/minute"})
    assert settings.tiers == (("memory", "memory://"), ("memory2", "memory://?max_entries=5"),
                              ("redis", "redis://localhost:6379/0"))
    assert settings.default_ttl == 3600.0
    assert settings.tier_timeout == 0.25
    assert settings.breaker_cooldown == 30.0
    assert settings.limits == (("rpm", "3500/minute"), ("tpm", "90000/minute"))
    assert settings.limit_specs == {"rpm": "3500/minute", "tpm": "90000/minute"}


def test_settings_are_immutable_and_copies_are_validated() -> None:
    """Fields cannot be assigned; ``with_`` and ``dataclasses.replace`` validate the copy."""
    settings = Settings(limits={"rpm": "10/second"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.default_ttl = 5  # type: ignore[misc]
    assert settings.with_(default_ttl="2m").default_ttl == 120.0
    assert settings.with_(default_ttl="2m").limits == settings.limits
    assert dataclasses.replace(settings, strict=True).strict is True
    with pytest.raises(ConfigError, match="default_ttl"):
        settings.with_(default_ttl=-1)
    assert Settings(default_ttl=60) == Settings(default_ttl="1m")


def test_from_mapping() -> None:
    """A parsed config file section builds the same settings as code."""
    mapping: dict[str, Any] = {"tiers": {"hot": "memory://?max_entries=100"}, "key_prefix": "app:",
                               "default_ttl": "90s", "limits": {"rpm": "60/minute"}}
    assert Settings.from_mapping(mapping) == Settings(**mapping)


def test_from_env() -> None:
    """Every field can come from a ``CACHELAYERS_*`` variable; other variables are ignored."""
    environ = {
        "CACHELAYERS_TIERS": "hot=memory://?max_entries=100, memory://?max_entries=5",
        "CACHELAYERS_KEY_PREFIX": "svc:",
        "CACHELAYERS_DEFAULT_TTL": "90s",
        "CACHELAYERS_SECRET": SECRET,
        "CACHELAYERS_ALLOW_PICKLE": "no",
        "CACHELAYERS_TIER_TIMEOUT": "100ms",
        "CACHELAYERS_BREAKER_THRESHOLD": "3",
        "CACHELAYERS_BREAKER_COOLDOWN": "1m",
        "CACHELAYERS_STRICT": "true",
        "CACHELAYERS_LIMITS": "rpm=3500/minute,tpm=90000/minute",
        "PATH": "/usr/bin",
        "CACHELAYERSX_TIERS": "ignored",
    }
    settings = Settings.from_env(environ)
    assert settings.tiers == (("hot", "memory://?max_entries=100"), ("memory", "memory://?max_entries=5"))
    assert settings.key_prefix == "svc:"
    assert settings.default_ttl == 90.0
    assert settings.secret == SECRET
    assert settings.allow_pickle is False
    assert settings.tier_timeout == 0.1
    assert settings.breaker_threshold == 3
    assert settings.breaker_cooldown == 60.0
    assert settings.strict is True
    assert settings.limit_specs == {"rpm": "3500/minute", "tpm": "90000/minute"}
    assert Settings.from_env({}) == Settings()


def test_get_settings_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment is read on first use (and again only after a reset)."""
    monkeypatch.setenv("CACHELAYERS_DEFAULT_TTL", "5m")
    assert get_settings().default_ttl == 300.0
    monkeypatch.setenv("CACHELAYERS_DEFAULT_TTL", "10m")
    assert get_settings().default_ttl == 300.0
    reset_settings()
    assert get_settings().default_ttl == 600.0


def test_configure_forms_and_listeners() -> None:
    """``configure`` takes settings, a mapping or field changes, and tells listeners each time."""
    calls: list[int] = []
    tracker.subscribe(lambda: calls.append(tracker.generation))
    before = tracker.generation
    replaced = configure(Settings(key_prefix="a:"))
    assert get_settings() is replaced
    assert configure({"key_prefix": "b:"}).key_prefix == "b:"
    changed = configure(default_ttl="1h")
    assert (changed.key_prefix, changed.default_ttl) == ("b:", 3600.0)
    assert configure(Settings(), strict=True).strict is True
    assert len(calls) == 4
    assert tracker.generation == before + 4
    reset_settings()
    assert get_settings() == Settings()


def test_per_settings_values_are_remade_after_a_change() -> None:
    """A `PerSettings` value is built once per settings in force and again after `configure`."""
    built: list[Settings] = []

    def build(settings: Settings) -> int:
        built.append(settings)
        return len(built)

    value = PerSettings(build)
    assert value.current() is None
    configure(Settings(key_prefix="p:"))
    assert value.get() == 1
    assert value.get() == 1
    assert built == [get_settings()]
    configure(key_prefix="q:")
    assert value.get() == 2
    assert built[-1].key_prefix == "q:"
    assert value.current() == 2
    reset_settings()


def test_repr_hides_the_secret_and_shows_what_differs() -> None:
    """The repr never shows the secret and lists only non-default fields."""
    settings = Settings(secret=SECRET, default_ttl="1m", tiers={"hot": "memory://"})
    text = repr(settings)
    assert SECRET not in text
    assert "secret=<redacted>" in text
    assert "default_ttl=60.0" in text
    assert "key_prefix" not in text
    assert SECRET not in str(settings)


# -- backend registry ------------------------------------------------------------------------------------------


class NullBackend(Backend):
    """A backend that stores nothing, registered under a custom scheme."""

    schemes = ("null",)
    options = frozenset({"flavour"})

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None] * len(keys)

    async def set_many(self, items: Sequence[StoreItem]) -> None:
        return None

    async def delete_many(self, keys: Sequence[str]) -> None:
        return None

    async def delete_tags(self, tags: Sequence[str]) -> None:
        return None

    async def clear(self) -> None:
        return None


@pytest.fixture
def scratch_schemes() -> Iterator[None]:
    """Forget the schemes a test registers."""
    yield
    for scheme in ("null", "fancy"):
        unregister_backend(scheme)


@pytest.mark.usefixtures("scratch_schemes")
def test_third_party_backends_register_by_scheme() -> None:
    """A registered scheme is validated and built like the built-in ones; its options are checked."""
    register_backend("null", f"{__name__}:NullBackend")
    settings = Settings(tiers={"memory": "memory://", "void": "null://?flavour=plain"})
    backend = create_backend(settings.tier_urls["void"])
    assert isinstance(backend, NullBackend)
    assert backend.url.options == {"flavour": "plain"}
    with pytest.raises(ConfigError, match="unknown option"):
        Settings(tiers={"void": "null://?colour=red"})
    register_backend("null", "cachelayers.settings:Settings")
    with pytest.raises(ConfigError, match="not a Backend subclass"):
        Settings(tiers={"void": "null://"})


@pytest.mark.usefixtures("scratch_schemes")
def test_missing_driver_names_the_extra() -> None:
    """A scheme whose driver is not installed fails at configuration, saying what to install."""
    register_backend("fancy", f"{__name__}:NullBackend", driver="no_such_driver_module_x", extra="fancy")
    with pytest.raises(MissingDependencyError, match=r"pip install 'cachelayers\[fancy\]'") as info:
        Settings(tiers={"f": "fancy://host"})
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, ConfigError)
    assert info.value.field == "tiers['f']"


def optional_drivers() -> set[str]:
    """Top-level modules of the packages that only an extra installs (per pyproject.toml)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = {re.split(r"[<>=!~\[ ;]", dep)[0].lower() for dep in project["dependencies"]}
    modules = {"opentelemetry-api": "opentelemetry"}  # distributions whose module has another name
    drivers = set()
    for extra in ("redis", "disk", "semantic", "limits", "prometheus", "opentelemetry"):
        for dep in extras.get(extra, []):
            name = re.split(r"[<>=!~\[ ;]", dep)[0].lower()
            if name not in core and not name.startswith("cachelayers"):
                drivers.add(modules.get(name, name.replace("-", "_")))
    return drivers


def test_drivers_load_lazily() -> None:
    """Importing cachelayers imports no driver that only an extra installs, so the package works without any
    extra; validating a Redis URL does not import redis either."""
    drivers = optional_drivers()
    # The disk tier needs no driver: SQLite is in the standard library.
    assert {"redis", "usearch", "prometheus_client", "opentelemetry"} <= drivers
    code = (
        "import sys, cachelayers\n"
        f"loaded = sorted({sorted(drivers)!r} & sys.modules.keys())\n"
        "assert not loaded, f'import cachelayers imported optional drivers: {loaded}'\n"
        "cachelayers.Settings(tiers={'r': 'redis://localhost:6379/0'})\n"
        "assert 'redis' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]

