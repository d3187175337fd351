"""The postgres connector against a private scram-sha-256 cluster (passwords and VALID UNTIL enforced).

Layout built once per module, owned by a non-superuser admin with CREATEROLE::

    analytics.public.events    (serial id, one row)
    analytics.sales.orders     (serial id, one row)   <- the schema most tests are granted
    analytics.hr.salaries      (one row)               <- never granted: must stay unreadable
    analytics.audit.log        owned by the superuser  <- the admin may read it but not grant it
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from connectors.base import (
    IssueRequest,
    Issued,
    ResourceNotSupported,
    ResourceRejected,
    ServiceConnector,
    TargetError,
    role_name,
)
from connectors.postgres import PostgresConfig, PostgresConnector, PostgresPasswordMaterial
from tests.conftest import service_missing

psycopg = pytest.importorskip("psycopg")

ADMIN = "gate_admin"


class Target:
    def __init__(self, cluster: Any, admin_password: str) -> None:
        self.cluster = cluster
        self.admin_password = admin_password

    def admin_dsn(self, dbname: str = "analytics", password: str | None = None) -> str:
        return self.cluster.dsn(dbname=dbname, user=ADMIN, password=password or self.admin_password)

    def superuser(self) -> Any:
        return psycopg.connect(self.cluster.dsn(dbname="analytics"), autocommit=True, connect_timeout=5)

    def role(self, name: str) -> tuple[Any, ...] | None:
        with self.superuser() as conn:
            return conn.execute(
                "SELECT rolcanlogin, rolvaliduntil::text, rolinherit, rolcreaterole, rolcreatedb, rolsuper "
                "FROM pg_roles WHERE rolname = %s",
                (name,),
            ).fetchone()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with admin_target() as tgt:
        yield tgt


@contextlib.contextmanager
def admin_target() -> Iterator[Target]:
    """A private cluster with the layout above (also used by tests/connectors/test_pools.py)."""
    from tests.services.pgcluster import PgCluster

    cluster = PgCluster()
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - no binaries, no postgres user...
        cluster.stop()
        service_missing("PostgreSQL cluster", f"{type(exc).__name__}: {str(exc)[:200]}")
    try:
        admin_password = secrets.token_urlsafe(18)
        with psycopg.connect(cluster.dsn(), autocommit=True) as su:
            su.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                    psycopg.sql.Identifier(ADMIN), admin_password
                )
            )
            su.execute(f"CREATE DATABASE analytics OWNER {ADMIN}")
        tgt = Target(cluster, admin_password)
        with psycopg.connect(tgt.admin_dsn(), autocommit=True) as admin:
            admin.execute("CREATE TABLE public.events (id serial PRIMARY KEY, name text)")
            admin.execute("INSERT INTO public.events (name) VALUES ('signup')")
            admin.execute("CREATE SCHEMA sales")
            admin.execute("CREATE TABLE sales.orders (id serial PRIMARY KEY, amount int)")
            admin.execute("INSERT INTO sales.orders (amount) VALUES (42)")
            admin.execute("CREATE SCHEMA hr")
            admin.execute("CREATE TABLE hr.salaries (name text, salary int)")
            admin.execute("INSERT INTO hr.salaries VALUES ('ada', 100)")
        with tgt.superuser() as su:  # a schema the admin may not grant on
            su.execute("CREATE SCHEMA audit")
            su.execute("CREATE TABLE audit.log (line text)")
            su.execute(f"GRANT USAGE ON SCHEMA audit TO {ADMIN}")  # usable, but without GRANT OPTION
            su.execute(f"GRANT SELECT ON audit.log TO {ADMIN}")
        yield tgt
    finally:
        cluster.stop()  # the whole cluster (roles, databases) goes with its directory


def connector(target: Target, dsn: str | None = None, **config: Any) -> PostgresConnector:
    return PostgresConnector(
        PostgresConfig(**config), "password", PostgresPasswordMaterial(dsn=dsn or target.admin_dsn())
    )


def lease_id() -> str:
    return f"lease_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


async def issue(conn: PostgresConnector, resource: str, ttl: timedelta = timedelta(minutes=10)) -> tuple[dict, Issued]:
    lid = lease_id()
    state = conn.plan(lid, resource)
    now = datetime.now(timezone.utc)
    issued = await conn.issue(IssueRequest(lid, resource, ttl, now + ttl, state, timeout_seconds=10))
    return state, issued


def login(dsn: str) -> Any:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc) + getattr(exc, "message", "")


# -- pure parts ----------------------------------------------------------------


def test_metadata_and_plan() -> None:
    assert isinstance(PostgresConnector, type)
    conn = PostgresConnector(
        PostgresConfig(), "password", PostgresPasswordMaterial(dsn="postgresql://a:b@db.internal:6432/postgres")
    )
    assert isinstance(conn, ServiceConnector)
    assert conn.type == "postgres" and conn.renewable and not conn.wrap_only
    assert conn.validate_resource("analytics") == "database"
    assert conn.validate_resource("analytics/sales") == "schema"
    for bad in ["analytics/sales/x", "1db", "db;drop", 'a"b', "a/", "/a", "x" * 64, "ok/Sales-1"]:
        with pytest.raises(ResourceNotSupported):
            conn.validate_resource(bad)
    lid = "lease_0190aa11bb22c3d4e5f60718293a4b5c"
    state = conn.plan(lid, "analytics/sales")
    assert state == {"role": role_name(lid), "database": "analytics", "schema": "sales"}
    assert state["role"] == "cg_" + "0190aa11bb22c3d4e5f60718293a4b5c"[-24:]
    assert conn.plan("lease_1", "analytics")["schema"] is None


def test_bad_dsn_is_a_value_error_without_the_dsn() -> None:
    canary = "CANARY" + secrets.token_hex(8)
    with pytest.raises(ValueError) as info:
        PostgresConnector(PostgresConfig(), "password", PostgresPasswordMaterial(dsn=f"host=x password={canary} junk"))
    assert canary not in all_text(info.value)


# -- issuing -------------------------------------------------------------------


async def test_schema_credential_is_scoped(target: Target) -> None:
    conn = connector(target)
    state, issued = await issue(conn, "analytics/sales")
    cred = issued.credential
    try:
        assert set(cred) == {"username", "password", "host", "port", "dbname", "dsn"}
        assert cred["username"] == state["role"] and cred["dbname"] == "analytics"
        assert cred["host"] == "127.0.0.1" and cred["port"] == str(target.cluster.port)
        assert cred["password"] not in repr(issued)
        can_login, _, inherit, createrole, createdb, superuser = target.role(state["role"])
        assert can_login and not inherit and not createrole and not createdb and not superuser

        with login(cred["dsn"]) as s:
            assert s.execute("SELECT current_user").fetchone() == (state["role"],)
            assert s.execute("SELECT amount FROM sales.orders").fetchall() == [(42,)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("INSERT INTO sales.orders (amount) VALUES (1)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("CREATE TABLE sales.mine (x int)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("CREATE TABLE public.mine (x int)")  # PostgreSQL 15+: no CREATE for PUBLIC
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("SELECT * FROM hr.salaries")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("SELECT * FROM public.events")  # a schema grant, not the database

        with pytest.raises(psycopg.OperationalError):
            login(target.cluster.dsn(dbname="analytics", user=cred["username"], password="wrong-" + cred["password"]))
    finally:
        await conn.revoke(state)


async def test_database_credential_and_resource_privileges(target: Target) -> None:
    conn = connector(target, resource_privileges={"analytics/sales": ["SELECT", "INSERT"]})
    db_state, db_issued = await issue(conn, "analytics")
    sales_state, sales_issued = await issue(conn, "analytics/sales")
    try:
        with login(db_issued.credential["dsn"]) as s:
            assert s.execute("SELECT name FROM events").fetchall() == [("signup",)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("SELECT * FROM sales.orders")
        with login(sales_issued.credential["dsn"]) as s:
            # INSERT into a serial column: the sequence grant comes with INSERT.
            s.execute("INSERT INTO sales.orders (amount) VALUES (7)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("DELETE FROM sales.orders")
    finally:
        await conn.revoke(db_state)
        await conn.revoke(sales_state)
        with target.superuser() as su:
            su.execute("DELETE FROM sales.orders WHERE amount = 7")


async def test_host_override_goes_into_the_credential(target: Target) -> None:
    conn = connector(target, host_override="db.example.internal")
    state, issued = await issue(conn, "analytics/sales")
    try:
        assert issued.credential["host"] == "db.example.internal"
        assert f"@db.example.internal:{target.cluster.port}/analytics" in issued.credential["dsn"]
    finally:
        await conn.revoke(state)


async def test_missing_schema_and_database_are_rejected_resources(target: Target) -> None:
    """The target refusing the resource is the caller's 409 naming it, not a 502."""
    conn = connector(target)
    lid = lease_id()
    state = conn.plan(lid, "analytics/nosuch")
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    with pytest.raises(ResourceRejected) as info:
        await conn.issue(IssueRequest(lid, "analytics/nosuch", timedelta(minutes=5), expires, state))
    err = info.value
    assert (err.status, err.code, err.reason) == (409, "target_rejected_resource", "not_found")
    assert err.body()["error"]["resource"] == "analytics/nosuch" and "nosuch" in err.message
    assert target.role(state["role"]) is None  # one transaction: the role went with the failed GRANT
    with pytest.raises(ResourceRejected) as info:
        await issue(conn, "nosuchdb")
    assert (info.value.status, info.value.code, info.value.resource) == (409, "target_rejected_resource", "nosuchdb")


