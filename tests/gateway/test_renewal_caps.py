"""Renewal obeys the caps issuance obeys (issue 10, item 3): the policy is decided
again now for the lease's connector and resource, its max TTL and a run token's
max apply through the one TTL calculation, and a lease's whole life is bounded
by what issuance allowed. Against the real Redis on 127.0.0.1 (a renewable type)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from gateway.store.models import LeaseRow
from tests.conftest import Gateway

sqlite_only = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
both_stores = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def now() -> datetime:
    return datetime.now(timezone.utc)


async def cache_connector(gw: Gateway, redis_url: str) -> None:
    """A Redis connector allowing an hour (its type allows a day): only the policy caps lower."""
    r = await gw.client.put("/v1/secrets/local/targets/cache", json={"data": {"url": redis_url}})
    assert r.status_code == 200, r.text
    for name in ("cache", "other"):
        r = await gw.client.put(f"/v1/connectors/{name}", json={
            "type": "redis", "auth_method": "password", "secret": "local/targets/cache",
            "resources": ["features"], "default_ttl_seconds": 60, "max_ttl_seconds": 3600})
        assert r.status_code in (200, 201), r.text


async def put_policy(gw: Gateway, name: str, subject: str, actions: list[str], connectors: list[str], max_ttl: int) -> None:
    r = await gw.client.put(f"/v1/policies/{name}", json={"rules": [{
        "principals": {"issuer": "credgate", "subject": subject}, "actions": actions,
        "connectors": connectors, "resources": ["*"], "max_ttl_seconds": max_ttl}]})
    assert r.status_code in (200, 201), r.text


async def client_token(gw: Gateway, client_id: str) -> str:
    secret = (await gw.client.post("/v1/clients", json={"client_id": client_id})).json()["client_secret"]
    async with gw.as_token(None) as anon:
        r = await anon.post("/v1/auth/token", headers=FORM,
                            content=f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}")
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


@both_stores
async def test_a_120s_policy_caps_every_renewal_and_the_lease_life(gateway: Gateway, redis_server: str) -> None:
    await cache_connector(gateway, redis_server)
    await put_policy(gateway, "short", "client:svc", ["credentials:issue"], ["cache"], 120)
    token = await client_token(gateway, "svc")
    async with gateway.as_token(token) as svc:
        out = (await svc.post("/v1/credentials", json={"connector": "cache", "resource": "features", "ttl_seconds": 86400})).json()
        assert out["ttl_seconds"] == 120 and out["ttl_capped"] is True
        lease = (await gateway.client.get(f"/v1/leases/{out['lease_id']}")).json()
        issued = when(lease["issued_at"])
        assert when(lease["max_expires_at"]) == issued + timedelta(seconds=120)  # the policy bounds its whole life

        r = await svc.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 86400})
        assert r.status_code == 200, r.text
        assert when(r.json()["expires_at"]) <= now() + timedelta(seconds=120)  # was now + 3600 (the connector max)
        assert when(r.json()["max_expires_at"]) <= issued + timedelta(seconds=120)

    # An admin renewing someone else's lease renews within the caps recorded at issue.
    r = await gateway.client.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 86400})
    assert r.status_code == 200, r.text
    assert when(r.json()["expires_at"]) <= issued + timedelta(seconds=120)

    # Past its max the lease can't be renewed at all: issue a new one.
    async with gateway.runtime.store.write() as s:
        await s.execute(update(LeaseRow).where(LeaseRow.id == out["lease_id"]).values(
            issued_at=now() - timedelta(seconds=200), max_expires_at=now() - timedelta(seconds=80)))
    async with gateway.as_token(token) as svc:
        r = await svc.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 60})
    assert r.status_code == 409 and r.json()["error"]["code"] == "lease_max_ttl_reached"


@sqlite_only
async def test_a_run_tokens_max_credential_ttl_caps_its_renewals(gateway: Gateway, redis_server: str) -> None:
    await cache_connector(gateway, redis_server)
    actions = ["runs:delegate", "credentials:issue"]
    await put_policy(gateway, "server", "client:zenml-server", actions, ["cache"], 120)
    server_token = await client_token(gateway, "zenml-server")
    async with gateway.as_token(server_token) as server:
        r = await server.post("/v1/runs/run-A/token", json={"connectors": ["cache"], "resources": ["features"]})
        assert r.status_code == 200 and r.json()["max_credential_ttl_seconds"] == 120
        run_token = r.json()["token"]
    # The delegator's policy loosens later; the run keeps the cap it was minted with.
    await put_policy(gateway, "server", "client:zenml-server", actions, ["cache"], 3600)
    async with gateway.as_token(run_token) as run:
        out = (await run.post("/v1/credentials", json={"connector": "cache", "resource": "features", "ttl_seconds": 86400})).json()
        assert out["ttl_seconds"] == 120
        r = await run.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 86400})
    assert r.status_code == 200, r.text
    assert when(r.json()["expires_at"]) <= now() + timedelta(seconds=120)  # was now + 3600
    assert when(r.json()["max_expires_at"]) <= when(r.json()["issued_at"]) + timedelta(seconds=120)
    assert r.json()["principal"] == "credgate/run:run-A"


@both_stores
async def test_renewal_is_refused_once_the_policy_no_longer_grants_the_connector(gateway: Gateway, redis_server: str) -> None:
    await cache_connector(gateway, redis_server)
    await put_policy(gateway, "svc", "client:svc", ["credentials:issue"], ["cache", "other"], 600)
    token = await client_token(gateway, "svc")
    async with gateway.as_token(token) as svc:
        out = (await svc.post("/v1/credentials", json={"connector": "cache", "resource": "features"})).json()
        assert (await svc.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 120})).status_code == 200
        # The policy now grants only the other connector: the caller may still issue, just not this.
        await put_policy(gateway, "svc", "client:svc", ["credentials:issue"], ["other"], 600)
        before = (await gateway.client.get(f"/v1/leases/{out['lease_id']}")).json()["expires_at"]
        r = await svc.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 300})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
        assert (await gateway.client.get(f"/v1/leases/{out['lease_id']}")).json()["expires_at"] == before
        # And with no policy at all.
        assert (await gateway.client.delete("/v1/policies/svc")).status_code == 204
        r = await svc.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 300})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


@sqlite_only
async def test_a_wrapped_lease_is_renewed_under_credentials_wrap(gateway: Gateway, redis_server: str) -> None:
    """It was issued under credentials:wrap, so that is what is decided again: a service that
    may only wrap (never see a credential) renews what it wrapped, within the wrap rule's max."""
    await cache_connector(gateway, redis_server)
    await put_policy(gateway, "wrapper", "client:wrapper", ["credentials:wrap"], ["cache"], 90)
    token = await client_token(gateway, "wrapper")
    async with gateway.as_token(token) as wrapper:
        out = (await wrapper.post("/v1/credentials", json={"connector": "cache", "resource": "features", "wrap": True})).json()
        assert out["credential"] is None and out["wrap_token"]
        r = await wrapper.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 3600})
        assert r.status_code == 200, r.text
        assert when(r.json()["expires_at"]) <= now() + timedelta(seconds=90)
        plain = (await gateway.client.post("/v1/credentials", json={"connector": "cache", "resource": "features"})).json()
        r = await wrapper.post(f"/v1/leases/{plain['lease_id']}/renew", json={"ttl_seconds": 60})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"  # not its lease


@sqlite_only
async def test_renewal_is_refused_when_the_connector_no_longer_reaches_the_resource(gateway: Gateway, redis_server: str) -> None:
    await cache_connector(gateway, redis_server)
    out = (await gateway.client.post("/v1/credentials", json={"connector": "cache", "resource": "features"})).json()
    r = await gateway.client.put("/v1/connectors/cache", json={
        "type": "redis", "auth_method": "password", "secret": "local/targets/cache",
        "resources": ["sessions"], "default_ttl_seconds": 60, "max_ttl_seconds": 3600})
    assert r.status_code == 200, r.text
    r = await gateway.client.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 120})
    assert r.status_code == 403 and r.json()["error"]["code"] == "resource_not_allowed"
