"""The client's vendor-SDK helpers against the real services, through a served gateway:
a boto3 session that botocore refreshes (moto), psycopg/SQLAlchemy on a scram PostgreSQL
cluster, redis-py with ACL users, pymysql on MariaDB. Each long-lived object keeps working
after the credential under it was replaced (the lease re-issued, with a new user), and no
password shows in a repr, a log record or an error."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.client import Client, install_sqlalchemy_refresh
from tests.client.common import CANARY, add_static, lease, post, put, start_server, wait_for
from tests.gateway.test_cli import Server

TTL, MARGIN = 3, 0.5
TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
VENDOR_LOGS = ("botocore", "boto3", "urllib3", "s3transfer")  # the SDKs' own debug logs (signed headers)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    for srv in start_server(tmp_path_factory, "client-helpers"):
        add_static(srv)
        yield srv


@pytest.fixture(scope="module")
def pg_db(gw: Server, pg_cluster) -> Iterator[str]:
    """A postgres connector ``pg`` on the scram cluster, serving a database of its own."""
    import psycopg

    db = "helpers_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    put(gw, "/v1/secrets/local/helpers/pg", {"data": {"dsn": pg_cluster.dsn()}})
    put(gw, "/v1/connectors/pg", {"type": "postgres", "auth_method": "password", "secret": "local/helpers/pg",
                                  "resources": [db]})
    yield db
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture(scope="module")
def feat(gw: Server, redis_server: str) -> str:
    put(gw, "/v1/secrets/local/helpers/redis", {"data": {"url": redis_server}})
    put(gw, "/v1/connectors/cache", {"type": "redis", "auth_method": "password", "secret": "local/helpers/redis",
                                     "resources": ["feat"],
                                     "config": {"categories": ["+@read", "+@write", "+@connection"]}})
    return "feat"


@pytest.fixture(scope="module")
def maria_db(gw: Server, mariadb_server: dict) -> Iterator[str]:
    import pymysql

    db = "helpers_" + secrets.token_hex(3)
    conn = pymysql.connect(**mariadb_server, autocommit=True)
    try:
        conn.cursor().execute(f"CREATE DATABASE `{db}`")
        put(gw, "/v1/secrets/local/helpers/maria", {"data": {
            "host": "127.0.0.1", "port": str(mariadb_server["port"]), "username": mariadb_server["user"],
            "password": mariadb_server["password"]}})
        put(gw, "/v1/connectors/maria", {"type": "mysql", "auth_method": "password", "secret": "local/helpers/maria",
                                         "resources": [db], "config": {"user_host": "127.0.0.1"}})
        yield db
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{db}`")
        conn.close()


def revoke(gw: Server, lease_id: str) -> None:
    post(gw, f"/v1/leases/{lease_id}/revoke", {})
    assert lease(gw, lease_id)["state"] == "revoked"


def replaced(c: Client, connector: str, resource: str, old: str) -> Any:
    """Wait for the client's background refresh to replace lease ``old`` (its renewal refused:
    revoked), and return the new credential."""
    assert wait_for(lambda: c.credentials(connector, resource, ttl=TTL).lease_id != old, timeout=15)
    return c.credentials(connector, resource, ttl=TTL)


def no_secret_in_logs(caplog: pytest.LogCaptureFixture, *secrets_: str) -> None:
    ours = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records if not r.name.startswith(VENDOR_LOGS))
    for value in secrets_:
        assert value and value not in ours


def test_boto3_session_is_refreshed_by_botocore_across_leases(gw: Server, moto_server,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from botocore.credentials import RefreshableCredentials

    caplog.set_level(logging.DEBUG)
    iam = moto_server.boto3_client("iam")
    name = "cg-helpers-" + secrets.token_hex(3)
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]
    bucket = name
    moto_server.boto3_client("s3").create_bucket(Bucket=bucket)
    moto_server.boto3_client("s3").put_object(Bucket=bucket, Key="features.parquet", Body=b"x")
    put(gw, "/v1/secrets/local/helpers/aws", {"data": {"aws_access_key_id": key["AccessKeyId"],
                                                       "aws_secret_access_key": key["SecretAccessKey"]}})
    put(gw, "/v1/connectors/s3", {"type": "aws", "auth_method": "iam-role", "secret": "local/helpers/aws",
                                  "resources": [f"s3-bucket:{bucket}"],
                                  "config": {"role_arn": role["Arn"], "endpoint_url": moto_server.endpoint_url}})

    # STS leases last at least 900 s: a margin of 896 s leaves each about 4 s of use, so the
    # client replaces it (and botocore must pick the new one up) every few seconds
    ttl, margin = 900, 896
    with Client(gw.addr, token=gw.token, margin=margin) as c:
        session = c.boto3_session("s3", f"s3-bucket:{bucket}", ttl=ttl)
        creds = session.get_credentials()
        assert isinstance(creds, RefreshableCredentials) and creds.method == "credgate"
        assert session.region_name == "us-east-1" and session.endpoint_url == moto_server.endpoint_url
        s3 = session.client("s3")  # no endpoint_url given: the connector's (moto)
        sts = session.client("sts")
        first = c.credentials("s3", f"s3-bucket:{bucket}", ttl=ttl)
        keys, callers, secrets_seen = [], set(), {first.secret_access_key, first.session_token}
        deadline = first.expires_at.timestamp() - margin + 0.5  # past the first one's usable lifetime
        while time.time() < deadline or len(set(keys)) < 2:
            assert time.time() < deadline + 20, "botocore never picked up a new credential"
            listed = s3.list_objects_v2(Bucket=bucket)  # the same clients throughout
            assert [o["Key"] for o in listed["Contents"]] == ["features.parquet"]
            callers.add(sts.get_caller_identity()["Arn"])
            frozen = creds.get_frozen_credentials()
            keys.append(frozen.access_key)
            secrets_seen |= {frozen.secret_key, frozen.token}
            time.sleep(0.2)
        assert session.get_credentials() is creds  # one credentials object, refreshed in place
        # the requests were signed with the new lease's keys: STS saw another assumed-role session
        assert len(set(keys)) >= 2 and len(callers) >= 2, (set(keys), callers)
        assert all(":assumed-role/" + name + "/" in arn for arn in callers)
        assert keys[0] == first.access_key_id and c.stats["reissues"] >= 1
        for text in (repr(session), repr(creds), repr(s3)):
            assert all(s not in text for s in secrets_seen)
    no_secret_in_logs(caplog, *secrets_seen)


def test_psycopg_conninfo_and_sqlalchemy_url_log_in_as_the_issued_role(gw: Server, pg_db: str) -> None:
    import psycopg
    import sqlalchemy

    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        cred = c.credentials("pg", pg_db, ttl=60)
        conninfo = c.psycopg_conninfo("pg", pg_db, ttl=60, connect_timeout=5)
        assert f"password='{cred.password}'" in conninfo and "connect_timeout='5'" in conninfo
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == (cred.username, pg_db)
        url = c.sqlalchemy_url("pg", pg_db, ttl=60)
        assert url.drivername == "postgresql+psycopg" and url.username == cred.username
        assert cred.password not in str(url) and cred.password not in repr(url)
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_user")).scalar() == cred.username
        engine.dispose()


def test_sqlalchemy_engine_reconnects_as_the_new_role_after_the_lease_is_revoked(
    gw: Server, pg_db: str, pg_cluster, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg
    import sqlalchemy

    caplog.set_level(logging.DEBUG)
    query = sqlalchemy.text("SELECT current_user")
    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        engine = c.sqlalchemy_engine("pg", pg_db, ttl=TTL, pool_size=1, max_overflow=0)
        assert engine.url.username is None and engine.url.password is None  # the login comes per connection
        first = c.credentials("pg", pg_db, ttl=TTL)
        with engine.connect() as conn:
            assert conn.execute(query).scalar() == first.username
        assert engine.pool.checkedin() == 1  # the session stays pooled, logged in as the first role

        revoke(gw, first.lease_id)  # drops the role and ends its sessions, the pooled one too
        with psycopg.connect(pg_cluster.dsn()) as admin:
            assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (first.username,)).fetchone() is None
        second = replaced(c, "pg", pg_db, first.lease_id)
        assert second.username != first.username
        with engine.connect() as conn:  # pre-ping finds the pooled session dead; do_connect logs in anew
            assert conn.execute(query).scalar() == second.username

        # the same hook on an engine of one's own (a URL with no login at all)
        own = sqlalchemy.create_engine(f"postgresql+psycopg://{second.host}:{second.port}/{pg_db}",
                                       poolclass=sqlalchemy.pool.NullPool)
        assert install_sqlalchemy_refresh(own, c, "pg", pg_db, ttl=TTL) is own
        with own.connect() as conn:
            assert conn.execute(query).scalar() == c.credentials("pg", pg_db, ttl=TTL).username
        for text in (repr(engine), str(engine.url), repr(own)):
            assert first.password not in text and second.password not in text
        engine.dispose()
    no_secret_in_logs(caplog, first.password, second.password)


def test_redis_client_logs_in_again_as_the_new_user_after_revocation(gw: Server, feat: str, redis_server: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import redis

    caplog.set_level(logging.DEBUG)
    admin = redis.Redis.from_url(redis_server, decode_responses=True)
    name = "cg-helpers-" + secrets.token_hex(3)

    def logged_in_as() -> set[str]:  # the server's view of the helper's connections
        return {c["user"] for c in admin.client_list() if c["name"] == name}

    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        r = c.redis_client("cache", feat, ttl=TTL, decode_responses=True, client_name=name)
        first = c.credentials("cache", feat, ttl=TTL)
        r.set("feat:k", "v1")
        assert logged_in_as() == {first.username}
        assert first.password not in repr(r)

        revoke(gw, first.lease_id)  # kills the user's connections, deletes the ACL user
        assert first.username not in admin.acl_users() and logged_in_as() == set()
        second = replaced(c, "cache", feat, first.lease_id)
        # the pooled connection was closed by the server: redis-py reconnects, the provider logs in
        assert r.get("feat:k") == "v1"
        assert logged_in_as() == {second.username} and second.username != first.username
    admin.close()
    no_secret_in_logs(caplog, first.password, second.password)


def test_pymysql_connect_uses_the_current_login(gw: Server, maria_db: str) -> None:
    import sqlalchemy

    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        first = c.credentials("maria", maria_db, ttl=TTL)
        conn = c.pymysql_connect("maria", maria_db, ttl=TTL, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SELECT current_user(), database()")
            assert cur.fetchone() == (f"{first.username}@127.0.0.1", maria_db)
        conn.close()
        revoke(gw, first.lease_id)
        second = replaced(c, "maria", maria_db, first.lease_id)
        conn = c.pymysql_connect("maria", maria_db, ttl=TTL)
        with conn.cursor() as cur:
            cur.execute("SELECT current_user()")
            assert cur.fetchone() == (f"{second.username}@127.0.0.1",)
        conn.close()
        with pytest.raises(TypeError, match="sets the login itself"):
            c.pymysql_connect("maria", maria_db, ttl=TTL, password="x")
        url = c.sqlalchemy_url("maria", maria_db, ttl=TTL)
        assert url.drivername == "mysql+pymysql"
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as sa:
            assert sa.execute(sqlalchemy.text("SELECT database()")).scalar() == maria_db
        engine.dispose()


def test_a_revoked_login_fails_without_its_password_in_the_error(gw: Server, maria_db: str, feat: str) -> None:
    import pymysql
    import redis

    # no background refresh: the cached credential stays the revoked one
    with Client(gw.addr, token=gw.token, margin=MARGIN, refresh=False) as c:
        maria = c.credentials("maria", maria_db, ttl=60)
        red = c.credentials("cache", feat, ttl=60)
        r = c.redis_client("cache", feat, ttl=60, decode_responses=True)
        assert r.get("feat:none") is None
        revoke(gw, maria.lease_id)
        revoke(gw, red.lease_id)
        with pytest.raises(pymysql.err.OperationalError) as mysql_err:
            c.pymysql_connect("maria", maria_db, ttl=60)
        with pytest.raises(redis.exceptions.AuthenticationError) as redis_err:
            r.get("feat:none")
        mysql_text, redis_text = (str(e.value) + repr(e.value) for e in (mysql_err, redis_err))
        assert "Access denied" in mysql_text and maria.username in mysql_text  # the vendors' refusals, as they are
        assert "invalid username-password pair" in redis_text
        assert maria.password not in mysql_text and red.password not in redis_text


def test_a_helper_for_another_connector_type_is_refused_without_values(gw: Server) -> None:
    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        for helper in (c.boto3_session, c.psycopg_conninfo, c.sqlalchemy_url, c.redis_client, c.pymysql_connect):
            with pytest.raises(TypeError) as err:
                helper("vendor", "default")
            assert "vendor issued a static credential" in str(err.value) and CANARY not in str(err.value)
