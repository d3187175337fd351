"""429s from the gateway's own rate limiter: the client waits what Retry-After says (bounded
by max_retry_wait) and tries again; out of retries it raises RateLimited with the hint.

The gateway here is in process (the app with its lifespan, over httpx's ASGI transport,
which AsyncClient accepts as ``transport=``): its rate limits are settings of the app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from gateway.client import AsyncClient, RateLimited
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

CANARY = "CANARY-retry-value"


def with_gateway(settings_factory, body: Callable[[object], Awaitable[None]]) -> None:
    """Run ``body(app)`` against a gateway allowing one issue a second per principal."""

    async def main() -> None:
        app = create_app(settings_factory(rate_per_action={"credentials:issue": [1, 1]}))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
                r = await admin.put("/v1/secrets/local/retry/key", json={"data": {"api_key": CANARY}})
                assert r.status_code in (200, 201), r.text
                r = await admin.put("/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                                                   "secret": "local/retry/key", "resources": ["*"]})
                assert r.status_code in (200, 201), r.text
            await asyncio.wait_for(body(app), 30)

    # Not asyncio.run: it would wait for the default executor's threads, which the app's
    # store leaves idle for a while after shutdown.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def client(app, **kw) -> AsyncClient:
    return AsyncClient("http://gateway", token=ADMIN_TOKEN, transport=httpx.ASGITransport(app=app), margin=1, **kw)


def test_a_429_is_retried_after_its_retry_after(settings_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="credgate.client")

    async def body(app) -> None:
        async with client(app) as c:
            await c.credentials("vendor", "a", ttl=30)
            caplog.clear()
            durations = []
            for resource in ("b", "c"):  # the bucket is empty: 429, then a retry (on a slow machine it may
                started = time.monotonic()  # have refilled before "b": then "c" is the one refused)
                cred = await c.credentials("vendor", resource, ttl=30)
                durations.append(time.monotonic() - started)
        assert cred["api_key"] == CANARY
        assert caplog.text.count("429 (rate_limited), retrying in 1.0s") >= 1, caplog.text
        assert max(durations) >= 0.8, durations  # the refused call waited as Retry-After said
        assert CANARY not in caplog.text

    with_gateway(settings_factory, body)


def test_retries_are_bounded_and_the_error_is_typed(settings_factory) -> None:
    async def body(app) -> None:
        async with client(app, retries=0) as c:
            with pytest.raises(RateLimited) as limited:
                await c.credentials("vendor", "a", ttl=30)
        assert limited.value.status == 429 and limited.value.retry_after and limited.value.retry_after >= 1
        assert limited.value.code == "rate_limited" and CANARY not in str(limited.value)
        async with client(app, retries=2, max_retry_wait=0.05) as c:
            started = time.monotonic()
            with pytest.raises(RateLimited):
                await c.credentials("vendor", "c", ttl=30)
            assert time.monotonic() - started < 0.9  # each wait cut to max_retry_wait, not Retry-After

    with_gateway(settings_factory, body)
