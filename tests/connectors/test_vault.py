"""The vault connector against a real OpenBao (``bao``) whose database engine
(postgresql-database-plugin) manages logins on a private scram-sha-256 PostgreSQL cluster.

Each issued credential is *used*: a psycopg login with its username and password reads
``sales.orders``; after revoke the role is gone at PostgreSQL and the login fails. Only the
``database`` engine is exercised: OpenBao does not ship the aws engine (an external plugin).

Layout built once per module (``vault_target``):

    PostgreSQL: table sales.orders (one row, 42)
    OpenBao:    database/ mounted, connection "pg" (the cluster's superuser),
                role "reader"  (SELECT on sales.orders; default_ttl 1h, max_ttl 2h),
                policy "credgate-vault" (what the connector's docs ask for),
                approle/ with role "gate" (that policy, token_ttl 10m)
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.base import IssueRequest, NotRenewable, ResourceNotSupported, ResourceRejected, TargetError
from connectors.base import TargetUnreachable
from connectors.vault import VaultConnector, credential_from, parse_resource
from tests.conftest import service_missing
from tests.services.pgcluster import free_port

psycopg = pytest.importorskip("psycopg")
httpx = pytest.importorskip("httpx")

ROLE = "reader"
POLICY = """
path "database/creds/*"   { capabilities = ["read"] }
path "database/roles"     { capabilities = ["list"] }
path "sys/leases/renew"   { capabilities = ["update"] }
path "sys/leases/revoke"  { capabilities = ["update"] }
path "sys/leases/lookup"  { capabilities = ["update"] }
"""
CHILD_POLICY = POLICY + """
path "auth/token/create"          { capabilities = ["update"] }
path "auth/token/renew-accessor"  { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
"""
NO_REVOKE_POLICY = """
path "database/creds/*"   { capabilities = ["read"] }
"""
CREATION = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    "GRANT USAGE ON SCHEMA sales TO \"{{name}}\";",
    "GRANT SELECT ON sales.orders TO \"{{name}}\";",
]


@dataclass
class VaultTarget:
    bao: Any  # tests.services.openbao.OpenBao
    pg: Any  # tests.services.pgcluster.PgCluster
    token: str = field(repr=False)  # policy credgate-vault, 2h
    role_id: str = field(repr=False)
    secret_id: str = field(repr=False)

    def config(self, **over: Any) -> dict[str, Any]:
        return {"address": self.bao.url, "mount": "database", "engine": "database", "timeout": 5} | over

    def connector(self, auth: str = "token", material: dict[str, str] | None = None, **config: Any) -> VaultConnector:
        if material is None:
            material = {"token": self.token} if auth == "token" else {"role_id": self.role_id, "secret_id": self.secret_id}
        return VaultConnector(self.config(**config), auth, material, name="vault-test")

    def works(self, cred: dict[str, str]) -> bool:
        """Log in with the credential over TCP (scram) and read the granted table."""
        try:
            dsn = self.pg.dsn(dbname="postgres", user=cred["username"], password=cred["password"])
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                return conn.execute("SELECT amount FROM sales.orders").fetchone() == (42,)
        except psycopg.Error:
            return False

    def role_exists(self, name: str) -> bool:
        with psycopg.connect(self.pg.dsn(dbname="postgres"), autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None

    def lookup(self, lease_id: str) -> dict[str, Any] | None:
        r = httpx.put(f"{self.bao.url}/v1/sys/leases/lookup", headers={"X-Vault-Token": self.bao.root_token},
                      json={"lease_id": lease_id}, timeout=10)
        return r.json()["data"] if r.status_code == 200 else None


def _setup_bao(bao: Any, pg: Any) -> VaultTarget:
    root = {"X-Vault-Token": bao.root_token}
    api = bao.url + "/v1/"
    with httpx.Client(headers=root, timeout=30) as http:
        def ok(r: Any) -> Any:
            assert r.status_code in (200, 204), (r.request.url, r.status_code, r.text)
            return r
        mounts = ok(http.get(api + "sys/mounts")).json()["data"]
        if "database/" not in mounts:
            ok(http.post(api + "sys/mounts/database", json={"type": "database"}))
        ok(http.post(api + "database/config/pg", json={
            "plugin_name": "postgresql-database-plugin", "allowed_roles": "*",
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres",
            "username": pg.superuser, "password": pg.password,
        }))
        ok(http.post(api + f"database/roles/{ROLE}", json={
            "db_name": "pg", "creation_statements": CREATION, "default_ttl": "1h", "max_ttl": "2h",
        }))
        ok(http.put(api + "sys/policies/acl/credgate-vault", json={"policy": POLICY}))
        ok(http.put(api + "sys/policies/acl/credgate-no-revoke", json={"policy": NO_REVOKE_POLICY}))
        ok(http.put(api + "sys/policies/acl/credgate-vault-child", json={"policy": CHILD_POLICY}))
        auths = ok(http.get(api + "sys/auth")).json()["data"]
        if "approle/" not in auths:
            ok(http.post(api + "sys/auth/approle", json={"type": "approle"}))
        ok(http.post(api + "auth/approle/role/gate", json={
            "token_policies": ["credgate-vault"], "token_ttl": "10m", "token_max_ttl": "30m"}))
        role_id = ok(http.get(api + "auth/approle/role/gate/role-id")).json()["data"]["role_id"]
        secret_id = ok(http.post(api + "auth/approle/role/gate/secret-id")).json()["data"]["secret_id"]
        token = ok(http.post(api + "auth/token/create-orphan", json={
            "policies": ["credgate-vault"], "ttl": "2h"})).json()["auth"]["client_token"]
    return VaultTarget(bao, pg, token, role_id, secret_id)


def _pg_layout(pg: Any) -> None:
    with psycopg.connect(pg.dsn(dbname="postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS sales")
        conn.execute("CREATE TABLE IF NOT EXISTS sales.orders (amount int)")
        conn.execute("INSERT INTO sales.orders SELECT 42 WHERE NOT EXISTS (SELECT 1 FROM sales.orders)")


@contextlib.contextmanager
def vault_stack(storage_dir: Path | None = None) -> Iterator[VaultTarget]:
    """A scram PostgreSQL cluster and an OpenBao managing logins on it (dev server, or a
    raft-backed one surviving a restart when ``storage_dir`` is given)."""
    from tests.services.openbao import OpenBao
    from tests.services.pgcluster import PgCluster

    pg, bao = PgCluster(), OpenBao(storage_dir=storage_dir)
    try:
        try:
            pg.start()
            bao.start()
        except Exception as exc:  # noqa: BLE001 - no binaries, no postgres user...
            service_missing("OpenBao and a PostgreSQL cluster", f"{type(exc).__name__}: {str(exc)[:200]}")
        _pg_layout(pg)
        yield _setup_bao(bao, pg)
    finally:
        bao.stop()
        pg.stop()


@pytest.fixture(scope="module")
def vault_target() -> Iterator[VaultTarget]:
    with vault_stack() as tgt:
        yield tgt


def request(conn: VaultConnector, ttl: timedelta = timedelta(minutes=15), resource: str = f"vault-role:{ROLE}",
            ) -> IssueRequest:
    lease_id = "lease-" + secrets.token_hex(8)
    return IssueRequest(lease_id=lease_id, resource=resource, ttl=ttl, expires_at=datetime.now(UTC) + ttl,
                        revoke_state=conn.plan(lease_id, resource), timeout_seconds=10)


def merged(req: IssueRequest, issued: Any) -> dict[str, Any]:
    """The revoke state the gateway stores at activation."""
    return {**req.revoke_state, **(issued.revoke_state or {})}


# --- pure ---------------------------------------------------------------------------


def test_resource_grammar_and_plan() -> None:
    conn = VaultConnector({"address": "http://127.0.0.1:1", "mount": "db/prod"}, "token", {"token": "t"})
    assert parse_resource("vault-role:reader") == "reader"
    assert conn.validate_resource("vault-role:a.b_c-1") == "vault-role"
    for bad in ("reader", "vault-role:", "vault-role:a/b", "vault-role:..", "vault-role:a b"):
        with pytest.raises(ResourceNotSupported):
            conn.validate_resource(bad)
    assert conn.plan("L1", "vault-role:reader") == {"mount": "db/prod", "role": "reader"}


def test_engine_mapping() -> None:
    """Only ``database`` runs against OpenBao; ``aws`` (an external plugin there) is this mapping
    of the aws engine's documented answer, checked here and nowhere else."""
    assert credential_from("database", {"username": "u", "password": "p"}) == {"username": "u", "password": "p"}
    assert credential_from("database", {"username": "u"}) is None
    sts = {"access_key": "AKIA1", "secret_key": "s", "security_token": "t", "arn": "arn:aws:sts::1:x"}
    assert credential_from("aws", sts) == {
        "aws_access_key_id": "AKIA1", "aws_secret_access_key": "s", "aws_session_token": "t"}
    assert credential_from("aws", sts | {"security_token": None}) == {
        "aws_access_key_id": "AKIA1", "aws_secret_access_key": "s"}  # an iam_user role: no session token
    assert credential_from("aws", {"access_key": "AKIA1"}) is None


def test_material_never_in_repr() -> None:
    canary = "CANARY" + secrets.token_hex(6)
    for auth, material in (("token", {"token": canary}), ("approle", {"role_id": canary, "secret_id": canary})):
        conn = VaultConnector({"address": "http://127.0.0.1:1"}, auth, material)
        assert canary not in repr(conn) and canary not in repr(conn._material)


# --- against OpenBao ------------------------------------------------------------------


async def test_issue_use_revoke_twice(vault_target: VaultTarget) -> None:
    conn = vault_target.connector()
    try:
        req = request(conn)
        issued = await conn.issue(req)
        assert set(issued.credential) == {"username", "password"}
        assert issued.revoke_state and issued.revoke_state["lease_id"].startswith(f"database/creds/{ROLE}/")
        assert vault_target.works(issued.credential)
        assert vault_target.lookup(issued.revoke_state["lease_id"]) is not None
        state = merged(req, issued)
        await conn.revoke(state)
        assert not vault_target.role_exists(issued.credential["username"])
        assert not vault_target.works(issued.credential)
        assert vault_target.lookup(issued.revoke_state["lease_id"]) is None
        await conn.revoke(state)  # already gone: success
    finally:
        await conn.aclose()


async def test_expiry_is_the_earliest_of_credgate_and_vault(vault_target: VaultTarget) -> None:
    conn = vault_target.connector()
    try:
        short = request(conn, ttl=timedelta(minutes=10))
        issued = await conn.issue(short)
        assert issued.expires_at == short.expires_at  # credgate's 10 min < Vault's 1 h
        await conn.revoke(merged(short, issued))

        before = datetime.now(UTC)
        long = request(conn, ttl=timedelta(hours=3))
        issued = await conn.issue(long)
        after = datetime.now(UTC)
        # Vault's lease (the role's default_ttl, 1 h) ends first
        assert before + timedelta(hours=1) - timedelta(seconds=2) <= issued.expires_at <= after + timedelta(hours=1)
        await conn.revoke(merged(long, issued))
    finally:
        await conn.aclose()


async def test_renew_moves_the_vault_lease(vault_target: VaultTarget) -> None:
    conn = vault_target.connector()
    try:
        req = request(conn)
        issued = await conn.issue(req)
        state = merged(req, issued)
        lease_id = state["lease_id"]
        wanted = datetime.now(UTC) + timedelta(minutes=40)
        got = await conn.renew(state, wanted)
        assert abs((got - wanted).total_seconds()) < 5
        vault_expiry = datetime.fromisoformat(vault_target.lookup(lease_id)["expire_time"][:26] + "+00:00")
        assert abs((vault_expiry - got).total_seconds()) < 5  # Vault's own lease moved too
        assert vault_target.works(issued.credential)

        # past the role's max_ttl (2 h): Vault grants less, and that is what is returned
        capped = await conn.renew(state, datetime.now(UTC) + timedelta(hours=5))
        assert capped <= datetime.now(UTC) + timedelta(hours=2)

        await conn.revoke(state)
        with pytest.raises(TargetError) as gone:
            await conn.renew(state, wanted)
        assert gone.value.code == "credential_gone"
    finally:
        await conn.aclose()


async def test_a_lease_vault_issued_not_renewable_is_refused_without_a_call() -> None:
    conn = VaultConnector({"address": f"http://127.0.0.1:{free_port('127.0.0.1')}"}, "token", {"token": "t"})
    state = {"mount": "database", "role": ROLE, "lease_id": "database/creds/reader/x", "renewable": False}
    with pytest.raises(NotRenewable):  # a call would have been TargetUnreachable (nothing listens)
        await conn.renew(state, datetime.now(UTC) + timedelta(minutes=5))
    await conn.aclose()


async def test_revoke_without_a_vault_lease_id_is_a_no_op(vault_target: VaultTarget) -> None:
    """A crash between Vault's answer and activation leaves only the planned state: revoke succeeds
    (the Vault lease then ends at its own TTL; see the connector's docs)."""
    conn = VaultConnector(vault_target.config(address=f"http://127.0.0.1:{free_port('127.0.0.1')}"), "token",
                          {"token": "t"})
    await conn.revoke(conn.plan("L1", f"vault-role:{ROLE}"))  # no call made: nothing listens there
    await conn.aclose()


async def test_approle_credentials_never_outlive_the_login_token(vault_target: VaultTarget) -> None:
    conn = vault_target.connector("approle")
    try:
        before = datetime.now(UTC)
        req = request(conn, ttl=timedelta(hours=1))
        issued = await conn.issue(req)
        # the AppRole's token_ttl is 10 min: Vault revokes the lease with that token
        assert issued.expires_at <= datetime.now(UTC) + timedelta(minutes=10)
        assert issued.expires_at >= before + timedelta(minutes=10) - timedelta(seconds=5)
        assert issued.revoke_state and "token_expires_at" in issued.revoke_state
        assert vault_target.works(issued.credential)
        state = merged(req, issued)
        renewed = await conn.renew(state, datetime.now(UTC) + timedelta(hours=1))
        assert renewed <= datetime.fromisoformat(issued.revoke_state["token_expires_at"])
        await conn.revoke(state)
        assert not vault_target.works(issued.credential)
    finally:
        await conn.aclose()


async def test_unknown_role_is_rejected(vault_target: VaultTarget) -> None:
    conn = vault_target.connector()
    try:
        with pytest.raises(ResourceRejected) as err:
            await conn.issue(request(conn, resource="vault-role:nope"))
        assert err.value.reason == "not_found"
    finally:
        await conn.aclose()


async def test_refused_material_is_auth_failed_and_never_quoted(vault_target: VaultTarget) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    for conn in (vault_target.connector(material={"token": canary}),
                 vault_target.connector("approle", {"role_id": vault_target.role_id, "secret_id": canary})):
        try:
            with pytest.raises(TargetError) as err:
                await conn.issue(request(conn))
            assert err.value.code == "target_auth_failed"
            assert canary not in str(err.value) and canary not in repr(err.value)
            check = await conn.verify()
            assert not check.ok and canary not in check.message
        finally:
            await conn.aclose()


async def test_a_policy_without_revoke_is_permission_denied_not_success(vault_target: VaultTarget) -> None:
    """Revoke must not report success when Vault refused it: the gateway would mark it revoked."""
    bao = vault_target.bao
    weak = bao.create_token(policies=["credgate-no-revoke"], ttl="1h")
    conn = vault_target.connector(material={"token": weak})
    admin = vault_target.connector()
    try:
        req = request(conn)
        issued = await conn.issue(req)
        state = merged(req, issued)
        with pytest.raises(TargetError) as err:
            await conn.revoke(state)
        assert err.value.code == "target_permission_denied"
        assert vault_target.works(issued.credential)  # still there: not pretended revoked
        await admin.revoke(state)
        assert not vault_target.works(issued.credential)
    finally:
        await conn.aclose()
        await admin.aclose()


async def test_verify_and_list(vault_target: VaultTarget) -> None:
    conn = vault_target.connector()
    try:
        assert await conn.list_resources("vault-role") == [f"vault-role:{ROLE}"]
        with pytest.raises(ResourceNotSupported):
            await conn.list_resources("database")
        check = await conn.verify()
        assert check.ok, check.message
        assert check.reachable == {"vault-role": [f"vault-role:{ROLE}"]}
        weak = vault_target.connector(material={"token": vault_target.bao.create_token(
            policies=["credgate-no-revoke"], ttl="1h")})
        check = await weak.verify()  # can't even list roles
        assert not check.ok
        await weak.aclose()
    finally:
        await conn.aclose()


async def test_vault_down_is_503_and_revoke_succeeds_once_it_is_back(tmp_path: Path) -> None:
    """A raft-backed OpenBao (its leases survive a restart) is stopped mid-run: issue and revoke
    answer TargetUnreachable; once it is back (unsealed), the same revoke drops the role."""
    with vault_stack(storage_dir=tmp_path / "raft") as tgt:
        conn = tgt.connector()
        try:
            req = request(conn)
            issued = await conn.issue(req)
            state = merged(req, issued)
            assert tgt.works(issued.credential)
            tgt.bao.stop()
            with pytest.raises(TargetUnreachable):
                await conn.issue(request(conn))
            with pytest.raises(TargetUnreachable):
                await conn.revoke(state)
            with pytest.raises(TargetUnreachable):
                await conn.renew(state, datetime.now(UTC) + timedelta(minutes=20))
            assert tgt.works(issued.credential)  # not pretended revoked
            tgt.bao.start(unseal=False)
            with pytest.raises(TargetUnreachable):  # sealed: 503 from Vault is unreachable too
                await conn.revoke(state)
            tgt.bao.unseal()
            await conn.revoke(state)
            assert not tgt.role_exists(issued.credential["username"])
            assert not tgt.works(issued.credential)
        finally:
            await conn.aclose()


# --- through the gateway: the Vault lease id reaches the stored revoke state ----------------

SQLITE = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


async def _gateway_connector(gw: Any, tgt: VaultTarget, name: str) -> Any:
    r = await gw.client.put(f"/v1/secrets/local/vault/{name}", json={"data": {"token": tgt.token}})
    assert r.status_code == 200, r.text
    r = await gw.client.put(f"/v1/connectors/{name}", json={
        "type": "vault", "auth_method": "token", "secret": f"local/vault/{name}", "config": tgt.config(),
        "resources": [f"vault-role:{ROLE}"],
    })
    assert r.status_code in (200, 201), r.text
    return await gw.runtime.catalog.instance(await gw.runtime.catalog.get(name))


@SQLITE
async def test_gateway_stores_the_vault_lease_id_at_activation(gateway: Any, vault_target: VaultTarget) -> None:
    await _gateway_connector(gateway, vault_target, "vg")
    r = await gateway.client.post("/v1/credentials", json={"connector": "vg", "resource": f"vault-role:{ROLE}"})
    assert r.status_code == 200, r.text
    out = r.json()
    row = await gateway.runtime.leases.get(out["lease_id"])
    assert row.revoke_state["role"] == ROLE and row.revoke_state["lease_id"].startswith(f"database/creds/{ROLE}/")
    assert vault_target.lookup(row.revoke_state["lease_id"]) is not None
    r = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
    assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
    assert vault_target.lookup(row.revoke_state["lease_id"]) is None
    assert not vault_target.works(out["credential"])


@SQLITE
async def test_a_lease_the_reaper_took_during_issue_is_revoked_with_its_vault_lease(
    gateway: Any, vault_target: VaultTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper judged the pending lease stale while Vault was answering: the activation
    finds it ``revoking``, yet the Vault lease id is written to the row, so the revocation
    that follows finds the Vault lease and ends it (the credential is never handed out)."""
    from gateway.store.models import utcnow

    inst = await _gateway_connector(gateway, vault_target, "vt")
    real, made = inst.issue, {}

    async def issue(req: IssueRequest) -> Any:
        issued = await real(req)
        made.update(issued.credential)
        taken = await gateway.runtime.leases.transition(
            req.lease_id, ("pending",), "revoking", next_attempt_at=utcnow(), last_error="pending too long")
        assert taken
        return issued

    monkeypatch.setattr(inst, "issue", issue)
    r = await gateway.client.post("/v1/credentials", json={"connector": "vt", "resource": f"vault-role:{ROLE}"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "issue_rolled_back", r.text
    assert made and not vault_target.works(made)
    assert not vault_target.role_exists(made["username"])
    (item,) = (await gateway.client.get("/v1/leases", params={"connector": "vt"})).json()["items"]
    row = await gateway.runtime.leases.get(item["lease_id"])
    assert row.state == "revoked" and "lease_id" in row.revoke_state


@SQLITE
async def test_an_answer_lost_before_activation_outlives_the_lease_until_vaults_ttl(
    gateway: Any, vault_target: VaultTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented weakness, shown: if Vault answered but the gateway lost the answer (here:
    the call fails after Vault's answer, as a crash would), only the planned state is stored;
    the lease ends ``revoked`` but the Vault lease lives on until its own TTL."""
    inst = await _gateway_connector(gateway, vault_target, "vl")
    real, made = inst.issue, {}

    async def issue(req: IssueRequest) -> Any:
        issued = await real(req)
        made.update(issued.revoke_state or {}, **issued.credential)
        raise OSError(5, "the answer was lost")

    monkeypatch.setattr(inst, "issue", issue)
    r = await gateway.client.post("/v1/credentials", json={"connector": "vl", "resource": f"vault-role:{ROLE}"})
    assert r.status_code == 502, r.text
    (item,) = (await gateway.client.get("/v1/leases", params={"connector": "vl"})).json()["items"]
    assert item["state"] == "revoked"
    orphan = vault_target.lookup(made["lease_id"])
    assert orphan is not None and 0 < orphan["ttl"] <= 3600  # bounded by the role's default_ttl
    assert vault_target.works(made)
    httpx.put(f"{vault_target.bao.url}/v1/sys/leases/revoke", headers={"X-Vault-Token": vault_target.bao.root_token},
              json={"lease_id": made["lease_id"]}, timeout=10).raise_for_status()


# --- TLS: the configured CA bundle --------------------------------------------------------


async def test_ca_bundle_is_trusted_and_required() -> None:
    from tests.services.openbao import OpenBao

    bao = OpenBao(tls=True)
    try:
        bao.start()
    except Exception as exc:  # noqa: BLE001
        service_missing("OpenBao (-dev-tls)", f"{type(exc).__name__}: {str(exc)[:200]}")
    try:
        bao.client().sys.enable_secrets_engine("database", path="database")
        pem = Path(bao.ca_cert).read_text()
        base = {"address": bao.url, "mount": "database", "timeout": 5}
        trusted = VaultConnector(base | {"ca_cert": pem}, "token", {"token": bao.root_token})
        untrusted = VaultConnector(base, "token", {"token": bao.root_token})
        try:
            assert await trusted.list_resources("vault-role") == []  # the call went through (no roles yet)
            with pytest.raises(TargetUnreachable):  # the system trust store doesn't know the dev CA
                await untrusted.list_resources("vault-role")
        finally:
            await trusted.aclose()
            await untrusted.aclose()
    finally:
        bao.stop()


# --- namespaces ---------------------------------------------------------------------------


async def test_namespace_is_sent(vault_target: VaultTarget) -> None:
    """A role and a token that exist only in namespace ``team`` (OpenBao 2.x namespaces): the
    connector configured with ``namespace`` issues from it; one without is refused."""
    bao, pg = vault_target.bao, vault_target.pg
    api, root = bao.url + "/v1/", {"X-Vault-Token": bao.root_token}
    ns = root | {"X-Vault-Namespace": "team"}
    with httpx.Client(timeout=30) as http:
        for method, path, headers, body in (
            ("POST", "sys/namespaces/team", root, {}),
            ("POST", "sys/mounts/database", ns, {"type": "database"}),
            ("POST", "database/config/pg", ns, {
                "plugin_name": "postgresql-database-plugin", "allowed_roles": "*",
                "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres",
                "username": pg.superuser, "password": pg.password}),
            ("POST", "database/roles/ns-reader", ns, {"db_name": "pg", "creation_statements": CREATION,
                                                       "default_ttl": "1h", "max_ttl": "2h"}),
            ("PUT", "sys/policies/acl/credgate-vault", ns, {"policy": POLICY}),
        ):
            r = http.request(method, api + path, headers=headers, json=body)
            assert r.status_code in (200, 204), (path, r.status_code, r.text)
        r = http.post(api + "auth/token/create-orphan", headers=ns, json={"policies": ["credgate-vault"], "ttl": "1h"})
        token = r.json()["auth"]["client_token"]
    inside = vault_target.connector(material={"token": token}, namespace="team")
    outside = vault_target.connector(material={"token": token})
    try:
        req = request(inside, resource="vault-role:ns-reader")
        issued = await inside.issue(req)
        assert vault_target.works(issued.credential)
        await inside.revoke(merged(req, issued))
        assert not vault_target.works(issued.credential)
        with pytest.raises(TargetError) as err:  # a live token, but its policy is the namespace's, not the root's
            await outside.issue(request(outside, resource="vault-role:ns-reader"))
        assert err.value.code == "target_permission_denied"
    finally:
        await inside.aclose()
        await outside.aclose()


# --- per-lease child tokens -----------------------------------------------------------------


def _accessor(tgt: VaultTarget, accessor: str) -> dict[str, Any] | None:
    r = httpx.post(f"{tgt.bao.url}/v1/auth/token/lookup-accessor", headers={"X-Vault-Token": tgt.bao.root_token},
                   json={"accessor": accessor}, timeout=10)
    return r.json()["data"] if r.status_code == 200 else None


def _vault_time(value: str) -> datetime:
    return datetime.fromisoformat(value[:26].rstrip("Z") + "+00:00")


async def test_per_lease_token_lives_and_dies_with_the_lease(vault_target: VaultTarget) -> None:
    token = vault_target.bao.create_token(policies=["credgate-vault-child"], ttl="2h")
    conn = vault_target.connector(material={"token": token}, per_lease_token=True)
    try:
        req = request(conn, ttl=timedelta(minutes=15))
        issued = await conn.issue(req)
        state = merged(req, issued)
        assert (await conn.verify()).ok
        child = _accessor(vault_target, state["token_accessor"])
        assert child is not None and child["meta"] == {"credgate_lease": req.lease_id}
        # the token (and so the Vault lease it read) ends at the credgate expiry at the latest
        assert _vault_time(child["expire_time"]) <= req.expires_at + timedelta(seconds=2)
        assert issued.expires_at <= _vault_time(child["expire_time"]) + timedelta(seconds=1)
        assert vault_target.works(issued.credential)

        wanted = datetime.now(UTC) + timedelta(minutes=45)
        got = await conn.renew(state, wanted)
        assert abs((got - wanted).total_seconds()) < 5
        assert abs((_vault_time(_accessor(vault_target, state["token_accessor"])["expire_time"]) - wanted)
                   .total_seconds()) < 5  # the token moved with the lease
        assert vault_target.works(issued.credential)

        await conn.revoke(state)
        assert not vault_target.works(issued.credential)
        assert _accessor(vault_target, state["token_accessor"]) is None
        await conn.revoke(state)  # lease and token already gone: success
    finally:
        await conn.aclose()


async def test_per_lease_token_bounds_an_answer_the_gateway_lost(vault_target: VaultTarget) -> None:
    """A crash after Vault's answer: the gateway only has the planned state, so revoke does
    nothing; the orphaned Vault lease is bound to a token that expires at the credgate expiry.
    Vault revokes a token's leases when the token ends; here its end is brought forward with
    revoke-accessor (the same revocation its expiry triggers), and the login stops working."""
    token = vault_target.bao.create_token(policies=["credgate-vault-child"], ttl="2h")
    conn = vault_target.connector(material={"token": token}, per_lease_token=True)
    try:
        req = request(conn, ttl=timedelta(minutes=5))
        issued = await conn.issue(req)  # ... and the gateway dies before it records the answer
        await conn.revoke(req.revoke_state)  # the reaper with the planned state only: no-op
        assert vault_target.works(issued.credential)
        child = _accessor(vault_target, issued.revoke_state["token_accessor"])
        assert _vault_time(child["expire_time"]) <= req.expires_at + timedelta(seconds=2)
        httpx.post(f"{vault_target.bao.url}/v1/auth/token/revoke-accessor",
                   headers={"X-Vault-Token": vault_target.bao.root_token},
                   json={"accessor": issued.revoke_state["token_accessor"]}, timeout=10).raise_for_status()
        assert vault_target.lookup(issued.revoke_state["lease_id"]) is None
        assert not vault_target.works(issued.credential)
    finally:
        await conn.aclose()


async def test_per_lease_token_needs_token_create(vault_target: VaultTarget) -> None:
    conn = vault_target.connector(per_lease_token=True)  # policy credgate-vault: no auth/token/create
    try:
        check = await conn.verify()
        assert not check.ok and "auth/token/create" in check.message
        with pytest.raises(TargetError) as err:
            await conn.issue(request(conn))
        assert err.value.code == "target_permission_denied"
    finally:
        await conn.aclose()
