"""Hygiene of issue 12: passwords never shown, private files, key prefixes that cannot reach each other, pickle
only with a secret."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

import cachelayers
from cachelayers import ConfigError, Settings, TieredCache, multilevel_cached, semantic_cached
from cachelayers.backends import BackendURL
from cachelayers.cli import main
from cachelayers.metrics import StateLog

PASSWORD = "hunter2-very-secret"
SECRET = "a-secret-of-32-bytes-for-signing"


# -- passwords ------------------------------------------------------------------------------------------------


def test_settings_never_show_url_passwords_or_keys() -> None:
    settings = Settings(tiers={"memory": "memory://", "redis": f"redis://user:{PASSWORD}@cache.internal:6379/0"},
                        vector_index=f"redis://:{PASSWORD}@vectors.internal:6379/1", secret=SECRET)
    for text in (repr(settings), str(settings), f"{settings}"):
        assert PASSWORD not in text
        assert SECRET not in text
        assert "redis://user:***@cache.internal:6379/0" in text
        assert "redis://:***@vectors.internal:6379/1" in text


def test_backend_urls_never_show_their_password() -> None:
    url = BackendURL.parse(f"rediss://:{PASSWORD}@cache.internal:6380/0?timeout=2s", "tiers['redis']")
    for text in (repr(url), str(url), url.redacted(), f"{url!r}"):
        assert PASSWORD not in text
    assert url.password == PASSWORD  # the driver still gets it
    assert str(url) == "rediss://:***@cache.internal:6380/0?timeout=2s"


@pytest.mark.parametrize("password", ["pa'ss-hunter2", 'pa"ss-hunter2', "pa'ss\"hunter2"])
def test_passwords_with_quotes_are_hidden_whole(password: str) -> None:
    """A quote is a legal character of a URL's password; a repr then quotes the URL with the other quote."""
    settings = Settings(tiers={"memory": "memory://", "redis": f"redis://:{password}@cache.internal:6379/0"},
                        vector_index=f"redis://:{password}@vectors.internal:6379/1")
    url = BackendURL.parse(f"redis://:{password}@cache.internal:6379/0")
    for text in (repr(settings), str(settings), repr(url), url.redacted()):
        assert "hunter2" not in text
    assert url.password == password


@pytest.mark.parametrize("password", ["p@ss-hunter2", "pa ss-hunter2", "pa\tss-hunter2"])
def test_passwords_with_at_or_space_are_refused_without_showing_them(password: str) -> None:
    """redis-py would take them whole, but no message could then hide all of them: percent-encode them."""
    builds: tuple[Callable[[], object], ...] = (
        lambda: Settings(tiers={"redis": f"redis://:{password}@cache.internal:6379/0"}),
        lambda: Settings(vector_index=f"redis://:{password}@vectors.internal:6379/1"),
        lambda: Settings.from_env({"CACHELAYERS_TIERS": f"redis://:{password}@cache.internal:6379/0"}))
    for build in builds:
        with pytest.raises(ConfigError, match="percent-encode") as info:
            build()
        assert "hunter2" not in str(info.value)
        assert "ss" not in str(info.value).split("percent-encode")[0].split("@")[0]


