"""Identity is issuer plus subject (issue 10, item 4).

Leases, runs and Idempotency-Keys belong to ``Principal.owner`` (``ISSUER/SUBJECT``),
so a workload of a trusted issuer whose subject spells ``client:meta`` owns nothing
of the OAuth2 client ``meta``; and trusted issuers' mappings may not produce such a
subject at all. Migration 0007 qualifies the owners already stored.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.pool import NullPool

from gateway.store.database import sync_url
from gateway.store.migrate import alembic_config, upgrade
from gateway.store.models import UTCDateTime, utcnow
from tests.conftest import Gateway

sqlite_only = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
both_stores = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def idp():
    from tests.services.oidc_provider import OIDCProvider

    with OIDCProvider() as provider:
        yield provider


async def trust(gw: Gateway, idp, **mapping) -> None:
    r = await gw.client.put("/v1/issuers/k8s", json={
        "issuer_url": idp.issuer, "jwks_url": f"{idp.issuer}/jwks", "audiences": ["credgate"],
        "algorithms": ["RS256"], "claim_mapping": mapping})
    assert r.status_code in (200, 201), r.text


def workload_token(idp, sub: str, **extra) -> str:
    now = int(time.time())
    return idp.sign({"iss": idp.issuer, "sub": sub, "aud": "credgate", "iat": now, "nbf": now, "exp": now + 600, **extra})


async def client_token(gw: Gateway, client_id: str) -> str:
    secret = (await gw.client.post("/v1/clients", json={"client_id": client_id})).json()["client_secret"]
    async with gw.as_token(None) as anon:
        r = await anon.post("/v1/auth/token", headers=FORM,
                            content=f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}")
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def status(gw: Gateway, token: str) -> tuple[int, str | None]:
    async with gw.as_token(token) as c:
        r = await c.get("/v1/auth/whoami")
    return r.status_code, (r.json()["error"]["code"] if r.status_code >= 400 else r.json()["subject"])


# --- the refusal at the door --------------------------------------------------------


@sqlite_only
async def test_trusted_issuers_may_not_map_to_a_gateway_subject(gateway: Gateway, idp) -> None:
    await trust(gateway, idp)
    for sub in ("client:meta", "admin_key:bootstrap", "run:run-A", "workload:x", "credgate", "credgate/client:meta",
                "Client:meta", "  client:meta", "CREDGATE:x"):
        assert await status(gateway, workload_token(idp, sub)) == (401, "token_subject_reserved"), sub
    assert await status(gateway, workload_token(idp, "x" * 513)) == (401, "token_subject_invalid")
    for fine in ("system:serviceaccount:ml:trainer", "clients:meta", "repo:acme/credgate:ref:refs/heads/main"):
        assert await status(gateway, workload_token(idp, fine)) == (200, fine)
    # Whatever claim the subject is mapped from.
    await trust(gateway, idp, subject="email")
    assert await status(gateway, workload_token(idp, "ok", email="client:meta")) == (401, "token_subject_reserved")
    # And no exchange turns one into a gateway token.
    async with gateway.as_token(None) as anon:
        r = await anon.post("/v1/auth/token", headers=FORM, content="&".join([
            "grant_type=urn:ietf:params:oauth:grant-type:token-exchange",
            f"subject_token={workload_token(idp, 'ok', email='client:meta')}",
            "subject_token_type=urn:ietf:params:oauth:token-type:jwt"]))
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


# --- ownership keys, even if such a subject got in ----------------------------------

POLICIES = {
    "meta": {"principals": {"issuer": "credgate", "subject": "client:meta"}},
    "workloads": {"principals": {"issuer": "k8s"}},
}


@both_stores
async def test_a_workload_spelling_a_client_owns_none_of_its_leases_runs_or_keys(
    gateway: Gateway, idp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if the door check were not there (a token exchanged before it, or a gap in it):
    the workload ``k8s/client:meta`` may issue and delegate, but never as ``credgate/client:meta``."""
    monkeypatch.setattr("gateway.identity.issuers.check_subject", lambda subject: None, raising=False)
    await trust(gateway, idp)
    r = await gateway.client.put("/v1/secrets/local/vendors/wandb", json={"data": {"api_key": "CANARY-ownership"}})
    assert r.status_code == 200
    r = await gateway.client.put("/v1/connectors/wandb", json={
        "type": "static", "auth_method": "static", "secret": "local/vendors/wandb", "resources": ["default"]})
    assert r.status_code == 201, r.text
    for name, rule in POLICIES.items():
        r = await gateway.client.put(f"/v1/policies/{name}", json={"rules": [{
            **rule, "actions": ["runs:delegate", "credentials:issue", "credentials:wrap"], "connectors": ["wandb"]}]})
        assert r.status_code == 201, r.text
    body = {"connector": "wandb", "resource": "default", "wrap": True}
    key = {"Idempotency-Key": "step-1"}

    meta = gateway.as_token(await client_token(gateway, "meta"))
    spoof = gateway.as_token(workload_token(idp, "client:meta"))
    async with meta, spoof:
        assert (await spoof.get("/v1/auth/whoami")).json()["subject"] == "client:meta"  # same subject, other issuer
        first = (await meta.post("/v1/credentials", json=body, headers=key)).json()
        run = await meta.post("/v1/runs/run-A/token", json={"connectors": ["wandb"], "resources": ["default"]})
        assert run.status_code == 200, run.text

        # No replay of the client's Idempotency-Key: a lease of its own instead.
        r = await spoof.post("/v1/credentials", json=body, headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["lease_id"] != first["lease_id"] and r.json()["wrap_token"] != first["wrap_token"]
        assert r.json()["replayed"] is False
        spoofed_lease = r.json()["lease_id"]
        # Not the client's run: no token for it, no credentials for it, no revoking it.
        r = await spoof.post("/v1/runs/run-A/token", json={"connectors": ["wandb"], "resources": ["default"]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "run_not_yours"
        r = await spoof.post("/v1/runs/run-A/credentials", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
        r = await spoof.post("/v1/runs/run-A/revoke")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        # Not the client's lease.
        r = await spoof.post(f"/v1/leases/{first['lease_id']}/renew", json={})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"

        # The client itself still has all of it.
        again = (await meta.post("/v1/credentials", json=body, headers=key)).json()
        assert again["lease_id"] == first["lease_id"] and again["replayed"] is True
        r = await meta.post("/v1/runs/run-A/credentials", json=body)
        assert r.status_code == 200, r.text
        for_run = r.json()["lease_id"]
        r = await meta.post("/v1/runs/run-A/revoke")
        assert r.status_code == 200 and r.json()["revoked"] is True

    async def owned_by(principal: str) -> set[str]:
        r = await gateway.client.get("/v1/leases", params={"principal": principal})
        assert r.status_code == 200, r.text
        return {x["lease_id"] for x in r.json()["items"]}

    assert (await gateway.client.get(f"/v1/leases/{first['lease_id']}")).json()["principal"] == "credgate/client:meta"
    assert await owned_by("credgate/client:meta") == await owned_by("client:meta") == {first["lease_id"], for_run}
    assert await owned_by("k8s/client:meta") == {spoofed_lease}
    r = await gateway.client.post("/v1/leases/revoke", json={"principal": "k8s/client:meta"})
    assert r.json()["matched"] == 1
    assert (await gateway.client.get(f"/v1/leases/{first['lease_id']}")).json()["state"] == "active"


# --- migration 0007 ----------------------------------------------------------------

LEASES = sa.table(
    "leases", *(sa.column(c) for c in ("id", "connector", "connector_type", "resource", "principal", "state",
                                        "revocability", "idempotency_key")),
    sa.column("renewable", sa.Boolean), sa.column("wrapped", sa.Boolean), sa.column("attempts", sa.Integer),
    sa.column("revoke_state", sa.JSON), *(sa.column(c, UTCDateTime) for c in ("issued_at", "expires_at", "max_expires_at", "updated_at")),
)
RUNS = sa.table("runs", sa.column("run_id"), sa.column("created_by"), sa.column("created_at", UTCDateTime))

BEFORE = {  # lease id -> (owner before 0007, its Idempotency-Key)
    "lease_1": ("client:meta", "k"),
    "lease_2": ("credgate/client:meta", "k"),  # a workload's subject that spelled the new key
    "lease_3": ("system:serviceaccount:ml:trainer", None),
    "lease_4": ("admin_key:bootstrap", None),
    "lease_5": ("run:run-A", None),
    "lease_6": ("adminXkey:x", None),  # '_' is not a wildcard
}
AFTER = {
    "lease_1": "credgate/client:meta",
    "lease_2": "?/credgate/client:meta",
    "lease_3": "?/system:serviceaccount:ml:trainer",
    "lease_4": "credgate/admin_key:bootstrap",
    "lease_5": "credgate/run:run-A",
    "lease_6": "?/adminXkey:x",
}
RUNS_BEFORE = {"run-A": "client:meta", "run-B": "repo:acme/app:ref:refs/heads/main"}
RUNS_AFTER = {"run-A": "credgate/client:meta", "run-B": "?/repo:acme/app:ref:refs/heads/main"}


def _migrate(url: str, revision: str, down: bool = False) -> None:
    if not down:
        upgrade(url, revision)
        return
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def test_migration_0007_qualifies_stored_owners_and_leaves_the_unattributable_unmatched(store_url: str) -> None:
    url = sync_url(store_url)
    _migrate(url, "0006")
    engine = sa.create_engine(url, poolclass=NullPool)
    now = utcnow()
    try:
        with engine.begin() as conn:
            conn.execute(LEASES.insert(), [dict(
                id=lid, connector="c", connector_type="static", resource="default", principal=owner, state="active",
                revocability="expiry-only", idempotency_key=key, renewable=False, wrapped=True, attempts=0,
                revoke_state={}, issued_at=now, expires_at=now + timedelta(minutes=5),
                max_expires_at=now + timedelta(minutes=5), updated_at=now,
            ) for lid, (owner, key) in BEFORE.items()])
            conn.execute(RUNS.insert(), [dict(run_id=r, created_by=o, created_at=now) for r, o in RUNS_BEFORE.items()])

        def owners() -> tuple[dict[str, str], dict[str, str | None], dict[str, str]]:
            with engine.connect() as conn:
                leases = conn.execute(sa.select(LEASES.c.id, LEASES.c.principal, LEASES.c.idempotency_key)).all()
                runs = conn.execute(sa.select(RUNS.c.run_id, RUNS.c.created_by)).all()
            return {i: p for i, p, _ in leases}, {i: k for i, _, k in leases}, dict(runs)

        _migrate(url, "0007")
        leases, keys, runs = owners()
        assert leases == AFTER and runs == RUNS_AFTER
        assert keys == {lid: key for lid, (_, key) in BEFORE.items()}

        _migrate(url, "0006", down=True)
        leases, keys, runs = owners()
        assert leases == {lid: owner for lid, (owner, _) in BEFORE.items()} and runs == RUNS_BEFORE
        assert keys["lease_1"] == "k" and keys["lease_2"] is None  # no clash on the unique key
        _migrate(url, "head")
    finally:
        engine.dispose()