async def test_grants_the_admin_may_not_give_fail_the_issue(target: Target) -> None:
    # PostgreSQL only WARNs (01007) on such a GRANT; a silent, privilege-less role is no success.
    conn = connector(target)
    lid = lease_id()
    state = conn.plan(lid, "analytics/audit")
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    with pytest.raises(ResourceRejected) as info:
        await conn.issue(IssueRequest(lid, "analytics/audit", timedelta(minutes=5), expires, state))
    assert (info.value.status, info.value.code, info.value.reason) == (409, "target_rejected_resource", "not_grantable")
    assert "01007" in info.value.message and info.value.resource == "analytics/audit"
    assert target.role(state["role"]) is None


# -- revoking ------------------------------------------------------------------


async def test_revoke_ends_open_sessions_and_logins(target: Target) -> None:
    conn = connector(target)
    state, issued = await issue(conn, "analytics/sales")
    session = login(issued.credential["dsn"])
    try:
        assert session.execute("SELECT 1").fetchone() == (1,)
        await conn.revoke(state)
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            login(issued.credential["dsn"])
        assert target.role(state["role"]) is None
        await conn.revoke(state)  # twice: already gone is success
    finally:
        session.close()


async def test_revoke_while_the_credential_keeps_reconnecting(target: Target) -> None:
    conn = connector(target)
    state, issued = await issue(conn, "analytics/sales")
    opened: list[Any] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                opened.append(login(issued.credential["dsn"]))
            except psycopg.OperationalError:
                time.sleep(0.005)

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        await asyncio.sleep(0.2)
        await conn.revoke(state)
        await asyncio.sleep(0.2)  # keep trying to get in after the revocation
    finally:
        stop.set()
        await asyncio.to_thread(worker.join, 10)
    try:
        assert opened, "the credential never logged in"
        assert target.role(state["role"]) is None
        for session in opened:
            with pytest.raises(psycopg.OperationalError):
                session.execute("SELECT 1")
    finally:
        for session in opened:
            session.close()


