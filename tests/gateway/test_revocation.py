"""Revocation reaches what was issued (issue 10, item 2).

Every gateway token names what it derives from (a client, an admin key, a
trusted issuer's mapping, the token that delegated it); revoking that source
refuses the token at its next use, although it was verified and cached before.
Tokens can also be revoked on their own (RFC 7009, ``POST /v1/auth/revoke``).
Cross-replica delivery is in tests/gateway/test_replicas.py.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.conftest import ADMIN_TOKEN, Gateway

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
IDP_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-1"})
IDP_URL = "https://idp.example"
IDP = {
    "issuer_url": IDP_URL, "jwks": {"keys": [IDP_KEY.as_dict(private=False)]}, "audiences": ["credgate"],
    "claim_mapping": {"groups": "groups"}, "role_mapping": {"ops": ["admin"]},
}
ISSUE = {"connector": "vendor", "resource": "default", "wrap": True}


def idp_token(sub: str = "alice", groups: list[str] | None = None) -> str:
    now = int(time.time())
    return jwt.encode({"alg": "RS256", "kid": "idp-1"}, {
        "iss": IDP_URL, "sub": sub, "aud": "credgate", "iat": now, "exp": now + 1800, "groups": groups or ["ops"],
    }, IDP_KEY)


async def setup(gw: Gateway) -> None:
    await gw.client.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": "k"}})
    r = await gw.client.put("/v1/connectors/vendor", json={
        "type": "static", "auth_method": "static", "secret": "local/vendor/key", "resources": ["default"]})
    assert r.status_code in (200, 201), r.text
    r = await gw.client.put("/v1/policies/svc", json={"rules": [{
        "principals": {"issuer": "credgate", "subject": "client:svc*"},
        "actions": ["runs:delegate", "credentials:issue", "credentials:wrap"], "connectors": ["vendor"]}]})
    assert r.status_code == 201, r.text


async def new_client(gw: Gateway, client_id: str) -> str:
    r = await gw.client.post("/v1/clients", json={"client_id": client_id})
    assert r.status_code == 201, r.text
    return r.json()["client_secret"]


async def form_post(gw: Gateway, path: str, body: dict, headers: dict | None = None):
    async with gw.as_token(None) as anon:
        return await anon.post(path, data=body, headers=headers or {})


async def access_token(gw: Gateway, client_id: str, secret: str) -> str:
    r = await form_post(gw, "/v1/auth/token", {"grant_type": "client_credentials", "client_id": client_id,
                                               "client_secret": secret})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def exchange(gw: Gateway, subject_token: str) -> str:
    r = await form_post(gw, "/v1/auth/token", {"grant_type": EXCHANGE, "subject_token": subject_token,
                                               "subject_token_type": JWT_TYPE})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def run_token(gw: Gateway, token: str, run_id: str, ttl: int = 3600):
    async with gw.as_token(token) as c:
        return await c.post(f"/v1/runs/{run_id}/token", json={"connectors": ["vendor"], "resources": ["default"],
                                                             "ttl_seconds": ttl})


async def use(gw: Gateway, token: str, path: str = "/v1/auth/whoami") -> tuple[int, str | None]:
    async with gw.as_token(token) as c:
        r = await (c.post("/v1/credentials", json=ISSUE) if path == "issue" else c.get(path))
    return r.status_code, (r.json()["error"]["code"] if r.status_code >= 400 else None)


async def test_a_revoked_clients_issued_tokens_are_refused_at_once(gateway: Gateway) -> None:
    await setup(gateway)
    secret = await new_client(gateway, "svc")
    token = await access_token(gateway, "svc", secret)
    r = await run_token(gateway, token, "run-1")
    assert r.status_code == 200, r.text
    run = r.json()["token"]
    for _ in range(2):  # verified and cached
        assert await use(gateway, token, "issue") == (200, None)
        assert await use(gateway, run, "issue") == (200, None)

    assert (await gateway.client.post("/v1/clients/svc/revoke")).status_code == 200
    # The token issued before the revocation, and the run token it delegated, stop at once.
    assert await use(gateway, token) == (401, "client_revoked")
    assert await use(gateway, token, "issue") == (401, "client_revoked")
    assert (await run_token(gateway, token, "run-2")).status_code == 401  # no new run tokens
    assert await use(gateway, run, "issue") == (401, "client_revoked")
    assert await gateway.runtime.runs.get("run-2") is None


async def test_run_tokens_delegated_by_a_revoked_admin_key_are_refused(gateway: Gateway) -> None:
    await setup(gateway)
    created = (await gateway.client.post("/v1/admin-keys", json={"name": "ops", "role": "admin"})).json()
    r = await run_token(gateway, created["token"], "run-k")
    assert r.status_code == 200, r.text
    run = r.json()["token"]
    assert await use(gateway, run, "issue") == (200, None)
    assert (await gateway.client.post(f"/v1/admin-keys/{created['id']}/revoke")).status_code == 200
    assert await use(gateway, run, "issue") == (401, "admin_key_revoked")
    assert await use(gateway, created["token"]) == (401, "invalid_token")
    # Another admin key's runs are untouched.
    other = (await run_token(gateway, ADMIN_TOKEN, "run-b")).json()["token"]
    assert await use(gateway, other, "issue") == (200, None)


@pytest.mark.parametrize("change", ["role_mapping", "claim_mapping", "deleted"])
async def test_an_exchanged_token_is_refused_once_its_issuer_mapping_changes(gateway: Gateway, change: str) -> None:
    await setup(gateway)
    assert (await gateway.client.put("/v1/issuers/idp", json=IDP)).status_code == 201
    token = await exchange(gateway, idp_token())
    run = (await run_token(gateway, token, "run-x")).json()["token"]  # admin by the mapping: may delegate
    assert await use(gateway, token, "/v1/backends") == (200, None)
    assert await use(gateway, run, "issue") == (200, None)
    # Changing what doesn't map claims or roles keeps it.
    assert (await gateway.client.put("/v1/issuers/idp", json={**IDP, "leeway_seconds": 10})).status_code == 200
    assert await use(gateway, token, "/v1/backends") == (200, None)

    if change == "deleted":
        assert (await gateway.client.delete("/v1/issuers/idp")).status_code == 204
    else:
        changed = {"role_mapping": {"ops": ["auditor"]}, "claim_mapping": {"groups": "roles"}}[change]
        assert (await gateway.client.put("/v1/issuers/idp", json={**IDP, change: changed})).status_code == 200
    assert await use(gateway, token, "/v1/backends") == (401, "issuer_changed")
    async with gateway.as_token(token) as c:  # it can't mint an admin key any more
        r = await c.post("/v1/admin-keys", json={"name": "late", "role": "admin"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "issuer_changed"
    assert await use(gateway, run, "issue") == (401, "issuer_changed")
    if change == "role_mapping":  # a new exchange gets the new mapping
        fresh = await exchange(gateway, idp_token())
        assert await use(gateway, fresh, "/v1/backends") == (200, None)  # auditor may list backends
        async with gateway.as_token(fresh) as c:
            assert (await c.post("/v1/admin-keys", json={"name": "late", "role": "admin"})).status_code == 403


async def test_rfc7009_a_bearer_revokes_its_own_token_and_what_it_delegated(gateway: Gateway) -> None:
    await setup(gateway)
    assert (await gateway.client.put("/v1/issuers/idp", json=IDP)).status_code == 201
    token = await exchange(gateway, idp_token())
    other = await exchange(gateway, idp_token())  # the same person's other session
    run = (await run_token(gateway, token, "run-s")).json()["token"]
    assert await use(gateway, token) == (200, None)

    # A bearer may revoke only the token it presents.
    r = await form_post(gateway, "/v1/auth/revoke", {"token": other}, {"Authorization": f"Bearer {token}"})
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"
    r = await form_post(gateway, "/v1/auth/revoke", {"token": token, "token_type_hint": "access_token"},
                        {"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json() == {} and r.headers["cache-control"] == "no-store"
    assert await use(gateway, token) == (401, "token_revoked")
    assert await use(gateway, run, "issue") == (401, "token_revoked")  # delegated with it
    assert await use(gateway, other) == (200, None)
    # Again, or a token that is not (or no longer) valid: 200, as RFC 7009 asks.
    for junk in (token, "not-a-token", other[:-4] + "AAAA"):
        r = await form_post(gateway, "/v1/auth/revoke", {"token": junk}, {"Authorization": f"Bearer {junk}"})
        assert r.status_code == 200, r.text
    assert await use(gateway, other) == (200, None)

    events = (await gateway.client.get("/v1/audit", params={"action": "auth:revoke", "limit": 100})).json()["items"]
    done = [e for e in events if (e.get("details") or {}).get("revoked") is True]
    assert len(done) == 1 and done[0]["subject"] == "alice" and done[0]["issuer"] == "idp"
    text = str(events)
    assert token not in text and other not in text  # never the token itself


async def test_rfc7009_a_client_revokes_tokens_issued_to_it_only(gateway: Gateway) -> None:
    await setup(gateway)
    secret = await new_client(gateway, "svc")
    secret2 = await new_client(gateway, "svc2")
    mine, theirs = await access_token(gateway, "svc", secret), await access_token(gateway, "svc2", secret2)
    run = (await run_token(gateway, mine, "run-c")).json()["token"]
    auth = {"client_id": "svc", "client_secret": secret}

    r = await form_post(gateway, "/v1/auth/revoke", {"token": theirs, **auth})
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"
    assert await use(gateway, theirs) == (200, None)
    r = await form_post(gateway, "/v1/auth/revoke", {"token": theirs, "client_id": "svc", "client_secret": "cgs_wrong"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = await form_post(gateway, "/v1/auth/revoke", {"token": theirs})  # no one asks
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = await form_post(gateway, "/v1/auth/revoke", {"token": ADMIN_TOKEN, **auth})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_token_type"
    r = await form_post(gateway, "/v1/auth/revoke", {"token": "garbage", **auth})
    assert r.status_code == 200

    r = await form_post(gateway, "/v1/auth/revoke", {"token": run, **auth})  # a run token it delegated
    assert r.status_code == 200
    assert await use(gateway, run, "issue") == (401, "token_revoked")
    assert await use(gateway, mine) == (200, None)
    r = await form_post(gateway, "/v1/auth/revoke", {"token": mine, **auth})
    assert r.status_code == 200
    assert await use(gateway, mine) == (401, "token_revoked")
    assert await use(gateway, theirs) == (200, None)
    # The client itself is not revoked: it gets a new token.
    assert await use(gateway, await access_token(gateway, "svc", secret)) == (200, None)
    events = (await gateway.client.get("/v1/audit", params={"action": "auth:revoke", "limit": 100})).json()["items"]
    assert {e["subject"] for e in events if (e.get("details") or {}).get("revoked")} == {"client:svc"}


async def test_a_gateway_token_without_its_source_is_refused(gateway: Gateway) -> None:
    """Tokens signed before sources existed (or forged without one) derive from nothing checkable."""
    rt = gateway.runtime
    await rt.clients.create("svc", roles=["auditor"], token_ttl=timedelta(minutes=5), jwks=None)
    now = int(time.time())
    body = {"iss": rt.settings.issuer_url, "aud": "credgate", "sub": "client:svc", "iat": now, "nbf": now,
            "exp": now + 300, "jti": "old-style", "cg_kind": "client", "cg_iss": "credgate", "cg_roles": ["auditor"],
            "cg_claims": {}}
    assert await use(gateway, rt.signing.sign(body)) == (401, "token_claim_missing")
    assert await use(gateway, rt.signing.sign({**body, "cg_src": ["somewhere:else"]})) == (401, "token_claim_missing")


async def test_source_checks_are_served_from_the_cache(gateway: Gateway) -> None:
    """Liveness is read once per source and replica, then served from memory until a change."""
    await setup(gateway)
    secret = await new_client(gateway, "svc")
    token = await access_token(gateway, "svc", secret)
    live = gateway.runtime.authenticator.revocation.live
    assert await use(gateway, token) == (200, None)
    misses, hits = live.misses, live.hits
    for _ in range(20):
        assert await use(gateway, token) == (200, None)
    assert live.misses == misses and live.hits >= hits + 40  # client:svc and jti:..., 20 times each
    await gateway.client.post("/v1/clients/svc/revoke")
    assert await use(gateway, token) == (401, "client_revoked")


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_run_token_lifetime_is_bounded_by_the_setting(settings_factory) -> None:
    import httpx

    from gateway.web.app import create_app

    app = create_app(settings_factory(run_token_max_ttl_seconds=600))
    async with app.router.lifespan_context(app):
        gw = Gateway(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}))
        await setup(gw)
        r = await run_token(gw, ADMIN_TOKEN, "run-long", ttl=86400)
        assert r.status_code == 200 and r.json()["expires_in"] == 600
        claims = (await app.state.runtime.signing.verify(r.json()["token"])).claims
        assert claims["exp"] - claims["iat"] == 600
        await gw.client.aclose()
