"""Credentials end to end through the HTTP API, against the real targets:
a throwaway scram PostgreSQL cluster, MariaDB and Redis on 127.0.0.1, and moto
in server mode for AWS. Each credential is used with the ordinary client
library, then shown to stop working after revoke and after expiry."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


async def put_secret(gw: Gateway, path: str, data: dict) -> None:
    r = await gw.client.put(f"/v1/secrets/local/{path}", json={"data": data})
    assert r.status_code == 200, r.text


async def put_connector(gw: Gateway, name: str, **body) -> dict:
    r = await gw.client.put(f"/v1/connectors/{name}", json=body)
    assert r.status_code in (200, 201), r.text
    return r.json()


async def issue(gw: Gateway, connector: str, resource: str, status: int = 200, **extra) -> dict:
    r = await gw.client.post("/v1/credentials", json={"connector": connector, "resource": resource, **extra})
    assert r.status_code == status, r.text
    return r.json()


async def lease(gw: Gateway, lease_id: str) -> dict:
    r = await gw.client.get(f"/v1/leases/{lease_id}")
    assert r.status_code == 200
    return r.json()


# --- PostgreSQL -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_target(pg_cluster):
    """A database with a granted schema (sales) and one that must stay out of reach (hr)."""
    import psycopg

    db = "analytics_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    with psycopg.connect(pg_cluster.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA sales; CREATE TABLE sales.orders (id int, amount int)")
        conn.execute("INSERT INTO sales.orders VALUES (1, 100), (2, 250)")
        conn.execute("CREATE SCHEMA hr; CREATE TABLE hr.salaries (who text, amount int)")
    return pg_cluster, db


def gateway_roles(pg_cluster) -> set[str]:
    import psycopg

    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'cg\\_%'")}


async def test_postgres_issue_use_renew_revoke(gateway: Gateway, pg_target) -> None:
    import psycopg

    cluster, db = pg_target
    await put_secret(gateway, "targets/pg", {"dsn": cluster.dsn()})
    await put_connector(
        gateway, "pg", type="postgres", auth_method="password", secret="local/targets/pg",
        config={"privileges": ["SELECT"]}, resources=[f"{db}/sales"], default_ttl_seconds=600, max_ttl_seconds=3600,
    )
    verify = (await gateway.client.post("/v1/connectors/pg/verify")).json()
    assert verify["ok"] is True and db in verify["reachable"]["database"]
    assert cluster.password not in json.dumps(verify)
    shown = (await gateway.client.get("/v1/connectors/pg")).text
    assert cluster.password not in shown
    schemas = (await gateway.client.get("/v1/connectors/pg/resources", params={"type": "database"})).json()
    assert db in schemas["items"] and cluster.password not in json.dumps(schemas)

    out = await issue(gateway, "pg", f"{db}/sales", ttl_seconds=7200)
    assert out["ttl_capped"] is True and out["ttl_seconds"] == 3600 and out["requested_ttl_seconds"] == 7200
    assert out["revocability"] == "revocable" and out["renewable"] is True
    cred = out["credential"]
    session = await psycopg.AsyncConnection.connect(cred["dsn"], autocommit=True)
    assert (await (await session.execute("SELECT sum(amount) FROM sales.orders")).fetchone())[0] == 350
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await session.execute("INSERT INTO sales.orders VALUES (3, 1)")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await session.execute("SELECT * FROM hr.salaries")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await session.execute("CREATE TABLE sales.mine (x int)")

    assert (await lease(gateway, out["lease_id"]))["state"] == "active"
    renewed = (await gateway.client.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 1800})).json()
    assert renewed["expires_at"] < out["expires_at"]  # renewal sets a new expiry from now, capped by max

    r = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    with pytest.raises(psycopg.OperationalError):  # the open session was terminated
        await session.execute("SELECT 1")
    await session.close()
    with pytest.raises(psycopg.OperationalError):  # and no new login
        await psycopg.AsyncConnection.connect(cred["dsn"], connect_timeout=5)
    assert cred["username"] not in gateway_roles(cluster)
    # idempotent
    again = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
    assert again.status_code == 200 and again.json()["state"] == "revoked"

    denied = await gateway.client.post("/v1/credentials", json={"connector": "pg", "resource": f"{db}/hr"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "resource_not_allowed"


async def test_postgres_concurrent_issuance_into_one_database(gateway: Gateway, pg_target) -> None:
    """Concurrent GRANTs on one database race on its catalog row ("tuple concurrently
    updated", found by the benchmark); every issuance must succeed."""
    from datetime import timedelta

    from connectors.base import IssueRequest
    from gateway.issuing.leases import new_lease_id
    from gateway.store.models import utcnow

    cluster, db = pg_target
    await put_secret(gateway, "targets/pg", {"dsn": cluster.dsn()})
    await put_connector(gateway, "pg", type="postgres", auth_method="password", secret="local/targets/pg",
                        resources=[f"{db}/*"])
    connector = await gateway.runtime.catalog.instance(await gateway.runtime.catalog.get("pg"))
    plans = [(lid, connector.plan(lid, f"{db}/sales")) for lid in (new_lease_id() for _ in range(24))]
    now = utcnow()
    results = await asyncio.gather(*(
        connector.issue(IssueRequest(lid, f"{db}/sales", timedelta(minutes=5), now + timedelta(minutes=5), plan))
        for lid, plan in plans
    ), return_exceptions=True)
    try:
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
    finally:
        await asyncio.gather(*(connector.revoke(plan) for _, plan in plans))


async def test_postgres_expiry_is_enforced_by_the_reaper(gateway: Gateway, pg_target) -> None:
    import psycopg

    cluster, db = pg_target
    await put_secret(gateway, "targets/pg", {"dsn": cluster.dsn()})
    await put_connector(gateway, "pg", type="postgres", auth_method="password", secret="local/targets/pg",
                        resources=[f"{db}/*"], default_ttl_seconds=60, max_ttl_seconds=600)
    out = await issue(gateway, "pg", f"{db}/sales", ttl_seconds=1)
    assert out["credential"]["username"] in gateway_roles(cluster)
    await asyncio.sleep(1.2)
    done = await gateway.runtime.reaper.tick()
    assert done["to_revoke"] == 1 and done["revoked"] == 1
    assert (await lease(gateway, out["lease_id"]))["state"] == "revoked"
    assert out["credential"]["username"] not in gateway_roles(cluster)
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(out["credential"]["dsn"], connect_timeout=5)


async def test_a_crash_between_plan_and_issue_is_cleaned_up(gateway: Gateway, pg_target) -> None:
    """The state a SIGKILL leaves behind: a pending lease whose role exists at the target."""
    from datetime import timedelta

    from connectors.base import IssueRequest
    from gateway.issuing.leases import new_lease_id
    from gateway.store.models import LeaseRow, utcnow

    cluster, db = pg_target
    await put_secret(gateway, "targets/pg", {"dsn": cluster.dsn()})
    await put_connector(gateway, "pg", type="postgres", auth_method="password", secret="local/targets/pg",
                        resources=[f"{db}/*"])
    rt = gateway.runtime
    row = await rt.catalog.get("pg")
    connector = await rt.catalog.instance(row)
    lease_id, now = new_lease_id(), utcnow()
    plan = connector.plan(lease_id, f"{db}/sales")
    async with rt.store.write() as s:
        s.add(LeaseRow(id=lease_id, connector="pg", connector_type="postgres", resource=f"{db}/sales",
                       principal="admin_key:bootstrap", state="pending", revocability="revocable", renewable=True,
                       issued_at=now, expires_at=now + timedelta(hours=1), max_expires_at=now + timedelta(hours=1),
                       revoke_state=plan, attempts=0, updated_at=now))
    issued = await connector.issue(IssueRequest(lease_id, f"{db}/sales", timedelta(hours=1), now + timedelta(hours=1), plan))
    assert issued.credential["username"] in gateway_roles(cluster)
    # ...and the process dies here. After the pending timeout the reaper revokes by the plan.
    rt.reaper.pending_timeout = 0
    done = await rt.reaper.tick()
    assert done["stale_pending"] == 1 and done["revoked"] == 1
    assert issued.credential["username"] not in gateway_roles(cluster)
    assert (await lease(gateway, lease_id))["state"] == "revoked"


# --- MariaDB ---------------------------------------------------------------------


async def test_mysql_issue_use_revoke(gateway: Gateway, mariadb_server: dict) -> None:
    import pymysql

    db = "cgapi_" + secrets.token_hex(3)
    admin = pymysql.connect(**mariadb_server, autocommit=True)
    try:
        with admin.cursor() as c:
            c.execute(f"CREATE DATABASE `{db}`")
            c.execute(f"CREATE TABLE `{db}`.items (id int)")
            c.execute(f"INSERT INTO `{db}`.items VALUES (1), (2)")
        await put_secret(gateway, "targets/mysql", {"host": "127.0.0.1", "port": "3306", "username": "root", "password": ""})
        await put_connector(gateway, "maria", type="mysql", auth_method="password", secret="local/targets/mysql",
                            resources=[db], config={"user_host": "127.0.0.1"})
        out = await issue(gateway, "maria", db, ttl_seconds=300)
        cred = out["credential"]
        user_conn = pymysql.connect(host="127.0.0.1", port=3306, user=cred["username"], password=cred["password"], database=db)
        with user_conn.cursor() as c:
            c.execute("SELECT count(*) FROM items")
            assert c.fetchone()[0] == 2
            with pytest.raises(pymysql.err.OperationalError):
                c.execute("INSERT INTO items VALUES (3)")
        r = await gateway.client.post("/v1/leases/revoke", json={"connector": "maria"})
        assert r.json() == {"matched": 1, "revoked": 1, "still_revoking": []}
        with pytest.raises(pymysql.err.Error):  # its connection was killed
            with user_conn.cursor() as c:
                c.execute("SELECT 1")
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(host="127.0.0.1", port=3306, user=cred["username"], password=cred["password"])
        with admin.cursor() as c:
            c.execute("SELECT count(*) FROM mysql.user WHERE user = %s", (cred["username"],))
            assert c.fetchone()[0] == 0
    finally:
        with admin.cursor() as c:
            c.execute(f"DROP DATABASE IF EXISTS `{db}`")
        admin.close()


# --- Redis -----------------------------------------------------------------------


async def redis_connector(gw: Gateway, url: str, name: str = "cache") -> None:
    await put_secret(gw, f"targets/{name}", {"url": url})
    await put_connector(gw, name, type="redis", auth_method="password", secret=f"local/targets/{name}",
                        resources=["features", "sessions"], default_ttl_seconds=300, max_ttl_seconds=3600)


async def test_redis_issue_use_revoke(gateway: Gateway, redis_server: str) -> None:
    import redis

    admin = redis.Redis.from_url(redis_server)
    admin.set("features:flag", "on")
    admin.set("secret:other", "no")
    try:
        await redis_connector(gateway, redis_server)
        out = await issue(gateway, "cache", "features")
        client = redis.Redis.from_url(out["credential"]["url"])
        assert client.get("features:flag") == b"on"
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("secret:other")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("features:flag", "off")
        await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
        with pytest.raises(redis.exceptions.RedisError):
            client.get("features:flag")
        assert admin.acl_getuser(out["credential"]["username"]) is None
    finally:
        admin.delete("features:flag", "secret:other")


async def test_idempotency_key_returns_the_same_lease(gateway: Gateway, redis_server: str) -> None:
    await redis_connector(gateway, redis_server)
    headers = {"Idempotency-Key": "run-42-step-3"}
    body = {"connector": "cache", "resource": "features", "ttl_seconds": 120}
    first = await gateway.client.post("/v1/credentials", json=body, headers=headers)
    second = await gateway.client.post("/v1/credentials", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert a["lease_id"] == b["lease_id"] and a["credential"] == b["credential"] and b["replayed"] is True
    listed = (await gateway.client.get("/v1/leases", params={"connector": "cache"})).json()["items"]
    assert len(listed) == 1
    other = await gateway.client.post("/v1/credentials", json={**body, "ttl_seconds": 60}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    await gateway.client.post(f"/v1/leases/{a['lease_id']}/revoke")
    ended = await gateway.client.post("/v1/credentials", json=body, headers=headers)
    assert ended.status_code == 410 and ended.json()["error"]["code"] == "lease_ended"
    assert a["credential"]["password"] not in ended.text


async def test_revocation_is_retried_until_the_target_is_back(gateway: Gateway, redis_server: str) -> None:
    import redis

    await redis_connector(gateway, redis_server)
    out = await issue(gateway, "cache", "features")
    # The target becomes unreachable (its address in the backend secret now points nowhere).
    await put_secret(gateway, "targets/cache", {"url": "redis://127.0.0.1:1/0"})
    from dataclasses import replace

    creds = gateway.runtime.credentials
    creds.policy = replace(creds.policy, backoff_base=0.01)
    r = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
    assert r.status_code == 202 and r.json()["state"] == "revoking" and r.json()["last_error"]
    assert r.json()["attempts"] == 1  # one attempt at the target per request; the reaper retries
    for _ in range(6):
        await asyncio.sleep(0.05)
        await gateway.runtime.reaper.tick()
    info = await lease(gateway, out["lease_id"])
    assert info["state"] == "revoking" and info["attempts"] >= 5
    summary = (await gateway.client.get("/v1/leases/summary")).json()
    assert summary["stuck_revoking"] == 1 and summary["revoking"] == 1
    # The credential still works: the gateway has not pretended it was revoked.
    assert redis.Redis.from_url(out["credential"]["url"]).get("features:x") is None
    await put_secret(gateway, "targets/cache", {"url": redis_server})
    await asyncio.sleep(0.3)  # past the (tiny) backoff
    await gateway.runtime.reaper.tick()
    assert (await lease(gateway, out["lease_id"]))["state"] == "revoked"
    assert redis.Redis.from_url(redis_server).acl_getuser(out["credential"]["username"]) is None


async def test_connector_delete_is_refused_while_leases_live(gateway: Gateway, redis_server: str) -> None:
    await redis_connector(gateway, redis_server)
    out = await issue(gateway, "cache", "sessions")
    r = await gateway.client.delete("/v1/connectors/cache")
    assert r.status_code == 409 and r.json()["error"]["code"] == "connector_has_leases"
    r = await gateway.client.delete("/v1/backends/local")
    assert r.status_code == 409
    assert (await gateway.client.delete("/v1/connectors/cache", params={"revoke_leases": "true"})).status_code == 204
    assert (await lease(gateway, out["lease_id"]))["state"] == "revoked"


# --- AWS (moto in server mode) -----------------------------------------------------


async def test_aws_assume_role_scoped_to_a_bucket(gateway: Gateway, moto_server) -> None:
    import boto3

    iam = moto_server.boto3_client("iam")
    user = "cg-" + secrets.token_hex(3)
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    role_arn = iam.create_role(
        RoleName=user + "-role",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}),
    )["Role"]["Arn"]
    s3 = moto_server.boto3_client("s3")
    s3.create_bucket(Bucket="ml-data-" + user)
    s3.put_object(Bucket="ml-data-" + user, Key="train.csv", Body=b"a,b\n")
    await put_secret(gateway, "targets/aws", {"aws_access_key_id": key["AccessKeyId"],
                                              "aws_secret_access_key": key["SecretAccessKey"]})
    await put_connector(gateway, "aws", type="aws", auth_method="iam-role", secret="local/targets/aws",
                        config={"role_arn": role_arn, "endpoint_url": moto_server.endpoint_url},
                        resources=["s3-bucket:ml-data-*"], default_ttl_seconds=900, max_ttl_seconds=3600)
    out = await issue(gateway, "aws", f"s3-bucket:ml-data-{user}", ttl_seconds=1200)
    assert out["revocability"] == "expiry-only" and out["renewable"] is False and out["ttl_seconds"] == 1200
    cred = out["credential"]
    assert key["SecretAccessKey"] not in json.dumps(out)
    client = boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=cred["aws_access_key_id"], aws_secret_access_key=cred["aws_secret_access_key"],
                          aws_session_token=cred["aws_session_token"])
    assert client.get_object(Bucket="ml-data-" + user, Key="train.csv")["Body"].read() == b"a,b\n"
    renew = await gateway.client.post(f"/v1/leases/{out['lease_id']}/renew", json={})
    assert renew.status_code == 409 and renew.json()["error"]["code"] == "not_renewable"
    r = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    denied = await gateway.client.post("/v1/credentials", json={"connector": "aws", "resource": "s3-bucket:other"})
    assert denied.status_code == 403


