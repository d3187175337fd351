"""The store goes away (issue 14, item 1): a PostgreSQL store behind a TCP proxy that starts
refusing (and resets every open connection) answers 503 store_unavailable with Retry-After and
a request id on every route, and recovers by itself when the store is back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.services.tcpproxy import TcpProxy

CANARY = "CANARY-outage-5d1e"


@pytest.fixture
def proxied_store(postgres_url: str) -> tuple[str, TcpProxy]:
    url = make_url(postgres_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    finally:
        proxy.stop()


@pytest.fixture
async def gw(proxied_store, settings_factory) -> AsyncIterator[tuple[httpx.AsyncClient, TcpProxy]]:
    url, proxy = proxied_store
    app = create_app(settings_factory(database_url=url, reaper_enabled=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            yield c, proxy


ROUTES = [
    ("GET", "/v1/secrets/local/o/s", None),
    ("PUT", "/v1/secrets/local/o/t", {"data": {"v": CANARY}}),
    ("GET", "/v1/leases", None),
    ("GET", "/v1/connectors", None),
    ("GET", "/v1/auth/whoami", None),
    ("GET", "/v1/policies", None),
]


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_a_store_outage_is_a_503_everywhere_and_recovers(gw, caplog) -> None:
    """Connections refused and open ones reset (a stopped server). A black-holed store (a
    partition) is bounded only by the connect timeout for new connections, not yet for a
    pooled connection's pre-ping or a statement: issue 14 item 1 is not finished."""
    c, proxy = gw
    assert (await c.put("/v1/secrets/local/o/s", json={"data": {"v": CANARY}})).status_code == 200
    proxy.set_mode("refuse")
    try:
        for method, path, body in ROUTES:
            r = await c.request(method, path, json=body)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "store_unavailable", r.text
            assert r.headers.get("retry-after") and r.json()["error"].get("request_id"), (path, r.headers, r.text)
            assert CANARY not in r.text
    finally:
        proxy.set_mode("pass")
    for method, path, body in ROUTES:
        r = await c.request(method, path, json=body)
        assert r.status_code == 200, (method, path, r.text)
    assert (await c.get("/v1/secrets/local/o/t", params={"reveal": "true"})).json()["data"]["v"] == CANARY
    assert CANARY not in caplog.text