async def test_revoke_of_a_never_issued_lease_or_missing_database(target: Target) -> None:
    conn = connector(target)
    await conn.revoke(conn.plan(lease_id(), "analytics/sales"))
    await conn.revoke(conn.plan(lease_id(), "nosuchdb"))
    with pytest.raises(TargetError) as info:
        await conn.revoke({"role": "postgres", "database": "analytics", "schema": None})
    assert info.value.code == "invalid_revoke_state"


async def test_revocations_of_one_role_at_the_same_moment_both_succeed(target: Target) -> None:
    """Two revocations racing on one role (the gateway makes one at a time, but an operator's
    script or another gateway may not): the one that finds the role dropped under it (42704
    undefined_object, XX000 tuple concurrently deleted) succeeds too, as gone is revoked."""
    conn, other = connector(target), connector(target)
    states = [(await issue(conn, "analytics/sales"))[0] for _ in range(8)]
    results = await asyncio.gather(
        *(c.revoke(state) for state in states for c in (conn, other)), return_exceptions=True
    )
    assert [r for r in results if r is not None] == []
    assert [s["role"] for s in states if target.role(s["role"]) is not None] == []


async def test_a_role_dropped_out_of_band_revokes_as_gone(target: Target) -> None:
    conn = connector(target)
    state, issued = await issue(conn, "analytics/sales")
    with target.superuser() as su:
        su.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(state["role"])))
        su.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(state["role"])))
    await conn.revoke(state)
    assert target.role(state["role"]) is None


# -- expiry and renewal ----------------------------------------------------------


async def test_renew_moves_valid_until(target: Target) -> None:
    conn = connector(target)
    state, _ = await issue(conn, "analytics/sales")
    try:
        before = target.role(state["role"])[1]
        wanted = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=2)
        assert await conn.renew(state, wanted) == wanted
        after = target.role(state["role"])[1]
        assert after != before
        with target.superuser() as su:
            assert su.execute("SELECT %s::timestamptz = %s", (after, wanted)).fetchone() == (True,)
    finally:
        await conn.revoke(state)
    with pytest.raises(TargetError) as info:
        await conn.renew(state, wanted)
    assert info.value.code == "credential_gone"