# --- static, wrapped ---------------------------------------------------------------


async def static_connector(gw: Gateway) -> None:
    await put_secret(gw, "thirdparty/wandb", {"api_key": "CANARY-static-key", "entity": "ml-team"})
    await put_connector(gw, "wandb", type="static", auth_method="static", secret="local/thirdparty/wandb",
                        resources=["default"], default_ttl_seconds=60, max_ttl_seconds=300)


async def test_static_is_only_handed_out_wrapped_and_unwraps_once(gateway: Gateway) -> None:
    await static_connector(gateway)
    plain = await gateway.client.post("/v1/credentials", json={"connector": "wandb", "resource": "default"})
    assert plain.status_code == 400 and plain.json()["error"]["code"] == "wrap_required"
    assert "CANARY" not in plain.text
    out = await issue(gateway, "wandb", "default", wrap=True)
    assert out["credential"] is None and out["wrap_token"].startswith("cgw_") and "CANARY" not in json.dumps(out)
    async with gateway.as_token(None) as pipeline:  # the pipeline holds nothing but the wrap token
        first = await pipeline.post("/v1/unwrap", json={"wrap_token": out["wrap_token"]})
        assert first.status_code == 200
        assert first.json()["credential"] == {"api_key": "CANARY-static-key", "entity": "ml-team"}
        assert first.json()["lease_id"] == out["lease_id"]
        second = await pipeline.post("/v1/unwrap", json={"wrap_token": out["wrap_token"]})
        assert second.status_code == 410 and second.json()["error"]["code"] == "wrap_token_used"
        assert "CANARY" not in second.text
        unknown = await pipeline.post("/v1/unwrap", json={"wrap_token": "cgw_nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "wrap_token_not_found"


async def test_wrap_token_expiry_and_revocation(gateway: Gateway) -> None:
    from sqlalchemy import select

    from gateway.store.models import WrapRow

    await static_connector(gateway)
    short = await issue(gateway, "wandb", "default", wrap=True, ttl_seconds=1)
    revoked = await issue(gateway, "wandb", "default", wrap=True)
    await gateway.client.post(f"/v1/leases/{revoked['lease_id']}/revoke")
    await asyncio.sleep(1.1)
    done = await gateway.runtime.reaper.tick()
    assert done["expired"] == 1
    r = await gateway.client.post("/v1/unwrap", json={"wrap_token": short["wrap_token"]})
    assert r.status_code == 410 and r.json()["error"]["code"] == "wrap_token_expired"
    r = await gateway.client.post("/v1/unwrap", json={"wrap_token": revoked["wrap_token"]})
    assert r.status_code == 410 and r.json()["error"]["code"] == "wrap_token_revoked"
    async with gateway.runtime.store.read() as s:
        rows = list((await s.execute(select(WrapRow))).scalars())
    assert len(rows) == 2 and all(row.ciphertext is None for row in rows)  # payloads destroyed


async def test_concurrent_unwraps_succeed_exactly_once(gateway: Gateway) -> None:
    await static_connector(gateway)
    out = await issue(gateway, "wandb", "default", wrap=True)
    results = await asyncio.gather(
        *(gateway.client.post("/v1/unwrap", json={"wrap_token": out["wrap_token"]}) for _ in range(8))
    )
    assert sorted(r.status_code for r in results) == [200] + [410] * 7


async def test_connector_types_are_listed(gateway: Gateway) -> None:
    items = {t["type"]: t for t in (await gateway.client.get("/v1/connector-types")).json()["items"]}
    from gateway.plugins.registry import CONNECTOR_TYPES

    assert set(items) == set(CONNECTOR_TYPES) >= {"postgres", "mysql", "redis", "aws", "gcp", "azure", "kubernetes", "static", "registry", "vault"}
    assert items["registry"]["revocability"] == "expiry-only" and set(items["registry"]["auth_methods"]) == {"ecr", "token"}
    assert items["postgres"]["revocability"] == "revocable" and items["postgres"]["renewable"] is True
    assert items["aws"]["revocability"] == "expiry-only"
    assert set(items["aws"]["auth_methods"]) == {"secret-key", "iam-role", "web-identity"}
    assert items["aws"]["keyless_auth_methods"] == ["web-identity"] and items["postgres"]["keyless_auth_methods"] == []
    assert items["static"]["wrap_only"] is True
    assert "dsn" in json.dumps(items["postgres"]["auth_methods"]["password"])


async def test_lease_listing_filters_and_pages(gateway: Gateway) -> None:
    await static_connector(gateway)
    ids = [(await issue(gateway, "wandb", "default", wrap=True, ttl_seconds=100 + 30 * i))["lease_id"] for i in range(5)]
    token = (await gateway.client.post("/v1/admin-keys", json={"name": "ops", "role": "operator"})).json()["token"]
    async with gateway.as_token(token) as ops:
        mine = (await ops.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})).json()
    seen, page_token = [], None
    while True:
        params = {"connector": "wandb", "limit": 2, **({"page_token": page_token} if page_token else {})}
        page = (await gateway.client.get("/v1/leases", params=params)).json()
        seen += [item["lease_id"] for item in page["items"]]
        page_token = page["next_page_token"]
        if not page_token:
            break
    assert seen == ids + [mine["lease_id"]]  # time-ordered ids
    by_ops = (await gateway.client.get("/v1/leases", params={"principal": "admin_key:ops"})).json()["items"]
    assert [x["lease_id"] for x in by_ops] == [mine["lease_id"]]
    from datetime import datetime, timedelta, timezone

    soon = (datetime.now(timezone.utc) + timedelta(seconds=145)).isoformat()
    expiring = (await gateway.client.get("/v1/leases", params={"expiring_before": soon})).json()["items"]
    assert {x["lease_id"] for x in expiring} == {ids[0], ids[1], mine["lease_id"]}  # ttl 100, 130 and the default 60
    naive = await gateway.client.get("/v1/leases", params={"expiring_before": "2030-01-01T00:00:00"})
    assert naive.status_code == 422 and naive.json()["error"]["code"] == "validation_failed"  # not a 500
    r = await gateway.client.post("/v1/leases/revoke", json={"principal": "admin_key:ops"})
    assert r.json()["matched"] == 1
    assert (await lease(gateway, mine["lease_id"]))["state"] == "revoked"
    assert (await gateway.client.get("/v1/leases", params={"state": "active"})).json()["items"].__len__() == 5
    bad = await gateway.client.post("/v1/leases/revoke", json={})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "filter_required"


