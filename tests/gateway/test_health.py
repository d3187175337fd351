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

    from gateway.web.logs import configure

    configure("text", "info")
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/auth/console/callback?code=SECRETCODE&state=x", "1.1", 400), None)
    for f in logging.getLogger("uvicorn.access").filters:
        f.filter(record)
    assert "SECRETCODE" not in record.getMessage() and "/v1/auth/console/callback" in record.getMessage()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_metrics(gateway: Gateway) -> None:
    await gateway.client.put("/v1/secrets/local/m/x", json={"data": {"k": "CANARY-metrics-value"}})
    await gateway.client.put("/v1/secrets/local/m/wandb", json={"data": {"api_key": "CANARY-metrics-key"}})
    await gateway.client.put("/v1/connectors/w", json={"type": "static", "auth_method": "static",
                                                        "secret": "local/m/wandb", "resources": ["default"]})
    issued = await gateway.client.post("/v1/credentials", json={"connector": "w", "resource": "default", "wrap": True})
    assert issued.status_code == 200
    async with gateway.as_token(None) as anon:
        text = (await anon.get("/metrics")).text
    assert 'credgate_http_requests_total{method="PUT",route="/v1/secrets/{backend}/{path:path}",status="200"} 2.0' in text
    assert 'credgate_issue_seconds_count{connector_type="static"} 1.0' in text
    assert 'credgate_leases{state="active"} 1.0' in text
    assert 'credgate_audit_sink_up{sink="store"} 1.0' in text
    assert 'credgate_backend_up{backend="local"} 1.0' in text
    assert "credgate_revocations_stuck 0.0" in text
    assert "CANARY" not in text and "m/x" not in text  # routes by template, never by path


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_cache_hit_rates_are_exported(gateway: Gateway) -> None:
    def lookups(text: str, cache: str, result: str) -> float:
        line = f'credgate_cache_lookups_total{{cache="{cache}",result="{result}"}} '
        return float(next(ln for ln in text.splitlines() if ln.startswith(line)).split()[-1])

    await gateway.client.put("/v1/secrets/local/m/x", json={"data": {"k": "CANARY-cache-value"}})
    async with gateway.as_token(None) as anon:
        before = (await anon.get("/metrics")).text
        for _ in range(3):
            assert (await gateway.client.get("/v1/secrets/local/m/x")).status_code == 200
        after = (await anon.get("/metrics")).text
    # Three requests with one admin key: its verification is reused; the metadata is read once.
    assert lookups(after, "tokens", "hit") - lookups(before, "tokens", "hit") == 3
    assert lookups(after, "secret_metadata", "miss") - lookups(before, "secret_metadata", "miss") == 1
    assert lookups(after, "secret_metadata", "hit") - lookups(before, "secret_metadata", "hit") == 2
    assert "credgate_change_feed_live 1.0" in after
    assert "CANARY" not in after and "m/x" not in after
