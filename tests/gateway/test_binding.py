"""Connector material: who may bind a connector to a secret, who may change a bound secret,
and connectors refused when they are added rather than at first use (issue 10, items 1 and 7).

Binding needs ``secrets:bind`` on the secret (resource ``BACKEND/PATH``, connector the one
being bound); changing a secret that connectors draw on needs ``connectors:manage`` on each
of them. Both are decided by ``Catalog.authorize_material``.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import Gateway

DSN = "postgresql://admin:CANARY-admin-dsn-pw@db.internal:5432/postgres"


async def ok(r, *status: int) -> dict:
    assert r.status_code in (status or (200, 201)), r.text
    return r.json() if r.content else {}


async def key_for(gw: Gateway, name: str, role: str = "operator") -> str:
    return (await ok(await gw.client.post("/v1/admin-keys", json={"name": name, "role": role}), 201))["token"]


async def events(gw: Gateway, **params) -> list[dict]:
    return (await ok(await gw.client.get("/v1/audit", params={"limit": 1000, **params})))["items"]


def team_a_policy(*extra_rules: dict) -> dict:
    """admin_key:teama manages the connectors team-a-* (and, as an operator, may wrap)."""
    return {"rules": [
        {"principals": {"issuer": "credgate", "subject": "admin_key:teama"},
         "actions": ["connectors:manage"], "connectors": ["team-a-*"]},
        *extra_rules,
    ]}


def static_body(secret: str) -> dict:
    return {"type": "static", "auth_method": "static", "secret": secret, "resources": ["default"]}


def pg_body(secret: str) -> dict:
    return {"type": "postgres", "auth_method": "password", "secret": secret, "resources": ["analytics"]}


async def test_managing_connectors_does_not_reach_a_secret_one_may_not_bind(gateway: Gateway) -> None:
    """The review's attack: connectors:manage on team-a-* and no reveal anywhere, a static
    connector on the admin DSN, a wrapped credential, unwrap. Refused at the bind, audited."""
    c = gateway.client
    await ok(await c.put("/v1/secrets/local/targets/pg", json={"data": {"dsn": DSN}}))
    await ok(await c.put("/v1/policies/team-a", json=team_a_policy()), 201)
    token = await key_for(gateway, "teama")
    async with gateway.as_token(token) as teama:
        for body in (static_body("local/targets/pg"), pg_body("local/targets/pg")):
            r = await teama.put("/v1/connectors/team-a-leak", json=body)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "permission_denied" and "secrets:bind" in r.json()["error"]["message"]
            assert "CANARY" not in r.text
        # Nothing was created, so there is nothing to issue from.
        assert (await c.get("/v1/connectors/team-a-leak")).status_code == 404
        r = await teama.post("/v1/credentials", json={"connector": "team-a-leak", "resource": "default", "wrap": True})
        assert r.status_code == 404 and "CANARY" not in r.text
        # connectors:manage is per connector: another team's name is refused before any binding.
        r = await teama.put("/v1/connectors/team-b-x", json=static_body("local/targets/pg"))
        assert r.status_code == 403 and "connectors:manage" in r.json()["error"]["message"]
    denied = [e for e in await events(gateway, decision="deny") if e["subject"] == "admin_key:teama"]
    assert any(e["action"] == "secrets:bind" and e["target"] == "PUT /v1/connectors/team-a-leak"
               and e["outcome"] == "403 permission_denied" for e in denied), denied
    assert any(e["action"] == "connectors:manage" and e["target"] == "PUT /v1/connectors/team-b-x" for e in denied)
    assert "CANARY" not in json.dumps(await events(gateway))

    # The admin (secrets:bind through '*') still can, and the material is handed out wrapped.
    await ok(await c.put("/v1/connectors/team-a-leak", json=static_body("local/targets/pg")), 201)
    wrapped = await ok(await c.post("/v1/credentials", json={"connector": "team-a-leak", "resource": "default", "wrap": True}))
    async with gateway.as_token(None) as anon:
        out = await ok(await anon.post("/v1/unwrap", json={"wrap_token": wrapped["wrap_token"]}))
    assert out["credential"] == {"dsn": DSN}
    allowed = [e for e in await events(gateway, decision="allow") if e["target"] == "PUT /v1/connectors/team-a-leak"]
    assert allowed and allowed[-1]["details"]["secret"] == "local/targets/pg"


async def test_secrets_bind_is_decided_on_every_change_of_the_binding(gateway: Gateway) -> None:
    c = gateway.client
    await ok(await c.put("/v1/secrets/local/targets/pg", json={"data": {"dsn": DSN}}))
    await ok(await c.put("/v1/secrets/local/team-a/vendor", json={"data": {"api_key": "CANARY-team-a"}}))
    await ok(await c.put("/v1/secrets/local/team-b/vendor", json={"data": {"api_key": "CANARY-team-b"}}))
    bind = {"principals": {"issuer": "credgate", "subject": "admin_key:teama"},
            "actions": ["secrets:bind"], "connectors": ["team-a-*"], "resources": ["local/team-a/*"]}
    await ok(await c.put("/v1/policies/team-a", json=team_a_policy(bind)), 201)
    async with gateway.as_token(await key_for(gateway, "teama")) as teama:
        await ok(await teama.put("/v1/connectors/team-a-vendor", json=static_body("local/team-a/vendor")), 201)
        await ok(await teama.put("/v1/connectors/team-a-vendor", json={**static_body("local/team-a/vendor"),
                                                                        "max_ttl_seconds": 600}), 200)
        # Re-pointing the connector is a new binding, decided again.
        for elsewhere in ("local/targets/pg", "local/team-b/vendor"):
            r = await teama.put("/v1/connectors/team-a-vendor", json=static_body(elsewhere))
            assert r.status_code == 403 and "secrets:bind" in r.json()["error"]["message"], r.text
        assert (await ok(await c.get("/v1/connectors/team-a-vendor")))["secret"] == "local/team-a/vendor"
        # The rule's connectors glob applies to binding too.
        await ok(await c.put("/v1/policies/team-a-wide", json={"rules": [
            {"principals": {"issuer": "credgate", "subject": "admin_key:teama"},
             "actions": ["connectors:manage"], "connectors": ["shared-*"]}]}), 201)
        r = await teama.put("/v1/connectors/shared-vendor", json=static_body("local/team-a/vendor"))
        assert r.status_code == 403 and "secrets:bind" in r.json()["error"]["message"]
    # policy explain answers for the new action like for any other.
    who = {"issuer": "credgate", "subject": "admin_key:teama", "roles": ["operator"]}
    r = await ok(await c.post("/v1/policies/explain", json={
        "principal": who, "action": "secrets:bind", "connector": "team-a-x", "resource": "local/team-a/vendor"}))
    assert (r["decision"], r["rule"]) == ("allow", "team-a/1")
    r = await ok(await c.post("/v1/policies/explain", json={
        "principal": {**who, "subject": "admin_key:ops"}, "action": "secrets:bind", "resource": "local/team-a/vendor"}))
    assert r["decision"] == "deny"  # the built-in operator does not bind


async def test_a_bound_secret_is_connector_material(gateway: Gateway) -> None:
    """secrets:write alone can't rewrite, delete, destroy or restore a secret a connector draws
    on (that would redirect its credentials): connectors:manage on each such connector is needed."""
    c = gateway.client
    await ok(await c.put("/v1/secrets/local/targets/pg", json={"data": {"dsn": DSN}}))
    await ok(await c.put("/v1/connectors/pg", json=pg_body("local/targets/pg")), 201)
    evil = {"data": {"dsn": "postgresql://admin:x@attacker.example:5432/postgres"}}
    async with gateway.as_token(await key_for(gateway, "ops")) as ops:  # built-in operator: secrets:write
        for method, url, kw in (
            ("PUT", "/v1/secrets/local/targets/pg", {"json": evil}),
            ("DELETE", "/v1/secrets/local/targets/pg", {}),
            ("DELETE", "/v1/secrets/local/targets/pg?destroy=true", {}),
        ):
            r = await ops.request(method, url, **kw)
            assert r.status_code == 403, (method, url, r.text)
            assert "connectors:manage" in r.json()["error"]["message"] and "'pg'" in r.json()["error"]["message"]
        await ok(await ops.put("/v1/secrets/local/unbound/x", json={"data": {"k": "v"}}))  # not material: fine
        await ok(await c.delete("/v1/secrets/local/targets/pg"), 204)  # the admin soft-deletes it...
        r = await ops.post("/v1/secrets/local/targets/pg:restore")  # ...restoring it is a change too
        assert r.status_code == 403, r.text
    await ok(await c.post("/v1/secrets/local/targets/pg:restore"))
    shown = await ok(await c.get("/v1/secrets/local/targets/pg", params={"reveal": "true"}))
    assert shown["data"] == {"dsn": DSN} and shown["current_version"] == 1
    denied = [e for e in await events(gateway, decision="deny") if e["subject"] == "admin_key:ops"]
    assert {e["target"] for e in denied if e["action"] == "connectors:manage"} >= {
        "PUT /v1/secrets/local/targets/pg", "DELETE /v1/secrets/local/targets/pg",
        "POST /v1/secrets/local/targets/pg:restore"}
    # The admin rewrites it.
    await ok(await c.put("/v1/secrets/local/targets/pg", json={"data": {"dsn": DSN + "?sslmode=require"}}))


async def test_writing_shared_material_needs_every_connector_that_draws_on_it(gateway: Gateway) -> None:
    c = gateway.client
    await ok(await c.put("/v1/secrets/local/team-a/vendor", json={"data": {"api_key": "k1"}}))
    await ok(await c.put("/v1/connectors/team-a-vendor", json=static_body("local/team-a/vendor")), 201)
    write = {"principals": {"issuer": "credgate", "subject": "admin_key:teama"},
             "actions": ["secrets:write"], "resources": ["local/team-a/*"]}
    await ok(await c.put("/v1/policies/team-a", json=team_a_policy(write)), 201)
    async with gateway.as_token(await key_for(gateway, "teama", role="auditor")) as teama:
        await ok(await teama.put("/v1/secrets/local/team-a/vendor", json={"data": {"api_key": "k2"}}))
        await ok(await c.put("/v1/connectors/team-b-vendor", json=static_body("local/team-a/vendor")), 201)
        r = await teama.put("/v1/secrets/local/team-a/vendor", json={"data": {"api_key": "k3"}})
        assert r.status_code == 403 and "'team-b-vendor'" in r.json()["error"]["message"], r.text
        await ok(await c.delete("/v1/connectors/team-b-vendor"), 204)
        await ok(await teama.put("/v1/secrets/local/team-a/vendor", json={"data": {"api_key": "k3"}}))


async def test_replacing_a_backend_connectors_draw_on_needs_each_of_them(gateway: Gateway) -> None:
    """A backend's configuration decides where its connectors' material is read: replacing it
    is rewriting that material, so backends:manage alone is not enough while a connector draws on it."""
    c = gateway.client
    await ok(await c.put("/v1/backends/team-a", json={"type": "local"}), 201)
    await ok(await c.put("/v1/secrets/team-a/vendor", json={"data": {"api_key": "k1"}}))
    manage = {"principals": {"issuer": "credgate", "subject": "admin_key:teama"}, "actions": ["backends:manage"]}
    await ok(await c.put("/v1/policies/team-a", json=team_a_policy(manage)), 201)
    async with gateway.as_token(await key_for(gateway, "teama", role="auditor")) as teama:
        await ok(await teama.put("/v1/backends/team-a", json={"type": "local"}))  # nothing draws on it yet
        await ok(await c.put("/v1/connectors/team-b-vendor", json=static_body("team-a/vendor")), 201)
        r = await teama.put("/v1/backends/team-a", json={"type": "local"})
        assert r.status_code == 403 and "'team-b-vendor'" in r.json()["error"]["message"], r.text
        await ok(await c.put("/v1/backends/team-a", json={"type": "local"}))  # the admin may
        await ok(await c.delete("/v1/connectors/team-b-vendor"), 204)
        await ok(await teama.put("/v1/backends/team-a", json={"type": "local"}))
    denied = [e for e in await events(gateway, decision="deny") if e["subject"] == "admin_key:teama"]
    assert any(e["action"] == "connectors:manage" and e["target"] == "PUT /v1/backends/team-a" for e in denied), denied


# --- item 7: a connector that can't work is refused when it is added ------------------


async def test_material_is_checked_when_a_connector_is_added_or_replaced(gateway: Gateway) -> None:
    c = gateway.client
    await ok(await c.put("/v1/secrets/local/t/typo", json={"data": {"dns": "CANARY-typo-value"}}))
    r = await c.put("/v1/connectors/pg", json=pg_body("local/t/typo"))
    err = r.json()["error"]
    assert (r.status_code, err["code"]) == (422, "connector_material_invalid"), r.text
    assert err["missing"] == ["dsn"] and err["unexpected"] == ["dns"] and "'dsn'" in err["message"]
    assert "CANARY" not in r.text
    long_key = "k" * 100  # a caller's key name is repeated bounded, never whole
    await ok(await c.put("/v1/secrets/local/t/extra", json={"data": {"dsn": DSN, long_key: "v"}}))
    r = await c.put("/v1/connectors/pg", json=pg_body("local/t/extra"))
    assert r.status_code == 422 and r.json()["error"]["unexpected"] == ["k" * 16 + "..."] and long_key not in r.text
    r = await c.put("/v1/connectors/pg", json=pg_body("local/t/nothing-here"))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "connector_material_missing")
    await ok(await c.put("/v1/secrets/local/t/redis", json={"data": {"url": "http://:CANARY-pw@h:6379"}}))
    r = await c.put("/v1/connectors/cache", json={"type": "redis", "auth_method": "password",
                                                 "secret": "local/t/redis", "resources": ["features"]})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "connector_material_invalid"), r.text
    assert r.json()["error"]["invalid"][0]["key"] == "url" and "CANARY" not in r.text
    await ok(await c.put("/v1/secrets/local/t/bad-dsn", json={"data": {"dsn": "postgresql://u:CANARY-pw@h/db?bogus=1"}}))
    r = await c.put("/v1/connectors/pg", json=pg_body("local/t/bad-dsn"))
    assert (r.status_code, r.json()["error"]["code"]) == (422, "connector_invalid") and "CANARY" not in r.text
    # A static connector configured to hand out keys its secret lacks.
    await ok(await c.put("/v1/secrets/local/t/vendor", json={"data": {"api_key": "CANARY-api-key"}}))
    r = await c.put("/v1/connectors/vendor", json={**static_body("local/t/vendor"),
                                                  "config": {"keys": ["api_key", "webhook_secret"]}})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "connector_material_invalid"), r.text
    assert r.json()["error"]["missing"] == ["webhook_secret"] and "CANARY" not in r.text
    assert (await ok(await c.get("/v1/connectors")))["items"] == []
    # Replacing a working connector with a definition whose secret can't serve it keeps the old one.
    await ok(await c.put("/v1/secrets/local/t/pg", json={"data": {"dsn": DSN}}))
    await ok(await c.put("/v1/connectors/pg", json=pg_body("local/t/pg")), 201)
    r = await c.put("/v1/connectors/pg", json=pg_body("local/t/typo"))
    assert r.status_code == 422
    assert (await ok(await c.get("/v1/connectors/pg")))["secret"] == "local/t/pg"


# --- item 7: a target refusing the resource --------------------------------------------


async def leases_of(gw: Gateway, connector: str) -> list[dict]:
    return (await ok(await gw.client.get("/v1/leases", params={"connector": connector, "limit": 100})))["items"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_resource_the_target_refuses_is_a_4xx_and_leaves_no_lease(gateway: Gateway, pg_cluster,
                                                                            mariadb_server: dict) -> None:
    c = gateway.client
    await ok(await c.put("/v1/secrets/local/t/pg", json={"data": {"dsn": pg_cluster.dsn()}}))
    await ok(await c.put("/v1/connectors/pg", json={**pg_body("local/t/pg"), "resources": ["*"]}), 201)
    m = mariadb_server
    await ok(await c.put("/v1/secrets/local/t/maria", json={"data": {
        "host": m["host"], "port": str(m["port"]), "username": m["user"], "password": m["password"]}}))
    await ok(await c.put("/v1/connectors/maria", json={"type": "mysql", "auth_method": "password",
                                                       "secret": "local/t/maria", "resources": ["*"]}), 201)
    for connector, resource in (("pg", "postgres/nosuch_schema"), ("pg", "nosuch_db"), ("maria", "nosuch_db_cg"),
                                ("maria", "mysql/nosuch_table")):
        r = await c.post("/v1/credentials", json={"connector": connector, "resource": resource})
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (409, "target_rejected_resource"), r.text
        assert err["resource"] == resource and err["reason"] == "not_found"
    for connector in ("pg", "maria"):
        states = [lease["state"] for lease in await leases_of(gateway, connector)]
        assert states and set(states) == {"revoked"}, states  # nothing pending, active or left to revoke
