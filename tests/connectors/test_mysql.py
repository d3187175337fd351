"""The mysql connector against the MariaDB server on this machine (127.0.0.1:3306, root, no password).

Per module: a database ``cgt_<hex>`` with tables ``orders`` and ``customers``
(the resource), and ``cgtx<hex>`` with ``payroll``: a sibling that the ``_``
wildcard of an unescaped ``GRANT ... ON cgt_<hex>.*`` would also match.
"""

from __future__ import annotations

import asyncio
import os
import secrets
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
from connectors.mysql import MySQLConfig, MySQLConnector, MySQLPasswordMaterial
from tests.conftest import service_missing

pymysql = pytest.importorskip("pymysql")

HOST = os.environ.get("CREDGATE_TEST_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("CREDGATE_TEST_MYSQL_PORT", "3306"))
ADMIN_USER = os.environ.get("CREDGATE_TEST_MYSQL_USER", "root")
ADMIN_PASSWORD = os.environ.get("CREDGATE_TEST_MYSQL_PASSWORD", "")


def admin() -> Any:
    return pymysql.connect(
        host=HOST, port=PORT, user=ADMIN_USER, password=ADMIN_PASSWORD, autocommit=True, connect_timeout=3
    )


class Target:
    def __init__(self, db: str, sibling: str) -> None:
        self.db = db
        self.sibling = sibling
        self.states: list[dict[str, Any]] = []  # every planned account, dropped at teardown

    def user_exists(self, user: str) -> bool:
        with admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM mysql.user WHERE User = %s", (user,))
            return cur.fetchone() is not None


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    try:
        admin().close()
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        service_missing("MariaDB", f"{HOST}:{PORT} as {ADMIN_USER}: {type(exc).__name__} {exc.args[:1]}")
    suffix = secrets.token_hex(4)
    tgt = Target(f"cgt_{suffix}", f"cgtx{suffix}")
    try:
        with admin() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{tgt.db}`")
            cur.execute(f"CREATE TABLE `{tgt.db}`.orders (id int AUTO_INCREMENT PRIMARY KEY, amount int)")
            cur.execute(f"INSERT INTO `{tgt.db}`.orders (amount) VALUES (42)")
            cur.execute(f"CREATE TABLE `{tgt.db}`.customers (name varchar(32))")
            cur.execute(f"INSERT INTO `{tgt.db}`.customers VALUES ('ada')")
            cur.execute(f"CREATE DATABASE `{tgt.sibling}`")
            cur.execute(f"CREATE TABLE `{tgt.sibling}`.payroll (salary int)")
            cur.execute(f"INSERT INTO `{tgt.sibling}`.payroll VALUES (100)")
        yield tgt
    finally:
        with admin() as conn, conn.cursor() as cur:
            for state in tgt.states:
                cur.execute(f"DROP USER IF EXISTS `{state['user']}`@`{state['host']}`")
            cur.execute(f"DROP DATABASE IF EXISTS `{tgt.db}`")
            cur.execute(f"DROP DATABASE IF EXISTS `{tgt.sibling}`")


def connector(password: str = ADMIN_PASSWORD, port: int = PORT, **config: Any) -> MySQLConnector:
    material = MySQLPasswordMaterial(host=HOST, port=port, username=ADMIN_USER, password=password)
    return MySQLConnector(MySQLConfig(**config), "password", material)


def lease_id() -> str:
    return f"lease_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def plan(target: Target, conn: MySQLConnector, resource: str) -> tuple[dict[str, Any], IssueRequest]:
    lid = lease_id()
    state = conn.plan(lid, resource)
    target.states.append(state)
    ttl = timedelta(minutes=10)
    return state, IssueRequest(lid, resource, ttl, datetime.now(timezone.utc) + ttl, state, timeout_seconds=10)


async def issue(target: Target, conn: MySQLConnector, resource: str) -> tuple[dict[str, Any], Issued]:
    state, req = plan(target, conn, resource)
    return state, await conn.issue(req)


def login(cred: dict[str, str], password: str | None = None) -> Any:
    return pymysql.connect(
        host=cred["host"],
        port=int(cred["port"]),
        user=cred["username"],
        password=cred["password"] if password is None else password,
        database=cred["database"],
        autocommit=True,
        connect_timeout=3,
    )


def query(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


def all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc) + getattr(exc, "message", "")


# -- pure parts ----------------------------------------------------------------


def test_metadata_and_plan() -> None:
    conn = connector(user_host="10.%")
    assert isinstance(conn, ServiceConnector)
    assert conn.type == "mysql" and conn.renewable and not conn.wrap_only
    assert conn.validate_resource("shop") == "database"
    assert conn.validate_resource("shop/orders") == "table"
    for bad in ["shop/orders/x", "sh`op", "a b", "shop/", "x" * 65, "db.t"]:
        with pytest.raises(ResourceNotSupported):
            conn.validate_resource(bad)
    lid = lease_id()
    assert conn.plan(lid, "shop/orders") == {"user": role_name(lid), "host": "10.%", "database": "shop", "table": "orders"}
    assert conn.plan(lid, "shop")["table"] is None
    with pytest.raises(ResourceNotSupported):
        connector(privileges=["EXECUTE"]).validate_resource("shop/orders")
    with pytest.raises(ValueError):
        MySQLConfig(user_host="x'; DROP")


# -- issuing -------------------------------------------------------------------


async def test_database_credential_is_scoped(target: Target) -> None:
    conn = connector()
    state, issued = await issue(target, conn, target.db)
    cred = issued.credential
    try:
        assert set(cred) == {"username", "password", "host", "port", "database", "dsn"}
        assert cred["dsn"] == f"mysql://{cred['username']}:{cred['password']}@{HOST}:{PORT}/{target.db}"
        with login(cred) as s:
            assert query(s, "SELECT amount FROM orders") == [(42,)]
            assert query(s, "SELECT name FROM customers") == [("ada",)]
            with pytest.raises(pymysql.err.OperationalError) as info:
                query(s, "INSERT INTO orders (amount) VALUES (1)")
            assert info.value.args[0] == 1142  # command denied
            with pytest.raises(pymysql.err.OperationalError):
                query(s, "CREATE TABLE mine (x int)")
            # The sibling database would match an unescaped `cgt_...`.* grant.
            with pytest.raises(pymysql.err.OperationalError) as info:
                query(s, f"SELECT * FROM `{target.sibling}`.payroll")
            assert info.value.args[0] == 1142
            with pytest.raises(pymysql.err.OperationalError):
                query(s, "SELECT * FROM mysql.user")
        with pytest.raises(pymysql.err.OperationalError) as info:
            login(cred, password="wrong-" + cred["password"])
        assert info.value.args[0] == 1045
    finally:
        await conn.revoke(state)


async def test_table_credential_and_resource_privileges(target: Target) -> None:
    conn = connector(resource_privileges={"*/orders": ["SELECT", "INSERT"]})
    state, issued = await issue(target, conn, f"{target.db}/orders")
    try:
        with login(issued.credential) as s:
            query(s, "INSERT INTO orders (amount) VALUES (7)")
            assert (7,) in query(s, "SELECT amount FROM orders")
            with pytest.raises(pymysql.err.OperationalError):
                query(s, "DELETE FROM orders")
            with pytest.raises(pymysql.err.OperationalError):
                query(s, "SELECT * FROM customers")
    finally:
        await conn.revoke(state)
        with admin() as a:
            query(a, f"DELETE FROM `{target.db}`.orders WHERE amount = 7")


async def test_missing_resources_create_nothing(target: Target) -> None:
    conn = connector()
    for resource in ("nosuchdb_cg", f"{target.db}/nosuch"):
        state, req = plan(target, conn, resource)
        with pytest.raises(ResourceRejected) as info:
            await conn.issue(req)
        assert (info.value.status, info.value.code, info.value.reason) == (409, "target_rejected_resource", "not_found")
        assert info.value.body()["error"]["resource"] == resource
        assert not target.user_exists(state["user"])


async def test_a_resource_the_admin_may_not_grant_is_rejected_and_creates_nothing(target: Target) -> None:
    """An admin account that may grant on one database only: asking for another is the caller's
    409 naming the resource (not a 502), and the user made for it is gone."""
    limited, password = "cgt_lim_" + secrets.token_hex(3), secrets.token_urlsafe(12)
    with admin() as a, a.cursor() as cur:
        cur.execute(f"CREATE USER `{limited}`@`%%` IDENTIFIED BY %s", (password,))
        cur.execute(f"GRANT CREATE USER ON *.* TO `{limited}`@`%`")
        own = target.db.replace("_", "\\_")  # '_' is a wildcard in a GRANT's database name
        cur.execute(f"GRANT SELECT ON `{own}`.* TO `{limited}`@`%` WITH GRANT OPTION")
        cur.execute(f"GRANT SELECT ON `{target.sibling}`.* TO `{limited}`@`%`")  # it sees it, may not grant on it
    try:
        material = MySQLPasswordMaterial(host=HOST, port=PORT, username=limited, password=password)
        conn = MySQLConnector(MySQLConfig(), "password", material)
        state, req = plan(target, conn, target.sibling)
        with pytest.raises(ResourceRejected) as info:
            await conn.issue(req)
        err = info.value
        assert (err.status, err.code, err.reason, err.resource) == (409, "target_rejected_resource", "not_grantable", target.sibling)
        assert password not in all_text(err)
        assert not target.user_exists(state["user"])
        state, issued = await issue(target, conn, target.db)  # where it may grant, it works
        await conn.revoke(state)
    finally:
        with admin() as a, a.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS `{limited}`@`%`")


# -- revoking ------------------------------------------------------------------


async def test_revoke_kills_open_connections_and_drops_the_user(target: Target) -> None:
    conn = connector()
    state, issued = await issue(target, conn, target.db)
    sessions = [login(issued.credential), login(issued.credential)]
    try:
        assert query(sessions[0], "SELECT 1") == [(1,)]
        await conn.revoke(state)
        for session in sessions:
            with pytest.raises(pymysql.err.OperationalError):
                query(session, "SELECT 1")
        with pytest.raises(pymysql.err.OperationalError) as info:
            login(issued.credential)
        # MariaDB answers an unknown user with 1045 or, depending on the name, 1698
        # (ER_ACCESS_DENIED_NO_PASSWORD_ERROR): its fake authentication for missing users.
        assert info.value.args[0] in (1045, 1698), info.value.args
        assert not target.user_exists(state["user"])
        await conn.revoke(state)  # twice: already gone is success
    finally:
        for session in sessions:
            try:
                session.close()
            except pymysql.err.Error:
                pass


async def test_revoke_of_a_never_issued_lease(target: Target) -> None:
    conn = connector()
    state, _ = plan(target, conn, target.db)
    await conn.revoke(state)
    with pytest.raises(TargetError) as info:
        await conn.revoke({"user": "root", "host": "127.0.0.1", "database": target.db, "table": None})
    assert info.value.code == "invalid_revoke_state"


async def test_revocations_of_one_user_at_the_same_moment_both_succeed(target: Target) -> None:
    conn, other = connector(), connector()
    states = [(await issue(target, conn, target.db))[0] for _ in range(6)]
    results = await asyncio.gather(
        *(c.revoke(state) for state in states for c in (conn, other)), return_exceptions=True
    )
    assert [r for r in results if r is not None] == []
    assert [s["user"] for s in states if target.user_exists(s["user"])] == []


async def test_a_burst_of_issuances_and_their_bulk_revocation_share_the_pooled_admin_connections(
    target: Target,
) -> None:
    """Revocation does not open a connection per lease: 12 issuances, then their 12
    revocations at once, run on the same 2 admin connections (issue 15, item 4)."""
    from connectors.base import PoolLimits

    conn = MySQLConnector(
        MySQLConfig(), "password",
        MySQLPasswordMaterial(host=HOST, port=PORT, username=ADMIN_USER, password=ADMIN_PASSWORD),
        pool=PoolLimits(size=2),
    )
    issued = await asyncio.gather(*(issue(target, conn, target.db) for _ in range(12)))
    await asyncio.gather(*(conn.revoke(state) for state, _ in issued))
    stats = conn.target_pool.stats()
    assert stats["opened"] == 2 and stats["reused"] == 22, stats
    assert [s["user"] for s, _ in issued if target.user_exists(s["user"])] == []
    await conn.aclose()
    assert conn.target_pool.stats()["idle"] == 0


async def test_a_user_dropped_out_of_band_revokes_as_gone(target: Target) -> None:
    conn = connector()
    state, _ = await issue(target, conn, target.db)
    with admin() as a, a.cursor() as cur:
        cur.execute(f"DROP USER '{state['user']}'@'{state['host']}'")
    await conn.revoke(state)
    assert not target.user_exists(state["user"])


async def test_renew_checks_the_user(target: Target) -> None:
    conn = connector()
    state, issued = await issue(target, conn, target.db)
    wanted = datetime.now(timezone.utc) + timedelta(hours=2)
    assert await conn.renew(state, wanted) == wanted
    await conn.revoke(state)
    with pytest.raises(TargetError) as info:
        await conn.renew(state, wanted)
    assert info.value.code == "credential_gone"


# -- verify and listing ------------------------------------------------------------


async def test_verify_and_list(target: Target) -> None:
    conn = connector()
    result = await conn.verify()
    assert result.ok, result.message
    assert result.identity and result.identity.startswith(ADMIN_USER + "@")
    assert {target.db, target.sibling} <= set(result.reachable["database"])
    assert "mysql" not in result.reachable["database"]
    tables = await conn.list_resources("table")
    assert {f"{target.db}/orders", f"{target.db}/customers", f"{target.sibling}/payroll"} <= set(tables)
    assert target.db in await conn.list_resources("database")
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("schema")


async def test_verify_with_a_wrong_password_reports_without_raising() -> None:
    try:
        admin().close()
    except Exception:  # noqa: BLE001
        service_missing("MariaDB", f"{HOST}:{PORT}")
    canary = "CANARY" + secrets.token_hex(8)
    result = await connector(password=canary).verify()
    assert not result.ok
    assert "1045" in result.message and canary not in result.message


async def test_unreachable_target() -> None:
    from tests.services.pgcluster import free_port

    result = await connector(port=free_port(), connect_timeout=2).verify()
    assert not result.ok and "2003" in result.message


# -- no secret in any error ----------------------------------------------------------


async def test_failed_issue_with_wrong_admin_password_hides_it(target: Target) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    conn = connector(password=canary)
    _, req = plan(target, conn, target.db)
    with pytest.raises(TargetError) as info:
        await conn.issue(req)
    assert info.value.code == "target_auth_failed"
    assert canary not in all_text(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


async def test_failed_create_user_never_shows_the_password(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    monkeypatch.setattr("connectors.mysql.secrets.token_urlsafe", lambda n=None: canary)
    conn = connector()
    state, req = plan(target, conn, target.db)
    try:
        await conn.issue(req)
        with pytest.raises(TargetError) as info:
            await conn.issue(req)  # the user exists: CREATE USER fails
        assert info.value.code == "credential_exists"
        assert canary not in all_text(info.value)
        assert info.value.__context__ is None
    finally:
        await conn.revoke(state)


def test_sanitize_keeps_the_class_sqlstate_and_error_number_never_the_message() -> None:
    import pymysql

    denied = pymysql.err.OperationalError(1045, "Access denied for user 'admin' (using password: hunter2-canary)")
    assert MySQLConnector.sanitize(denied) == "OperationalError (1045)"
    server = pymysql.err.ProgrammingError(1146, "Table 'shop.hunter2-canary' doesn't exist")
    server.sqlstate = "42S02"  # PyMySQL 1.1+ sets it on server errors
    assert MySQLConnector.sanitize(server) == "ProgrammingError (42S02) [error 1146]"
    assert MySQLConnector.sanitize(ValueError("hunter2-canary")) == "ValueError"
