"""The authorization matrix, generated from the app's route table.

Every route is called by every kind of caller; the expected allow or deny
comes from the action the route declares (its ``requires(...)`` dependency)
and the table below of what each caller holds. A route that declares no
action and is not listed as public fails this test, so a new endpoint can't
slip in unguarded.

"Allowed" means the caller got past authentication and authorization (any
status but 401/403: often a 404 or 422 for the dummy path and empty body);
"denied" means 403 (401 for the anonymous caller).
"""

from __future__ import annotations

import re
import time

import pytest
from fastapi.routing import APIRoute
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.policy.rules import ACTIONS
from tests.conftest import ADMIN_TOKEN, Gateway

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

PUBLIC = {
    "/healthz", "/metrics", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
    "/v1/unwrap", "/v1/auth/token", "/v1/auth/revoke", "/v1/jwks", "/.well-known/openid-configuration", "/v1/auth/login-config",
    "/v1/auth/console/login", "/v1/auth/console/callback", "/v1/auth/console/key",
}
# The web console's pages and actions: signed in by its session cookie, never by a bearer
# token (tests/console covers the signed-in side). For every caller here: a page sends it to
# the sign-in form, an action is refused (a 4xx), nothing is done.
CONSOLE_OPEN = {"/console/login", "/console/policy-new"}  # the form; a redirect to a page (which checks)

# Every route of the API and the action it requires; "public" needs no token,
# "authenticated" any valid one. A route missing here fails the test.
EXPECTED: dict[tuple[str, str], str] = {
    ("DELETE", "/v1/backends/{name}"): "backends:manage",
    ("DELETE", "/v1/connectors/{name}"): "connectors:manage",
    ("DELETE", "/v1/issuers/{name}"): "issuers:manage",
    ("DELETE", "/v1/policies/{name}"): "policies:manage",
    ("DELETE", "/v1/secrets/{backend}/{path:path}"): "secrets:write",
    ("GET", "/.well-known/openid-configuration"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/metrics"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/v1/admin-keys"): "admin_keys:manage",
    ("GET", "/v1/auth/console/callback"): "public",
    ("GET", "/v1/auth/console/login"): "public",
    ("POST", "/v1/auth/console/key"): "public",
    ("GET", "/v1/auth/login-config"): "public",
    ("GET", "/v1/auth/whoami"): "authenticated",
    ("GET", "/v1/audit"): "audit:read",
    ("GET", "/v1/audit/verify"): "audit:read",
    ("POST", "/v1/audit/hash"): "audit:read",
    ("POST", "/v1/audit/verify"): "audit:read",
    ("GET", "/v1/backend-types"): "backends:read",
    ("GET", "/v1/backends"): "backends:read",
    ("GET", "/v1/backends/{name}"): "backends:read",
    ("GET", "/v1/clients"): "clients:manage",
    ("GET", "/v1/connector-types"): "connectors:read",
    ("GET", "/v1/connectors"): "connectors:read",
    ("GET", "/v1/connectors/{name}"): "connectors:read",
    ("GET", "/v1/connectors/{name}/resources"): "connectors:read",
    ("GET", "/v1/issuers"): "issuers:manage",
    ("GET", "/v1/issuers/{name}"): "issuers:manage",
    ("GET", "/v1/jwks"): "public",
    ("GET", "/v1/keys/status"): "keys:read",
    ("GET", "/v1/leases"): "leases:read",
    ("GET", "/v1/leases/summary"): "leases:read",
    ("GET", "/v1/leases/issuance"): "leases:read",
    ("GET", "/v1/leases/{lease_id}"): "credentials:issue|credentials:wrap|leases:read",
    ("GET", "/v1/policies"): "policies:read",
    ("GET", "/v1/runs"): "runs:delegate|leases:read",
    ("GET", "/v1/policies/{name}"): "policies:read",
    ("GET", "/v1/secrets/{backend}"): "secrets:read",
    ("GET", "/v1/secrets/{backend}/{path:path}"): "secrets:read",
    ("POST", "/v1/admin-keys"): "admin_keys:manage",
    ("POST", "/v1/admin-keys/{key_id}/revoke"): "admin_keys:manage",
    ("POST", "/v1/auth/token"): "public",
    ("POST", "/v1/auth/revoke"): "public",  # RFC 7009: the token's bearer or its client, checked by the route
    ("POST", "/v1/backends/{name}/check"): "backends:read",
    ("POST", "/v1/clients"): "clients:manage",
    ("POST", "/v1/clients/{client_id}/revoke"): "clients:manage",
    ("POST", "/v1/connectors/{name}/verify"): "connectors:manage",
    ("POST", "/v1/issuers/{name}/check"): "issuers:manage",
    ("POST", "/v1/credentials"): "credentials:issue|credentials:wrap",
    ("POST", "/v1/keys/rotate"): "keys:manage",
    ("POST", "/v1/keys/signing/rotate"): "keys:manage",
    ("POST", "/v1/leases/revoke"): "leases:revoke",
    ("POST", "/v1/leases/{lease_id}/renew"): "credentials:issue|credentials:wrap|leases:revoke",
    ("POST", "/v1/leases/{lease_id}/revoke"): "credentials:issue|credentials:wrap|leases:revoke",
    ("POST", "/v1/policies/explain"): "policies:read",
    ("POST", "/v1/runs/{run_id}/credentials"): "credentials:issue|credentials:wrap",
    ("POST", "/v1/runs/{run_id}/revoke"): "runs:delegate|leases:revoke",
    ("POST", "/v1/runs/{run_id}/token"): "runs:delegate",
    ("POST", "/v1/secrets/{backend}/{path:path}:restore"): "secrets:write",
    ("POST", "/v1/unwrap"): "public",
    ("PUT", "/v1/backends/{name}"): "backends:manage",
    ("PUT", "/v1/connectors/{name}"): "connectors:manage",
    ("PUT", "/v1/issuers/{name}"): "issuers:manage",
    ("PUT", "/v1/policies/{name}"): "policies:manage",
    ("PUT", "/v1/secrets/{backend}/{path:path}"): "secrets:write",

}

