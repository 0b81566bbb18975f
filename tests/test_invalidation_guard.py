"""The guarded invalidation API: ``Settings.invalidation_limit`` waits or raises `RateLimitExceeded` before
anything is removed; the CLI and the admin endpoint share the path (and its audit records)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

import cachelayers
from cachelayers import ConfigError, RateLimitExceeded, Settings, TieredCache
from cachelayers.cli import main
from cachelayers.integrations.fastapi import invalidation_endpoint

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("value", "field"), [
    ("lots", "invalidation_limit"), ("5/second;10/minute", "invalidation_limit"), (3, "invalidation_limit"),
    ("maybe", "invalidation_limit_wait"), (-1, "channel_clear_interval"), ("soon", "channel_clear_interval"),
])
def test_bad_guard_settings_name_their_field(value: Any, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(**{field: value})
    assert caught.value.field == field


def test_the_env_variable_is_read_and_checked() -> None:
    settings = Settings.from_env({"CACHELAYERS_INVALIDATION_LIMIT": "100/second",
                                  "CACHELAYERS_INVALIDATION_LIMIT_WAIT": "true"})
    assert settings.invalidation_limit == "100/second"
    assert settings.invalidation_limit_wait is True
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CACHELAYERS_INVALIDATION_LIMIT": "fast"})
    assert caught.value.field == "CACHELAYERS_INVALIDATION_LIMIT"


async def test_over_the_limit_an_invalidation_raises_and_removes_nothing() -> None:
    cache = TieredCache(Settings(invalidation_limit="2/minute"))
    try:
        await cache.set("a", 1, tags=["t"])
        await cache.invalidate_tags("other")
        await cache.delete("nothing")
        with pytest.raises(RateLimitExceeded) as caught:
            await cache.invalidate_tags("t")
        assert caught.value.retry_after is not None
        assert await cache.get("a") == 1  # refused before anything was removed
        with pytest.raises(RateLimitExceeded):
            await cache.clear()
        assert await cache.get("a") == 1
    finally:
        await cache.aclose()


async def test_without_a_limit_nothing_is_refused() -> None:
    cache = TieredCache(Settings())
    try:
        for i in range(200):
            await cache.delete(f"k{i}")
        assert cache.guard.limiter is None
    finally:
        await cache.aclose()


async def test_with_wait_an_invalidation_over_the_limit_waits_until_admitted() -> None:
    cache = TieredCache(Settings(invalidation_limit="1/second", invalidation_limit_wait=True))
    try:
        await cache.set("a", 1, tags=["t"])
        await cache.invalidate_tags("first")
        done = anyio.Event()

        async def second() -> None:
            await cache.invalidate_tags("t")
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.05)
            assert not done.is_set()  # waiting for room, not refused
            assert await cache.get("a") == 1
            await done.wait()
        assert await cache.get("a") is None
    finally:
        await cache.aclose()


def test_the_cli_is_limited_too(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHELAYERS_INVALIDATION_LIMIT", "1/minute")
    status = main(["invalidate", "--tag", "a", "--namespace", "app.f", "--actor", "ops"])
    _, err = capsys.readouterr()
    assert status == 1
    assert "invalidation_limit reached: not invalidated: namespace 'app.f'" in err


def test_the_cli_records_its_actor(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cachelayers.audit"):
        assert main(["invalidate", "--tag", "a", "--actor", "ops"]) == 0
    audits = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert [(a["event"], a["items"], a["actor"], a["outcome"]) for a in audits] == [("invalidate", ["a"], "ops",
                                                                                       "ok")]


def _app(cache: TieredCache) -> Starlette:
    def authorize(request: Request) -> str | None:
        return "alice" if request.headers.get("authorization") == "Bearer admin-token" else None

    app = Starlette()
    app.add_route("/admin/invalidate", invalidation_endpoint(authorize, cache), methods=["POST"])
    return app


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_admin_endpoint_through_a_real_asgi_app(caplog: pytest.LogCaptureFixture) -> None:
    cache = TieredCache(Settings(invalidation_limit="2/minute"))
    await cache.set("a", 1, tags=["t"])
    await cache.set("b", 2)
    headers = {"authorization": "Bearer admin-token"}
    transport = httpx.ASGITransport(app=_app(cache))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            forbidden = await client.post("/admin/invalidate", json={"tags": ["t"]})
            assert forbidden.status_code == 403
            assert await cache.get("a") == 1
            bad = await client.post("/admin/invalidate", json={"tags": "t"}, headers=headers)
            assert bad.status_code == 400
            with caplog.at_level(logging.INFO, logger="cachelayers.audit"):
                ok = await client.post("/admin/invalidate", json={"tags": ["t"]}, headers=headers)
            assert ok.status_code == 200
            assert ok.json()["done"] == ["tag 't'"]
            assert await cache.get("a") is None
            assert await cache.get("b") == 2
            await client.post("/admin/invalidate", json={"tags": ["x"]}, headers=headers)
            limited = await client.post("/admin/invalidate", json={"clear": True}, headers=headers)
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.json()["refused"] == ["everything"]
            assert await cache.get("b") == 2
    finally:
        await cache.aclose()
    audits = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert audits[0]["actor"] == "alice"
    assert audits[0]["items"] == ["t"]


async def test_the_default_engine_is_guarded_too() -> None:
    """A decorated function's ``invalidate_all`` goes through the same limit (the engine of the settings)."""
    cachelayers.configure(invalidation_limit="1/minute")
    computed: list[int] = []

    @cachelayers.multilevel_cached
    async def f(x: int) -> int:
        computed.append(x)
        return x

    await f(1)
    await f.invalidate_all()
    await f(1)
    with pytest.raises(RateLimitExceeded):
        await f.invalidate_all()
    await f(1)
    assert computed == [1, 1]  # the refused invalidation removed nothing
