"""The token endpoint (issue 10, item 5): input bounded and validated before use, the
audit subject is the authenticated principal (an unauthenticated attempt records a
bounded, marked claim), one client authentication method, private_key_jwt assertions
short-lived with their jti remembered until they expire, fail-closed on audit."""

from __future__ import annotations

import base64
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import select

from gateway.web.app import create_app
from gateway.store.models import UsedJtiRow
from tests.conftest import ADMIN_TOKEN, Gateway

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})


async def post(gw: Gateway, data: dict | str, headers: dict | None = None) -> httpx.Response:
    async with gw.as_token(None) as anon:
        if isinstance(data, str):
            headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
            return await anon.post("/v1/auth/token", content=data, headers=headers)
        return await anon.post("/v1/auth/token", data=data, headers=headers or {})


def basic(client_id: str, secret: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def token_events(gw: Gateway) -> list[dict]:
    r = await gw.client.get("/v1/audit", params={"action": "auth:token", "limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def test_an_over_long_or_malformed_client_id_is_refused_and_audited_bounded(gateway: Gateway) -> None:
    secret = (await gateway.client.post("/v1/clients", json={"client_id": "svc"})).json()["client_secret"]
    bad = ["x" * 300, "y" * 5000, "Svc", "svc\n", "svc x", "é" * 70, "svc;drop"]
    for value in bad:
        r = await post(gateway, {"grant_type": "client_credentials", "client_id": value, "client_secret": secret})
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (value[:20], r.text)
    r = await post(gateway, {"grant_type": "client_credentials"}, basic("x" * 300, secret))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    # Nothing broke: the store took every event, and the gateway is ready.
    assert (await gateway.client.get("/readyz")).status_code == 200
    events = await token_events(gateway)
    assert len(events) == len(bad) + 1
    claims = []
    for e in events:
        assert e["subject"] is None and e["details"]["authenticated"] is False, e
        claims.append(e["details"]["claimed_client_id"])
    assert claims == [v[:64] for v in bad] + ["x" * 64]
    assert all(len(e["outcome"]) < 100 for e in events)
    # A well-formed request still works, and is recorded under the client it authenticated.
    ok = await post(gateway, {"grant_type": "client_credentials", "client_id": "svc", "client_secret": secret})
    assert ok.status_code == 200
    last = (await token_events(gateway))[-1]
    assert last["subject"] == "client:svc" and last["issuer"] == "credgate"
    assert last["details"]["authenticated"] is True and "claimed_client_id" not in last["details"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_basic_for_one_client_and_a_form_client_id_for_another(gateway: Gateway) -> None:
    a = (await gateway.client.post("/v1/clients", json={"client_id": "svc-a"})).json()["client_secret"]
    b = (await gateway.client.post("/v1/clients", json={"client_id": "svc-b"})).json()["client_secret"]
    r = await post(gateway, {"grant_type": "client_credentials", "client_id": "svc-b"}, basic("svc-a", a))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    # Two methods at once (RFC 6749 2.3: use one).
    r = await post(gateway, {"grant_type": "client_credentials", "client_id": "svc-a", "client_secret": a}, basic("svc-a", a))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await post(gateway, {"grant_type": "client_credentials"}, basic("svc-a", b))  # svc-b's secret under svc-a
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    events = await token_events(gateway)
    assert [e["subject"] for e in events] == [None, None, None]
    assert all("svc-b" not in str(e["subject"]) for e in events)
    assert b not in str(events) and a not in str(events)  # secrets only as keyed hashes
    r = await post(gateway, {"grant_type": "client_credentials", "client_id": "svc-a"}, basic("svc-a", a))
    assert r.status_code == 200  # the same client named twice is one method
    assert (await token_events(gateway))[-1]["subject"] == "client:svc-a"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_parameter_given_twice_is_refused(gateway: Gateway) -> None:
    r = await post(gateway, "grant_type=client_credentials&grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await post(gateway, "grant_type=client_credentials&client_id=a&client_id=b&client_secret=x")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await post(gateway, "&".join(f"f{i}=1" for i in range(60)) + "&grant_type=client_credentials")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def assertion(claims: dict, key: RSAKey = CLIENT_KEY) -> str:
    return jwt.encode({"alg": "RS256", "kid": "k1"}, {k: v for k, v in claims.items() if v is not None}, key)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_private_key_jwt_needs_exp_iat_a_short_life_and_a_fresh_jti(gateway: Gateway) -> None:
    r = await gateway.client.post("/v1/clients", json={"client_id": "svc-jwt", "jwks": {"keys": [CLIENT_KEY.as_dict(private=False)]}})
    assert r.status_code == 201
    endpoint = f"{gateway.runtime.settings.issuer_url}/v1/auth/token"

    def claims(**over) -> dict:
        now = int(time.time())
        return {"iss": "svc-jwt", "sub": "svc-jwt", "aud": endpoint, "iat": now, "exp": now + 60,
                "jti": str(uuid.uuid4()), **over}

    async def attempt(token: str, **extra) -> httpx.Response:
        return await post(gateway, {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                                    "client_assertion": token, **extra})

    now = int(time.time())
    refused = {
        "no iat, a long exp": claims(iat=None, exp=now + 3600),
        "no exp": claims(exp=None),
        "a life over 300 s": claims(exp=now + 301),
        "iat after exp": claims(iat=now + 10, exp=now + 5),
        "a jti over 128 chars": claims(jti="j" * 129),
        "no jti": claims(jti=None),
        "iat as a string": claims(iat=str(now)),
    }
    for why, body in refused.items():
        r = await attempt(assertion(body))
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", why
    r = await attempt(assertion(claims()), client_id="svc")  # the form names another client
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await attempt("not-a-jwt")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"

    good = claims(exp=now + 200)
    r = await attempt(assertion(good), client_id="svc-jwt")
    assert r.status_code == 200, r.text
    assert (await token_events(gateway))[-1]["subject"] == "client:svc-jwt"
    replay = await attempt(assertion(good))
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    # The jti is remembered as long as the assertion could be accepted: its exp plus the leeway.
    async with gateway.runtime.store.read() as s:
        row = (await s.execute(select(UsedJtiRow).where(UsedJtiRow.jti == f"svc-jwt:{good['jti']}"))).scalar_one()
    assert row.expires_at.timestamp() >= good["exp"] + 30


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_the_token_endpoint_fails_closed_when_the_audit_sink_is_down(settings_factory, tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    app = create_app(settings_factory(audit_sinks=[{"type": "file", "path": str(folder / "audit.jsonl")}],
                                      audit_wait_seconds=0.3))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            secret = (await c.post("/v1/clients", json={"client_id": "svc"})).json()["client_secret"]
            form = {"grant_type": "client_credentials", "client_id": "svc", "client_secret": secret}
            shutil.rmtree(folder)
            r = await c.post("/v1/auth/token", data=form, headers={"Authorization": ""})
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
            assert "access_token" not in r.text
            folder.mkdir()
            r = await c.post("/v1/auth/token", data=form, headers={"Authorization": ""})
            assert r.status_code == 200 and r.json()["access_token"]