HOLDS = {
    "admin": set(ACTIONS),
    "operator": {"secrets:read", "secrets:write", "backends:read", "connectors:read", "credentials:issue",
                 "credentials:wrap", "leases:read"},
    "auditor": {"secrets:read", "backends:read", "connectors:read", "leases:read", "keys:read", "policies:read", "audit:read"},
    "service": {"runs:delegate", "credentials:issue", "credentials:wrap"},
    "run": {"credentials:issue", "credentials:wrap"},
    "workload": {"credentials:issue"},
}

POLICY = {"rules": [
    {"principals": {"issuer": "credgate", "subject": "client:meta"},
     "actions": ["runs:delegate", "credentials:issue", "credentials:wrap"], "connectors": ["wandb"]},
    {"principals": {"issuer": "ci", "subject": "repo:org/ml:*"}, "actions": ["credentials:issue"], "connectors": ["aws"]},
]}


def route_table(app) -> list:
    """Every endpoint with its full path, whether FastAPI keeps them flat (older
    releases: APIRoute) or behind included-router wrappers (newer releases)."""
    out = []

    def walk(items) -> None:
        for item in items:
            if hasattr(item, "effective_candidates"):
                walk(item.effective_candidates())
            elif isinstance(item, APIRoute) or (hasattr(item, "dependant") and hasattr(item, "methods")):
                out.append(item)

    walk(app.routes)
    return out


def declared_action(route) -> str | None:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        action = getattr(dep.call, "action", None)
        if action:
            return action
        stack.extend(dep.dependencies)
    return None