async def test_a_backend_used_by_a_connector_can_not_be_removed(gateway: Gateway) -> None:
    await gateway.client.put("/v1/backends/vendors", json={"type": "local"})
    await gateway.client.put("/v1/secrets/vendors/k", json={"data": {"api_key": "x"}})
    await put_connector(gateway, "v", type="static", auth_method="static", secret="vendors/k", resources=["default"])
    await gateway.client.delete("/v1/secrets/vendors/k", params={"destroy": "true"})
    r = await gateway.client.delete("/v1/backends/vendors")
    assert r.status_code == 409 and r.json()["error"]["code"] == "backend_in_use" and "connector" in r.json()["error"]["message"]
    # The connector's material is gone: issuing says so, without a 500.
    r = await gateway.client.post("/v1/credentials", json={"connector": "v", "resource": "default", "wrap": True})
    assert r.status_code == 409 and r.json()["error"]["code"] == "connector_material_missing"


async def test_bad_connector_definitions_are_refused(gateway: Gateway) -> None:
    base = dict(type="postgres", auth_method="password", secret="local/x", resources=["db"])
    cases = [
        ({**base, "type": "nosuch"}, 400, "unknown_connector_type"),
        ({**base, "auth_method": "kerberos"}, 422, "unknown_auth_method"),
        ({**base, "secret": "nosuch/x"}, 404, "backend_not_found"),
        ({**base, "secret": "local/../x"}, 400, "invalid_path"),
        ({**base, "config": {"privileges": ["DROP TABLE"]}}, 422, "validation_failed"),
        ({**base, "resources": ["db; DROP"]}, 422, "invalid_resource_pattern"),
        ({**base, "default_ttl_seconds": 7200, "max_ttl_seconds": 60}, 422, "invalid_ttl"),
        ({**base, "max_ttl_seconds": 10**9}, 422, "invalid_ttl"),
        ({**base, "resources": []}, 422, "validation_failed"),
    ]
    for body, status, code in cases:
        r = await gateway.client.put("/v1/connectors/c1", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    assert (await gateway.client.get("/v1/connectors")).json()["items"] == []
    r = await gateway.client.post("/v1/credentials", json={"connector": "nosuch", "resource": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "connector_not_found"


async def test_concurrent_issuances_with_one_idempotency_key_share_a_lease_and_spare_the_others(gateway: Gateway) -> None:
    """They meet in one group commit (gateway/store/database.py): the unique key fails the shared
    transaction, each work is rerun alone, one wins, the rest replay it, and the issuances with
    other keys in the same group are not lost."""
    await static_connector(gateway)
    body = {"connector": "wandb", "resource": "default", "wrap": True}
    same = [gateway.client.post("/v1/credentials", json=body, headers={"Idempotency-Key": "step-1"}) for _ in range(6)]
    other = [gateway.client.post("/v1/credentials", json=body, headers={"Idempotency-Key": f"other-{i}"}) for i in range(4)]
    results = await asyncio.gather(*same, *other)
    assert [r.status_code for r in results] == [200] * 10, [r.text for r in results if r.status_code != 200]
    shared = {r.json()["lease_id"] for r in results[:6]}
    assert len(shared) == 1
    assert {r.json()["wrap_token"] for r in results[:6]} != {None} and len({r.json()["wrap_token"] for r in results[:6]}) == 1
    others = {r.json()["lease_id"] for r in results[6:]}
    assert len(others) == 4 and not others & shared
    listed = (await gateway.client.get("/v1/leases", params={"connector": "wandb"})).json()["items"]
    assert {x["lease_id"] for x in listed} == shared | others
