"""Tokens from trusted issuers, gateway tokens and run tokens: what is accepted,
and every forged or replayed shape refused with 401 and its own code.

The "Kubernetes" issuer here is a real key pair held by the test with its JWKS
served by the test OIDC provider (tests/services/oidc_provider.py) over HTTP.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from tests.conftest import Gateway

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

K8S = "https://kubernetes.default.svc"
AUD = "credgate"


@pytest.fixture(scope="module")
def idp():
    from tests.services.oidc_provider import OIDCProvider

    with OIDCProvider() as provider:
        yield provider


@pytest.fixture
async def k8s(gateway: Gateway, idp):
    """A trusted issuer whose JWKS is fetched over HTTP from the provider."""
    r = await gateway.client.put("/v1/issuers/k8s", json={
        "issuer_url": idp.issuer, "jwks_url": f"{idp.issuer}/jwks", "audiences": [AUD],
        "algorithms": ["RS256"], "leeway_seconds": 30,
        "claim_mapping": {"project": "kubernetes.io.namespace"},
    })
    assert r.status_code == 201, r.text
    return idp


def claims(idp, **over):
    now = int(time.time())
    base = {"iss": idp.issuer, "sub": "system:serviceaccount:ml:trainer", "aud": AUD, "iat": now, "nbf": now,
            "exp": now + 600, "kubernetes.io": {"namespace": "ml"}}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def status(gw: Gateway, token: str, path: str = "/v1/auth/whoami"):
    async with gw.as_token(token) as c:
        r = await c.get(path)
    return r.status_code, (r.json().get("error", {}).get("code") if r.status_code >= 400 else r.json())


async def test_a_trusted_workload_token_becomes_a_principal(gateway: Gateway, k8s) -> None:
    code, who = await status(gateway, k8s.sign(claims(k8s)))
    assert code == 200 and who["kind"] == "workload" and who["issuer"] == "k8s"
    assert who["subject"] == "system:serviceaccount:ml:trainer"
    # Authenticated, but deny by default: no policy grants it anything yet.
    code, err = await status(gateway, k8s.sign(claims(k8s)), "/v1/backends")
    assert (code, err) == (403, "permission_denied")


@pytest.mark.parametrize(
    "forge, expected",
    [
        ("alg_none", "token_alg_not_allowed"),
        ("hs256_with_public_key", "token_alg_not_allowed"),
        ("expired_beyond_leeway", "token_expired"),
        ("nbf_in_future", "token_not_yet_valid"),
        ("wrong_audience", "token_audience_invalid"),
        ("wrong_issuer", "token_issuer_unknown"),
        ("unknown_kid", "token_kid_unknown"),
        ("key_from_another_issuer", "token_signature_invalid"),
        ("tampered_payload", "token_signature_invalid"),
        ("no_expiry", "token_claim_missing"),
        ("garbage", "token_invalid"),
    ],
)
async def test_forged_tokens_are_refused(gateway: Gateway, k8s, forge: str, expected: str) -> None:
    good = claims(k8s)
    if forge == "alg_none":
        token = b64({"alg": "none", "typ": "JWT"}) + "." + b64(good) + "."
    elif forge == "hs256_with_public_key":
        token = k8s.sign(good, alg="HS256")  # the classic confusion: HMAC keyed with the public key
    elif forge == "expired_beyond_leeway":
        token = k8s.sign(claims(k8s, exp=int(time.time()) - 31, iat=int(time.time()) - 600, nbf=None))
    elif forge == "nbf_in_future":
        token = k8s.sign(claims(k8s, nbf=int(time.time()) + 120))
    elif forge == "wrong_audience":
        token = k8s.sign(claims(k8s, aud="someone-else"))
    elif forge == "wrong_issuer":
        token = k8s.sign(claims(k8s, iss="https://evil.example"))
    elif forge == "unknown_kid":
        token = k8s.sign(good, kid="not-a-known-kid")
    elif forge == "key_from_another_issuer":
        other = RSAKey.generate_key(2048, parameters={"kid": k8s.kid})  # same kid, other key
        token = jwt.encode({"alg": "RS256", "kid": k8s.kid}, good, other)
    elif forge == "tampered_payload":
        h, _, s = k8s.sign(good).split(".")
        token = ".".join([h, b64({**good, "sub": "system:serviceaccount:kube-system:admin"}), s])
    elif forge == "no_expiry":
        token = k8s.sign(claims(k8s, exp=None))
    else:
        token = "not.a.jwt"
    code, err = await status(gateway, token)
    assert (code, err) == (401, expected)


async def test_jku_x5u_and_embedded_jwk_headers_are_never_used(gateway: Gateway, k8s) -> None:
    hits: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        attacker = RSAKey.generate_key(2048, parameters={"kid": "attacker"})
        url = f"http://127.0.0.1:{server.server_port}/jwks"
        for extra in ({"jku": url}, {"x5u": url + "/cert"}, {"jwk": attacker.as_dict(private=False)}):
            header = {"alg": "RS256", "kid": "attacker", **extra}
            token = jwt.encode(header, claims(k8s), attacker)
            code, err = await status(gateway, token)
            # joserfc picks keys only from the issuer's set (an unknown kid), and refuses a header
            # carrying a whole key as oversized before that (token_invalid).
            assert code == 401 and err in ("token_kid_unknown", "token_signature_invalid", "token_invalid")
    finally:
        server.shutdown()
    assert hits == []  # nothing was fetched from the attacker's URLs


async def test_unknown_kid_refetches_the_jwks_but_rate_limited(gateway: Gateway, k8s) -> None:
    issuers = gateway.runtime.issuers
    assert (await status(gateway, k8s.sign(claims(k8s))))[0] == 200
    first = issuers.fetches
    for _ in range(5):
        await status(gateway, k8s.sign(claims(k8s), kid="rotated-away"))
    assert issuers.fetches - first <= 1  # at most one refetch inside the window


async def test_one_issuer_url_per_issuer(gateway: Gateway, k8s) -> None:
    r = await gateway.client.put("/v1/issuers/k8s-again", json={
        "issuer_url": k8s.issuer, "jwks_url": f"{k8s.issuer}/jwks", "audiences": [AUD]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "issuer_url_in_use"
    assert [i["name"] for i in (await gateway.client.get("/v1/issuers")).json()["items"]] == ["k8s"]


async def test_symmetric_algorithms_can_not_be_configured(gateway: Gateway, idp) -> None:
    r = await gateway.client.put("/v1/issuers/bad", json={
        "issuer_url": "https://x.example", "jwks_url": "https://x.example/jwks", "audiences": ["a"], "algorithms": ["HS256"]})
    assert r.status_code == 422
    secret = OctKey.generate_key(256)
    r = await gateway.client.put("/v1/issuers/bad", json={
        "issuer_url": "https://x.example", "jwks": {"keys": [secret.as_dict(private=False)]}, "audiences": ["a"]})
    assert r.status_code == 422
    r = await gateway.client.put("/v1/issuers/bad", json={
        "issuer_url": "https://x.example", "jwks_url": "https://x.example/jwks", "audiences": ["a"], "leeway_seconds": 300})
    assert r.status_code == 422


# --- the metadata server, run tokens and revocation -------------------------------


SERVER_POLICY = {
    "rules": [
        {"principals": {"issuer": "credgate", "subject": "client:zenml-server"},
         "actions": ["runs:delegate", "credentials:issue", "credentials:wrap"],
         "connectors": ["wandb", "vendor-b"], "resources": ["*"], "max_ttl_seconds": 240},
    ]
}


async def setup_server_client(gw: Gateway) -> str:
    """A service principal (the metadata server) with a client secret; returns an access token."""
    r = await gw.client.put("/v1/policies/metadata-server", json=SERVER_POLICY)
    assert r.status_code == 201, r.text
    created = (await gw.client.post("/v1/clients", json={"client_id": "zenml-server"})).json()
    secret = created["client_secret"]
    assert secret.startswith("cgs_")
    async with gw.as_token(None) as anon:
        tok = await anon.post("/v1/auth/token", content=f"grant_type=client_credentials&client_id=zenml-server&client_secret={secret}",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert tok.status_code == 200, tok.text
    assert tok.json()["token_type"] == "Bearer" and tok.headers["cache-control"] == "no-store"
    return tok.json()["access_token"]


async def static(gw: Gateway, name: str) -> None:
    await gw.client.put(f"/v1/secrets/local/vendors/{name}", json={"data": {"api_key": f"key-of-{name}"}})
    r = await gw.client.put(f"/v1/connectors/{name}", json={
        "type": "static", "auth_method": "static", "secret": f"local/vendors/{name}", "resources": ["default", "other"]})
    assert r.status_code in (200, 201), r.text


async def test_run_token_scope_delegation_and_revocation(gateway: Gateway) -> None:
    for name in ("wandb", "vendor-b", "vendor-c"):
        await static(gateway, name)
    server_token = await setup_server_client(gateway)
    async with gateway.as_token(server_token) as server:
        who = (await server.get("/v1/auth/whoami")).json()
        assert who == {"kind": "client", "subject": "client:zenml-server", "issuer": "credgate", "roles": [], "run_id": None,
                       "may": ["credentials:issue", "credentials:wrap", "runs:delegate"]}
        # Never more than the caller holds: vendor-c is not the server's to give.
        r = await server.post("/v1/runs/run-A/token", json={"connectors": ["wandb", "vendor-c"], "resources": ["default"]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "delegation_exceeds_caller"
        r = await server.post("/v1/runs/run-A/token", json={"connectors": ["wandb"], "resources": ["default"], "ttl_seconds": 600})
        assert r.status_code == 200, r.text
        run_a = r.json()
        assert run_a["max_credential_ttl_seconds"] == 240
        run_b = (await server.post("/v1/runs/run-B/token", json={"connectors": ["wandb"], "resources": ["default"]})).json()
        # The metadata server asks for a wrapped credential for run A and never sees it.
        wrapped = await server.post("/v1/runs/run-A/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})
        assert wrapped.status_code == 200 and wrapped.json()["credential"] is None

    async with gateway.as_token(run_a["token"]) as pipeline:
        ok = await pipeline.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True, "ttl_seconds": 3000})
        assert ok.status_code == 200, ok.text
        assert ok.json()["ttl_seconds"] == 240  # capped by the delegator's policy
        lease = (await gateway.client.get(f"/v1/leases/{ok.json()['lease_id']}")).json()
        assert lease["run_id"] == "run-A" and lease["principal"] == "credgate/run:run-A"
        for body, code in [
            ({"connector": "vendor-b", "resource": "default", "wrap": True}, "permission_denied"),  # other connector
            ({"connector": "wandb", "resource": "other", "wrap": True}, "permission_denied"),  # other resource
        ]:
            r = await pipeline.post("/v1/credentials", json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == code
        r = await pipeline.post("/v1/runs/run-B/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_run_mismatch"
        r = await pipeline.get("/v1/backends")
        assert r.status_code == 403
        r = await pipeline.post("/v1/runs/run-C/token", json={"connectors": ["wandb"], "resources": ["default"]})
        assert r.status_code == 403  # a run can't delegate further
        unwrapped = await pipeline.post("/v1/unwrap", json={"wrap_token": wrapped.json()["wrap_token"]})
        assert unwrapped.status_code == 200 and unwrapped.json()["credential"] == {"api_key": "key-of-wandb"}

    async with gateway.as_token(server_token) as server:
        r = await server.post("/v1/runs/run-A/revoke")
        assert r.status_code == 200 and r.json()["leases_revoked"] == 2
    code, err = await status(gateway, run_a["token"])
    assert (code, err) == (401, "run_revoked")
    assert (await gateway.client.get(f"/v1/leases/{ok.json()['lease_id']}")).json()["state"] == "revoked"
    # run B is untouched
    async with gateway.as_token(run_b["token"]) as other:
        assert (await other.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})).status_code == 200


async def test_a_replayed_wrap_token_and_a_wrap_token_as_bearer(gateway: Gateway) -> None:
    await static(gateway, "wandb")
    out = (await gateway.client.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})).json()
    assert (await gateway.client.post("/v1/unwrap", json={"wrap_token": out["wrap_token"]})).status_code == 200
    replay = await gateway.client.post("/v1/unwrap", json={"wrap_token": out["wrap_token"]})
    assert replay.status_code == 410 and replay.json()["error"]["code"] == "wrap_token_used"
    assert await status(gateway, out["wrap_token"]) == (401, "invalid_token")


async def test_token_exchange_turns_a_workload_token_into_a_gateway_token(gateway: Gateway, k8s) -> None:
    async with gateway.as_token(None) as anon:
        r = await anon.post("/v1/auth/token", content="&".join([
            "grant_type=urn:ietf:params:oauth:grant-type:token-exchange",
            f"subject_token={k8s.sign(claims(k8s))}",
            "subject_token_type=urn:ietf:params:oauth:token-type:jwt"]),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text
        exchanged = r.json()["access_token"]
        bad = await anon.post("/v1/auth/token", content="grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token=x.y.z"
                              "&subject_token_type=urn:ietf:params:oauth:token-type:jwt",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
        again = await anon.post("/v1/auth/token", content="&".join([
            "grant_type=urn:ietf:params:oauth:grant-type:token-exchange", f"subject_token={exchanged}",
            "subject_token_type=urn:ietf:params:oauth:token-type:access_token"]),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"  # no laundering lifetimes
        untyped = await anon.post("/v1/auth/token", content="&".join([
            "grant_type=urn:ietf:params:oauth:grant-type:token-exchange", f"subject_token={k8s.sign(claims(k8s))}"]),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert untyped.status_code == 400 and untyped.json()["error"] == "invalid_request"
    code, who = await status(gateway, exchanged)
    assert code == 200 and who["issuer"] == "k8s" and who["subject"] == "system:serviceaccount:ml:trainer"
    jwks = (await gateway.client.get("/v1/jwks")).json()
    header = json.loads(base64.urlsafe_b64decode(exchanged.split(".")[0] + "=="))
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    disco = (await gateway.client.get("/.well-known/openid-configuration")).json()
    assert disco["jwks_uri"].endswith("/v1/jwks") and "private_key_jwt" in disco["token_endpoint_auth_methods_supported"]


async def test_client_authentication_methods(gateway: Gateway) -> None:
    import uuid

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    created = (await gateway.client.post("/v1/clients", json={"client_id": "svc"})).json()
    basic = base64.b64encode(f"svc:{created['client_secret']}".encode()).decode()
    key = RSAKey.generate_key(2048, parameters={"kid": "svc-key"})
    r = await gateway.client.post("/v1/clients", json={"client_id": "svc-jwt", "jwks": {"keys": [key.as_dict(private=False)]}})
    assert r.status_code == 201 and r.json()["client_secret"] is None
    endpoint = f"{gateway.runtime.settings.issuer_url}/v1/auth/token"

    def assertion(jti: str, aud: str = endpoint) -> str:
        now = int(time.time())
        return jwt.encode({"alg": "RS256", "kid": "svc-key"},
                          {"iss": "svc-jwt", "sub": "svc-jwt", "aud": aud, "iat": now, "exp": now + 60, "jti": jti}, key)

    async with gateway.as_token(None) as anon:
        ok_basic = await anon.post("/v1/auth/token", content="grant_type=client_credentials", headers={**form, "Authorization": f"Basic {basic}"})
        assert ok_basic.status_code == 200
        wrong = await anon.post("/v1/auth/token", content="grant_type=client_credentials&client_id=svc&client_secret=cgs_wrong", headers=form)
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
        jti = str(uuid.uuid4())
        body = f"grant_type=client_credentials&client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion={assertion(jti)}"
        assert (await anon.post("/v1/auth/token", content=body, headers=form)).status_code == 200
        replayed = await anon.post("/v1/auth/token", content=body, headers=form)
        assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_client"
        other_aud = body.replace(assertion(jti), assertion(str(uuid.uuid4()), aud="https://elsewhere/token"))
        assert (await anon.post("/v1/auth/token", content=other_aud, headers=form)).status_code == 401
        unsupported = await anon.post("/v1/auth/token", content="grant_type=password&username=a&password=b", headers=form)
        assert unsupported.status_code == 400 and unsupported.json()["error"] == "unsupported_grant_type"
    await gateway.client.post("/v1/clients/svc/revoke")
    async with gateway.as_token(None) as anon:
        r = await anon.post("/v1/auth/token", content="grant_type=client_credentials", headers={**form, "Authorization": f"Basic {basic}"})
        assert r.status_code == 401
    listed = (await gateway.client.get("/v1/clients")).text
    assert created["client_secret"] not in listed


async def client_token(gw: Gateway, client_id: str, secret: str) -> str:
    async with gw.as_token(None) as anon:
        r = await anon.post("/v1/auth/token", content=f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def kid_of(token: str) -> str:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]


async def test_signing_key_rotation_refuses_old_tokens_at_once_by_default(gateway: Gateway) -> None:
    created = (await gateway.client.post("/v1/clients", json={"client_id": "svc", "roles": ["auditor"]})).json()
    old = await client_token(gateway, "svc", created["client_secret"])
    assert (await status(gateway, old, "/v1/backends"))[0] == 200  # verified and cached
    rotated = await gateway.client.post("/v1/keys/signing/rotate")
    assert rotated.status_code == 200, rotated.text
    new_kid = rotated.json()["active_kid"]
    assert rotated.json()["published_kids"] == [new_kid] and rotated.json()["grace_seconds"] == 0
    assert {k["kid"] for k in (await gateway.client.get("/v1/jwks")).json()["keys"]} == {new_kid}
    # A rotation is the answer to a compromise: what the old key signed is refused at once.
    assert await status(gateway, old) == (401, "token_kid_unknown")
    new = await client_token(gateway, "svc", created["client_secret"])
    assert kid_of(new) == new_kid != kid_of(old)
    assert (await status(gateway, new, "/v1/backends"))[0] == 200
    # Audit checkpoints signed by the retired key still verify.
    await gateway.runtime.audit.checkpoint()
    assert (await gateway.client.get("/v1/audit/verify")).json()["ok"] is True


async def test_signing_key_rotation_with_grace_keeps_old_tokens_valid(gateway: Gateway) -> None:
    created = (await gateway.client.post("/v1/clients", json={"client_id": "svc", "roles": ["auditor"]})).json()
    old = await client_token(gateway, "svc", created["client_secret"])
    old_kid = kid_of(old)
    rotated = await gateway.client.post("/v1/keys/signing/rotate", json={"grace_seconds": 600})
    assert rotated.status_code == 200, rotated.text
    new_kid = rotated.json()["active_kid"]
    assert set(rotated.json()["published_kids"]) == {old_kid, new_kid}
    new = await client_token(gateway, "svc", created["client_secret"])
    assert kid_of(new) == new_kid != old_kid
    kids = {k["kid"] for k in (await gateway.client.get("/v1/jwks")).json()["keys"]}
    assert {old_kid, new_kid} <= kids  # overlap: both published
    assert (await status(gateway, old))[0] == 200 and (await status(gateway, new))[0] == 200
    assert (await status(gateway, old, "/v1/backends"))[0] == 200  # auditor role from the client
    # A rotation without grace ends the grace of earlier keys too.
    await gateway.client.post("/v1/keys/signing/rotate")
    assert await status(gateway, old) == (401, "token_kid_unknown")
    assert await status(gateway, new) == (401, "token_kid_unknown")
    r = await gateway.client.post("/v1/keys/signing/rotate", json={"grace_seconds": 86401})
    assert r.status_code == 422
    # When the grace ends, the old key stops verifying (no other change needed to notice).
    current = await client_token(gateway, "svc", created["client_secret"])
    assert (await gateway.client.post("/v1/keys/signing/rotate", json={"grace_seconds": 1})).status_code == 200
    assert (await status(gateway, current))[0] == 200
    time.sleep(1.1)
    assert await status(gateway, current) == (401, "token_kid_unknown")


# --- whoami: what the caller may do ---------------------------------------------


async def test_whoami_lists_the_actions_the_caller_may_take(gateway: Gateway) -> None:
    from gateway.policy.rules import ACTIONS

    me = (await gateway.client.get("/v1/auth/whoami")).json()
    assert me["may"] == sorted(ACTIONS)  # the bootstrap admin
    tokens = {}
    for role in ("operator", "auditor"):
        r = await gateway.client.post("/v1/admin-keys", json={"name": f"{role}-key", "role": role})
        assert r.status_code == 201, r.text
        tokens[role] = r.json()["token"]
    async with gateway.as_token(tokens["operator"]) as operator:
        may = (await operator.get("/v1/auth/whoami")).json()["may"]
    assert may == ["backends:read", "connectors:read", "credentials:issue", "credentials:wrap", "leases:read",
                   "secrets:read", "secrets:write"]
    assert "secrets:reveal" not in may and "leases:revoke" not in may
    async with gateway.as_token(tokens["auditor"]) as auditor:
        may = (await auditor.get("/v1/auth/whoami")).json()["may"]
    assert {"leases:read", "audit:read"} <= set(may) and "leases:revoke" not in may
    assert may == sorted(may)
    # A policy scoped to one connector counts (the coarse decision): an operator granted
    # leases:revoke on one connector may now revoke, somewhere.
    r = await gateway.client.put("/v1/policies/ops-revoke", json={"rules": [
        {"principals": {"roles": ["operator"]}, "actions": ["leases:revoke"], "connectors": ["vendor"]}]})
    assert r.status_code == 201, r.text
    async with gateway.as_token(tokens["operator"]) as operator:
        assert "leases:revoke" in (await operator.get("/v1/auth/whoami")).json()["may"]
    # The route documents the field.
    schema = gateway.app.openapi()["components"]["schemas"]["WhoAmI"]
    assert schema["properties"]["may"]["description"]