async def callers(gw: Gateway) -> dict[str, str | None]:
    c = gw.client
    tokens: dict[str, str | None] = {"anonymous": None, "admin": ADMIN_TOKEN}
    for role in ("operator", "auditor"):
        tokens[role] = (await c.post("/v1/admin-keys", json={"name": role, "role": role})).json()["token"]
    assert (await c.put("/v1/policies/matrix", json=POLICY)).status_code == 201
    secret = (await c.post("/v1/clients", json={"client_id": "meta"})).json()["client_secret"]
    r = await c.post("/v1/auth/token", content=f"grant_type=client_credentials&client_id=meta&client_secret={secret}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    tokens["service"] = r.json()["access_token"]
    async with gw.as_token(tokens["service"]) as svc:
        r = await svc.post("/v1/runs/r1/token", json={"connectors": ["wandb"], "resources": ["*"]})
        assert r.status_code == 200, r.text
        tokens["run"] = r.json()["token"]
    key = RSAKey.generate_key(2048, parameters={"kid": "ci-1"})
    r = await c.put("/v1/issuers/ci", json={"issuer_url": "https://ci.example", "jwks": {"keys": [key.as_dict(private=False)]},
                                            "audiences": ["credgate"]})
    assert r.status_code == 201, r.text
    now = int(time.time())
    tokens["workload"] = jwt.encode({"alg": "RS256", "kid": "ci-1"}, {
        "iss": "https://ci.example", "sub": "repo:org/ml:ref:refs/heads/main", "aud": "credgate", "iat": now, "exp": now + 600}, key)
    return tokens


def fill(path: str) -> str:
    path = path.replace("/v1/runs/{run_id}/credentials", "/v1/runs/r1/credentials")
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_route_against_every_caller(gateway: Gateway) -> None:
    tokens = await callers(gateway)
    routes = route_table(gateway.app)
    assert len(routes) > 40
    undeclared, failures, checked, seen = [], [], 0, set()
    for route in routes:
        if route.path.startswith("/console"):
            assert declared_action(route) is None, route.path
            for method in sorted(route.methods - {"HEAD"}):
                for caller, token in tokens.items():
                    async with gateway.as_token(token) as client:
                        r = await client.request(method, fill(route.path), follow_redirects=False,
                                                 **({"data": {"csrf": "x"}} if method == "POST" else {}))
                    checked += 1
                    if route.path in CONSOLE_OPEN:
                        ok = r.status_code in (200, 303)
                    elif method == "GET":
                        ok = r.status_code == 303 and r.headers["location"] == "/console/login"
                    else:
                        ok = r.status_code in (401, 403, 415) or (r.status_code == 303 and r.headers["location"] == "/console/login")
                    if not ok:
                        failures.append(f"{caller:<9} {method} {route.path}: a bearer token got {r.status_code} from the console")
            continue
        declared = "public" if route.path in PUBLIC and declared_action(route) is None else declared_action(route)
        for method in sorted(route.methods - {"HEAD"}):
            seen.add((method, route.path))
            action = EXPECTED.get((method, route.path))
            if action is None:
                undeclared.append(f"{method} {route.path} (declares {declared})")
                continue
            if declared != action:
                failures.append(f"{method} {route.path}: declares {declared}, the matrix expects {action}")
            for caller, token in tokens.items():
                if action == "public":
                    allowed = True
                elif caller == "anonymous":
                    allowed = False
                elif action == "authenticated":
                    allowed = True
                else:
                    allowed = any(a in HOLDS[caller] for a in action.split("|"))
                async with gateway.as_token(token) as client:
                    body = {} if method in ("POST", "PUT", "PATCH") else None
                    if route.path == "/v1/keys/signing/rotate":
                        body = {"grace_seconds": 3600}  # the other callers' tokens stay valid
                    if route.path in ("/v1/auth/token", "/v1/auth/revoke"):
                        r = await client.request(method, fill(route.path), content="",
                                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
                    else:
                        r = await client.request(method, fill(route.path), json=body)
                checked += 1
                if r.status_code >= 500:
                    failures.append(f"{caller:<9} {method} {route.path}: {r.status_code} (a 5xx is never acceptable)")
                elif allowed and r.status_code in (401, 403):
                    failures.append(f"{caller:<9} {method} {route.path}: expected allowed, got {r.status_code} {r.text[:120]}")
                elif not allowed and r.status_code != (401 if caller == "anonymous" else 403):
                    failures.append(f"{caller:<9} {method} {route.path}: expected denied, got {r.status_code}")
    assert undeclared == [], "routes without an entry in EXPECTED: " + "; ".join(undeclared)
    assert set(EXPECTED) - seen == set(), "entries for routes that no longer exist"
    assert failures == [], "\n".join(failures)
    assert checked > 300
