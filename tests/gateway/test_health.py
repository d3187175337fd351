"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_healthz_readyz_openapi(gateway: Gateway) -> None:
    async with gateway.as_token(None) as anon:
        assert (await anon.get("/healthz")).json() == {"status": "ok"}
        r = await anon.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"] == {"store": "ok", "kek": "ok", "audit": "ok"}
        spec = (await anon.get("/openapi.json")).json()
        assert "/v1/secrets/{backend}/{path}" in spec["paths"]
        assert (await anon.get("/docs")).status_code == 200


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_readyz_is_503_with_the_reason_when_the_store_is_gone(gateway: Gateway, store_url: str, postgres_server: str) -> None:
    import psycopg

    # Really take the store away: drop its database, which ends every session on it.
    name = store_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    async with gateway.as_token(None) as anon:
        assert (await anon.get("/healthz")).status_code == 200  # alive, just not ready
        r = await anon.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["error"]["code"] == "not_ready" and "store unreachable" in body["error"]["message"]
    assert body["checks"]["store"] == "unreachable" and body["checks"]["kek"] == "ok"


def test_access_log_lines_drop_query_strings() -> None:
    import logging

    from gateway.logs import configure

    configure("text", "info")
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/auth/console/callback?code=SECRETCODE&state=x", "1.1", 400), None)
    for f in logging.getLogger("uvicorn.access").filters:
        f.filter(record)
    assert "SECRETCODE" not in record.getMessage() and "/v1/auth/console/callback" in record.getMessage()