@pytest.mark.parametrize("build", [
    lambda: Settings(tiers={"redis": f"redis://:{PASSWORD}@host:6379/0?bogus=1"}),
    lambda: Settings(tiers={"redis": f"redis://:{PASSWORD}@host:6379/x"}),
    lambda: Settings(vector_index=f"redis://:{PASSWORD}@host:6379/0?nope=1"),
    lambda: Settings(tiers={"x": f"nosuch://:{PASSWORD}@host/0"}),
    lambda: Settings.from_env({"CACHELAYERS_TIERS": f"redis://u:{PASSWORD}@host:6379/0#frag"}),
])
def test_configuration_errors_never_show_url_passwords(build: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert PASSWORD not in str(info.value)
    assert "***" in str(info.value)


def test_failure_logs_never_show_url_passwords(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cachelayers"):
        StateLog().failure("tier 'redis'", ConnectionError(f"cannot reach redis://:{PASSWORD}@host:6379/0"))
    assert caplog.records
    assert PASSWORD not in caplog.text
    assert "redis://:***@host:6379/0" in caplog.text


@pytest.mark.redis
def test_cli_stats_never_shows_url_passwords(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             redis_url: str) -> None:
    address = redis_url.split("://", 1)[1]
    monkeypatch.setenv("CACHELAYERS_TIERS", f"memory://,redis=redis://:{PASSWORD}@{address}")
    monkeypatch.setenv("CACHELAYERS_VECTOR_INDEX", f"redis://:{PASSWORD}@{address}")
    for argv in (["stats"], ["stats", "--json"]):
        main(argv)
        out, err = capsys.readouterr()
        assert "redis://:***@" in out
        assert PASSWORD not in out + err


# -- files --------------------------------------------------------------------------------------------------------


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The usual 022, under which files would be world-readable unless created private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")}


@pytest.mark.anyio
@pytest.mark.usefixtures("usual_umask")
async def test_disk_tier_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = TieredCache(Settings(tiers={"memory": "memory://", "disk": f"disk://{directory}"}))

    @multilevel_cached(cache=cache)
    async def double(x: int) -> int:
        return 2 * x

    assert await double(2) == 4
    found = modes(directory)
    assert {".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".sqlite3.lock"} <= {"." + n.split(".", 1)[1] for n in found}
    assert all(mode == 0o600 for mode in found.values()), found
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    await cache.aclose()


@pytest.mark.anyio
@pytest.mark.usefixtures("usual_umask")
async def test_semantic_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "semantic"
    cachelayers.configure(vector_index=f"usearch://{directory}")

    @semantic_cached(threshold=0.8, name="hygiene.ask")
    async def ask(question: str) -> str:
        return question.upper()

    assert await ask("how do I reset my router") == "HOW DO I RESET MY ROUTER"
    during = modes(directory)
    assert any(name.endswith("-wal") for name in during)
    await ask.aclose()
    after = modes(directory)
    assert any(name.endswith(".usearch") for name in after)
    assert all(mode == 0o600 for mode in {**during, **after}.values()), (during, after)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


# -- key prefixes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", ":", "app:v2:", "app", "a:b", "my app:"])
def test_prefixes_that_could_reach_other_keys_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(key_prefix=prefix)
    assert info.value.field == "key_prefix"


@given(st.text(alphabet="ab:-", min_size=0, max_size=6), st.text(alphabet="ab:-", min_size=0, max_size=6))
def test_no_accepted_prefix_starts_with_another(first: str, second: str) -> None:
    accepted = []
    for prefix in (first, second):
        with contextlib.suppress(ConfigError):
            accepted.append(Settings(key_prefix=prefix).key_prefix)
    if len(accepted) == 2 and accepted[0] != accepted[1]:
        assert not accepted[1].startswith(accepted[0])
        assert not accepted[0].startswith(accepted[1])


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("first", "second"), [("app:", "app:v2:"), ("app:", "app-v2:"), ("cl:", "cl:tenant:")])
async def test_clearing_one_prefix_never_wipes_another_on_redis(redis_url: str, first: str, second: str) -> None:
    """Either the settings refuse the nested prefix, or clearing the first leaves every key of the second."""
    refused: list[str] = []
    for prefix in (first, second):
        with contextlib.suppress(ConfigError):
            Settings(key_prefix=prefix)
            continue
        refused.append(prefix)
    if refused:
        with pytest.raises(ConfigError, match="key_prefix"):
            Settings(key_prefix=refused[0])
        return
    mine = TieredCache(Settings(tiers={"redis": redis_url}, key_prefix=first))
    theirs = TieredCache(Settings(tiers={"redis": redis_url}, key_prefix=second))
    for cache in (mine, theirs):
        for i in range(5):
            assert await cache.set(f"k{i}", i, tags=["t"])
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(match=f"{second}*"))
    assert before
    await mine.clear()
    assert set(client.scan_iter(match=f"{second}*")) == before
    assert [await theirs.get(f"k{i}") for i in range(5)] == list(range(5))
    assert not list(client.scan_iter(match=f"{first}kv:*"))  # the first's own keys did go
    client.close()
    await mine.aclose()
    await theirs.aclose()


# -- pickle ---------------------------------------------------------------------------------------------------


def test_pickle_without_a_secret_is_refused_at_configuration_time() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(allow_pickle=True)
    assert info.value.field == "allow_pickle"
    with pytest.raises(ConfigError):
        Settings.from_env({"CACHELAYERS_ALLOW_PICKLE": "true"})
    assert Settings(allow_pickle=True, secret=SECRET).allow_pickle is True
    assert Settings(allow_pickle=True, encryption_keys={"k": os.urandom(32)}).allow_pickle is True