async def test_expired_role_cannot_log_in(target: Target) -> None:
    conn = connector(target)
    state, issued = await issue(conn, "analytics/sales", ttl=timedelta(seconds=2))
    try:
        early = login(issued.credential["dsn"])  # before expiry: fine
        delay = (issued.expires_at - datetime.now(timezone.utc)).total_seconds() + 0.3
        await asyncio.sleep(max(delay, 0))
        with pytest.raises(psycopg.OperationalError):
            login(issued.credential["dsn"])
        # The server only checks VALID UNTIL at login: why revoke must terminate sessions.
        assert early.execute("SELECT 1").fetchone() == (1,)
        early.close()
    finally:
        await conn.revoke(state)


# -- verify and listing ------------------------------------------------------------


async def test_verify_and_list(target: Target) -> None:
    conn = connector(target)
    result = await conn.verify()
    assert result.ok, result.message
    assert result.identity == ADMIN
    assert {"analytics", "postgres"} <= set(result.reachable["database"])
    assert "template1" not in result.reachable["database"]
    assert result.reachable["schema"] == ["analytics/audit", "analytics/hr", "analytics/public", "analytics/sales"]
    assert target.admin_password not in result.message
    assert await conn.list_resources("schema") == result.reachable["schema"]
    assert "analytics" in await conn.list_resources("database")
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("table")


async def test_verify_with_a_wrong_password_reports_without_raising(target: Target) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    result = await connector(target, dsn=target.admin_dsn(password=canary)).verify()
    assert not result.ok
    assert "OperationalError" in result.message
    assert canary not in result.message


async def test_unreachable_target(target: Target) -> None:
    from tests.services.pgcluster import free_port

    dsn = f"postgresql://{ADMIN}:pw@127.0.0.1:{free_port()}/analytics"
    result = await connector(target, dsn=dsn, connect_timeout=2).verify()
    assert not result.ok
    with pytest.raises(TargetError) as info:
        await issue(connector(target, dsn=dsn, connect_timeout=2), "analytics")
    assert info.value.code == "target_unreachable"


# -- no secret in any error ----------------------------------------------------------


async def test_failed_issue_with_wrong_admin_password_hides_it(target: Target) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    with pytest.raises(TargetError) as info:
        await issue(connector(target, dsn=target.admin_dsn(password=canary)), "analytics/sales")
    assert info.value.code == "target_auth_failed"
    assert canary not in all_text(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


async def test_failed_create_role_never_shows_the_password(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    monkeypatch.setattr("connectors.postgres.secrets.token_urlsafe", lambda n=None: canary)
    conn = connector(target)
    lid = lease_id()
    state = conn.plan(lid, "analytics/sales")
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    req = IssueRequest(lid, "analytics/sales", timedelta(minutes=5), expires, state, timeout_seconds=10)
    try:
        await conn.issue(req)
        with pytest.raises(TargetError) as info:
            await conn.issue(req)  # the role exists: CREATE ROLE fails
        assert info.value.code == "credential_exists"
        assert canary not in all_text(info.value)
        assert info.value.__context__ is None
        # The server logs a failed statement; it carried a SCRAM verifier, not the password.
        assert canary not in target.cluster.log_file.read_text(errors="replace")
    finally:
        await conn.revoke(state)


def test_sanitize_keeps_the_class_and_sqlstate_never_the_statement() -> None:
    from psycopg import errors

    exc = errors.InsufficientPrivilege("permission denied: CREATE ROLE cg_x PASSWORD 'hunter2-canary'")
    assert PostgresConnector.sanitize(exc) == "InsufficientPrivilege (42501)"
    assert PostgresConnector.sanitize(ConnectionRefusedError(111, "hunter2-canary")) == "ConnectionRefusedError (111)"


def test_scram_verifier_is_the_one_libpq_makes() -> None:
    """The connector hashes SCRAM itself (hashlib's PBKDF2 lets other threads run, libpq's
    holds the GIL): for libpq's own salt and iteration count it must come out byte for byte
    the same, and a different password must not."""
    import base64

    from connectors.postgres import scram_verifier

    pgconn = psycopg.pq.PGconn.connect(b"")  # encrypt_password needs a handle, not a live server
    for _ in range(3):
        password = secrets.token_urlsafe(24)
        theirs = pgconn.encrypt_password(password.encode(), b"cg_x", b"scram-sha-256").decode()
        count, salt = theirs.split("$")[1].split(":")
        assert scram_verifier(password, int(count), base64.b64decode(salt)) == theirs
        assert scram_verifier(password + "x", int(count), base64.b64decode(salt)) != theirs
    assert scram_verifier("pw").split("$")[1].split(":")[0] == "4096"
    with pytest.raises(ValueError):
        scram_verifier("pässword")
