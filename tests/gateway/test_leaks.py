"""Leak-proofing: canaries planted as secret values, target passwords and tokens;
every endpoint driven on its success and failure paths (vendor errors from real
targets included); no canary may appear in logs, audit events, error bodies,
plaintext database columns or exception traces.

Legitimate places for a value are excluded by construction: the body of a
`?reveal=true` read, of an issued credential and of an unwrap are not
scanned (handing the value out is their job); everything else is.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import Gateway

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

SECRET_VALUE = "CANARYsecretvalue7b1"
PG_PASSWORD = "CANARYpgpassword9d4"
REDIS_PASSWORD = "CANARYredispass2c8"


def forms(value: str) -> list[str]:
    return [value, base64.b64encode(value.encode()).decode().rstrip("="), value.encode().hex()]


async def test_no_canary_escapes(gateway: Gateway, pg_cluster, redis_server, caplog, tmp_path: Path, store_url: str) -> None:
    caplog.set_level(logging.DEBUG)
    c = gateway.client
    scanned: list[str] = []  # everything that must be clean
    exempt: list[str] = []  # bodies whose job is to hand a value out

    async def call(method: str, url: str, *, expect_value: bool = False, **kw):
        r = await c.request(method, url, **kw)
        (exempt if expect_value and r.status_code < 300 else scanned).append(r.text + json.dumps(dict(r.headers)))
        return r

    # Plant: a secret, connectors whose material is wrong (vendor errors), a client, a wrap token.
    await call("PUT", "/v1/secrets/local/app/db", json={"data": {"password": SECRET_VALUE}})
    bad_dsn = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{pg_cluster.port}/postgres"
    await call("PUT", "/v1/secrets/local/targets/pg", json={"data": {"dsn": bad_dsn}})
    await call("PUT", "/v1/connectors/pg", json={"type": "postgres", "auth_method": "password",
                                                  "secret": "local/targets/pg", "resources": ["postgres"]})
    host_port = redis_server.split("//", 1)[1].split("/", 1)[0]
    await call("PUT", "/v1/secrets/local/targets/redis",
               json={"data": {"url": f"redis://nosuchuser:{REDIS_PASSWORD}@{host_port}/0"}})
    await call("PUT", "/v1/connectors/cache", json={"type": "redis", "auth_method": "password",
                                                     "secret": "local/targets/redis", "resources": ["features"]})
    await call("PUT", "/v1/secrets/local/vendor/key", json={"data": {"api_key": SECRET_VALUE}})
    await call("PUT", "/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                                      "secret": "local/vendor/key", "resources": ["default"]})
    client_secret = (await call("POST", "/v1/clients", json={"client_id": "svc"}, expect_value=True)).json()["client_secret"]

    # Success paths that must not show values.
    for url in ("/v1/secrets/local/app/db", "/v1/secrets/local?prefix=app/", "/v1/connectors/pg", "/v1/connectors",
                "/v1/backends", "/v1/leases", "/v1/keys/status", "/v1/audit"):
        assert (await call("GET", url)).status_code == 200
    assert (await call("GET", "/v1/secrets/local/app/db?reveal=true", expect_value=True)).status_code == 200
    wrapped = (await call("POST", "/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True},
                          expect_value=True)).json()
    assert (await call("POST", "/v1/unwrap", json={"wrap_token": wrapped["wrap_token"]}, expect_value=True)).status_code == 200

    # Failure paths, vendor errors included.
    r = await call("POST", "/v1/credentials", json={"connector": "pg", "resource": "postgres"})
    assert r.status_code in (502, 503), r.text
    r = await call("POST", "/v1/connectors/pg/verify")
    assert r.status_code == 200 and r.json()["ok"] is False
    r = await call("POST", "/v1/credentials", json={"connector": "cache", "resource": "features"})
    assert r.status_code in (502, 503), r.text
    assert (await call("POST", "/v1/connectors/cache/verify")).json()["ok"] is False
    assert (await call("POST", "/v1/unwrap", json={"wrap_token": wrapped["wrap_token"]})).status_code == 410
    await call("PUT", "/v1/secrets/local/app/db", json={"data": {"password": 12345}})
    await call("PUT", "/v1/secrets/local/app/db", content=b'{"data": {"password": "' + SECRET_VALUE.encode() + b'"')
    await call("PUT", "/v1/secrets/local/app/db", json={"data": {"password": SECRET_VALUE}, "extra": SECRET_VALUE})
    await call("PUT", "/v1/backends/b2", json={"type": "local", "config": {"token": SECRET_VALUE}})
    await call("PUT", "/v1/connectors/x", json={"type": "postgres", "auth_method": "password", "secret": "local/app/db",
                                                 "config": {"privileges": [SECRET_VALUE]}, "resources": ["a"]})
    # (Identifiers a caller sends, a path or a resource name, are its own input and may be
    # quoted back in its error; values are what must never come back.)
    await call("POST", "/v1/credentials", json={"connector": "vendor", "resource": "elsewhere", "wrap": True})
    await call("GET", "/v1/secrets/local/app/nothing-here")
    async with gateway.as_token(None) as anon:
        for body in (f"grant_type=client_credentials&client_id=svc&client_secret={client_secret}x",
                     f"grant_type=client_credentials&client_id=svc&client_secret={SECRET_VALUE}",
                     f"grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token={SECRET_VALUE}.a.b"
                     "&subject_token_type=urn:ietf:params:oauth:token-type:jwt"):
            r = await anon.post("/v1/auth/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
            scanned.append(r.text)
        r = await anon.get("/v1/backends", headers={"Authorization": f"Bearer {SECRET_VALUE}"})
        scanned.append(r.text)

    # Where a value must never be: responses, logs (with their exception text), audit events, the store.
    audit_rows = (await c.get("/v1/audit", params={"limit": 1000})).json()["items"]
    log_text = "\n".join(
        rec.getMessage() + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
        for rec in caplog.records
    )
    db_file = Path(store_url.split("///", 1)[1])
    db_bytes = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
    async with gateway.runtime.store.read() as s:
        tables = [r[0] for r in (await s.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))).all()]
        columns = []
        for table in tables:
            for row in (await s.execute(text(f'SELECT * FROM "{table}"'))).all():
                columns += [str(v) for v in row]
    haystacks = {"responses": "\n".join(scanned), "logs": log_text, "audit": json.dumps(audit_rows),
                 "database columns": "\n".join(columns)}
    assert audit_rows and caplog.records and len(scanned) > 30
    for canary in (SECRET_VALUE, PG_PASSWORD, REDIS_PASSWORD, client_secret, wrapped["wrap_token"]):
        for where, hay in haystacks.items():
            for form in forms(canary):
                assert form not in hay, f"{canary[:12]}... leaked into {where}"
        for form in forms(canary):
            assert form.encode() not in db_bytes, "leaked into the database file"
    # The exempt bodies did carry the values: the scan above is not vacuous.
    assert SECRET_VALUE in "\n".join(exempt) and client_secret in "\n".join(exempt)
