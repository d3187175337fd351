"""Lease reads and revocations are decided on the lease's connector and resource.

A rule granting ``leases:read``/``leases:revoke`` on connector ``a-*`` shows and revokes the
leases of ``a-one``, never those of ``b-one`` (one lease, the list, the bulk revoke). A
lease's owner reads and revokes its own lease with no lease right at all (revoking one's own
credential only gives authority up): a client, and a run token, whose ``close()`` revokes
what it issued."""

from __future__ import annotations

from tests.conftest import Gateway
from tests.gateway.test_ownership import client_token


async def ok(r, *codes: int):
    assert r.status_code in (codes or (200,)), r.text
    return r.json()


async def setup(gw: Gateway) -> tuple[str, str]:
    c = gw.client
    for name in ("a-one", "b-one"):
        await ok(await c.put(f"/v1/secrets/local/scope/{name}", json={"data": {"k": "CANARY-scope"}}))
        await ok(await c.put(f"/v1/connectors/{name}", json={
            "type": "static", "auth_method": "static", "secret": f"local/scope/{name}", "resources": ["default"]}), 201)
    await ok(await c.put("/v1/policies/scope", json={"rules": [
        {"principals": {"issuer": "credgate", "subject": "client:ops-a"},
         "actions": ["leases:read", "leases:revoke"], "connectors": ["a-*"]},
        {"principals": {"issuer": "credgate", "subject": "client:app"},
         "actions": ["credentials:wrap", "runs:delegate"], "connectors": ["a-one", "b-one"]},
    ]}), 201)
    return await client_token(gw, "ops-a"), await client_token(gw, "app")


async def issue(gw: Gateway, token: str, connector: str) -> str:
    async with gw.as_token(token) as c:
        return (await ok(await c.post("/v1/credentials", json={"connector": connector, "resource": "default", "wrap": True}), 200, 201))["lease_id"]


async def state(gw: Gateway, lease_id: str) -> str:
    return (await ok(await gw.client.get(f"/v1/leases/{lease_id}")))["state"]


async def test_a_connector_scoped_lease_admin_stays_on_its_connectors(gateway: Gateway) -> None:
    ops, app = await setup(gateway)
    a1, a2, b1, b2 = [await issue(gateway, app, c) for c in ("a-one", "a-one", "b-one", "b-one")]
    async with gateway.as_token(ops) as c:
        assert (await c.get(f"/v1/leases/{a1}")).status_code == 200
        r = await c.get(f"/v1/leases/{b1}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
        listed = {i["lease_id"] for i in (await ok(await c.get("/v1/leases", params={"limit": 1000})))["items"]}
        assert {a1, a2} <= listed and not listed & {b1, b2}
        r = await c.post(f"/v1/leases/{b1}/revoke")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
        # Bulk: naming connector b matches nothing; naming the owner revokes only its a-* leases.
        assert (await ok(await c.post("/v1/leases/revoke", json={"connector": "b-one"})))["matched"] == 0
        out = await ok(await c.post("/v1/leases/revoke", json={"principal": "credgate/client:app"}))
        assert out["matched"] == 2 and out["revoked"] == 2
        assert (await ok(await c.post(f"/v1/leases/{a1}/revoke")))["state"] == "revoked"  # idempotent
    assert [await state(gateway, x) for x in (a1, a2, b1, b2)] == ["revoked", "revoked", "active", "active"]
    # The refused revocation is in the audit trail, with the scoped decision.
    events = (await ok(await gateway.client.get("/v1/audit", params={"limit": 200})))["items"]
    denied = [e for e in events if e.get("lease_id") == b1 and e.get("decision") == "deny"]
    assert "leases:revoke" in {e["action"] for e in denied}, denied


async def test_an_owner_reads_and_revokes_its_own_lease_and_nobody_elses(gateway: Gateway) -> None:
    _, app = await setup(gateway)
    other = await client_token(gateway, "other")
    await ok(await gateway.client.put("/v1/policies/other", json={"rules": [
        {"principals": {"issuer": "credgate", "subject": "client:other"},
         "actions": ["credentials:wrap"], "connectors": ["a-one"]}]}), 201)
    mine, theirs = await issue(gateway, app, "a-one"), await issue(gateway, other, "a-one")
    async with gateway.as_token(app) as c:
        assert (await ok(await c.get(f"/v1/leases/{mine}")))["principal"] == "credgate/client:app"
        for path in (f"/v1/leases/{theirs}", f"/v1/leases/{theirs}/revoke"):
            r = await (c.get(path) if path.endswith(theirs) else c.post(path))
            assert r.status_code == 403, (path, r.text)
        assert (await ok(await c.post(f"/v1/leases/{mine}/revoke")))["state"] == "revoked"
        assert (await c.get("/v1/leases")).status_code == 403  # listing stays leases:read
    assert await state(gateway, theirs) == "active"


async def test_a_run_token_revokes_the_leases_it_issued(gateway: Gateway) -> None:
    _, app = await setup(gateway)
    async with gateway.as_token(app) as c:
        run = await ok(await c.post("/v1/runs/run-scope-1/token", json={
            "connectors": ["a-one"], "resources": ["default"], "ttl_seconds": 600}))
    lease = await issue(gateway, run["token"], "a-one")
    other = await issue(gateway, app, "a-one")
    async with gateway.as_token(run["token"]) as c:
        assert (await c.post(f"/v1/leases/{other}/revoke")).status_code == 403  # the delegator's, not the run's
        assert (await ok(await c.post(f"/v1/leases/{lease}/revoke")))["state"] == "revoked"
    assert await state(gateway, other) == "active"
