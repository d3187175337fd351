"""The shared pool of admin connections (connectors.base.TargetPool): first with a fake
driver (the rules), then each database connector against its real server (PostgreSQL:
a private scram cluster; MariaDB: the machine's server; Redis: a private redis-server with
a low maxclients), every case a few seconds at most.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from connectors.base import IssueRequest, PoolLimits, TargetPool, TargetUnreachable

pytestmark = pytest.mark.anyio


# --- the rules, with a fake driver -------------------------------------------------


class Fake:
    """A driver whose connections are numbered; it records what the pool did to them."""

    def __init__(self) -> None:
        self.n = 0
        self.open_now: set[int] = set()
        self.most_open = 0
        self.closed: list[int] = []
        self.broken: set[int] = set()
        self.dirty: set[int] = set()
        self.prepared: list[tuple[int, Any]] = []

    async def open(self, key: Any, timeout: float) -> int:
        await asyncio.sleep(0)
        self.n += 1
        self.open_now.add(self.n)
        self.most_open = max(self.most_open, len(self.open_now))
        return self.n

    async def prepare(self, conn: int, timeout: float) -> None:
        if conn in self.broken:
            raise ConnectionResetError(104, "gone")
        self.prepared.append((conn, timeout))

    def reusable(self, conn: int) -> bool:
        return conn not in self.dirty

    async def close(self, conn: int) -> None:
        self.open_now.discard(conn)
        self.closed.append(conn)

    def pool(self, **limits: Any) -> TargetPool[int]:
        return TargetPool("Fake", open=self.open, prepare=self.prepare, reusable=self.reusable, close=self.close,
                          limits=PoolLimits(**limits))


async def test_a_burst_shares_at_most_size_connections_in_arrival_order() -> None:
    fake = Fake()
    pool = fake.pool(size=3, wait_seconds=5)
    order: list[int] = []

    async def call(i: int) -> None:
        async with pool.connection(None, 10):
            order.append(i)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(call(i) for i in range(30)))
    assert fake.most_open == 3 and fake.n == 3  # opened once each, then reused
    assert order == list(range(30))  # first come, first served
    assert pool.stats() == {"size": 3, "in_use": 0, "idle": 3, "waiting": 0, "opened": 3, "reused": 27,
                            "replaced": 0, "discarded": 0, "busy": 0}
    await pool.aclose()
    assert fake.open_now == set()


async def test_a_wait_that_runs_out_is_target_busy_with_retry_after() -> None:
    fake = Fake()
    pool = fake.pool(size=1, wait_seconds=0.2)
    async with pool.connection(None, 10):
        started = time.monotonic()
        with pytest.raises(TargetUnreachable) as caught:
            async with pool.connection(None, 10):
                pass
        assert 0.15 < time.monotonic() - started < 1.0
    assert caught.value.code == "target_busy" and caught.value.status == 503 and caught.value.retry_after
    # the wait never outlasts the call's own deadline: here 0.5 s - 10%
    pool = fake.pool(size=1, wait_seconds=30)
    async with pool.connection(None, 10):
        started = time.monotonic()
        with pytest.raises(TargetUnreachable):
            async with pool.connection(None, 0.5):
                pass
        assert time.monotonic() - started < 0.5
    async with pool.connection(None, 10):  # the abandoned waits left the slot free
        pass
    assert pool.stats()["busy"] == 1 and pool.stats()["in_use"] == 0


async def test_a_connection_whose_call_failed_or_left_state_is_closed_not_reused() -> None:
    fake = Fake()
    pool = fake.pool(size=2)
    with pytest.raises(RuntimeError):
        async with pool.connection(None, 10) as conn:
            raise RuntimeError("the call failed")
    await asyncio.sleep(0.01)
    assert fake.closed == [conn]
    async with pool.connection(None, 10) as conn2:
        fake.dirty.add(conn2)  # e.g. a transaction left open
    await asyncio.sleep(0.01)
    assert fake.closed == [conn, conn2]
    with pytest.raises(TimeoutError):  # a call cut by its deadline: its connection goes too
        async with asyncio.timeout(0.05):
            async with pool.connection(None, 10) as conn3:
                await asyncio.sleep(1)
    await asyncio.sleep(0.01)
    assert fake.closed == [conn, conn2, conn3] and pool.stats()["in_use"] == 0


async def test_a_connection_broken_while_idle_is_replaced_transparently() -> None:
    fake = Fake()
    pool = fake.pool(size=2)
    async with pool.connection(None, 10) as first:
        pass
    fake.broken.add(first)
    async with pool.connection(None, 7) as second:
        assert second != first
    assert fake.closed == [first] and pool.stats()["replaced"] == 1
    assert fake.prepared[-1] == (second, pytest.approx(7, abs=0.5))  # prepared with the call's own deadline


async def test_keys_share_the_bound_and_idle_connections_of_another_key_make_room() -> None:
    fake = Fake()
    pool = fake.pool(size=2)
    async with pool.connection("db1", 10), pool.connection("db2", 10):
        pass
    assert fake.most_open == 2
    async with pool.connection("db3", 10):
        assert len(fake.open_now) == 2  # one idle connection of db1/db2 was closed first
    async with pool.connection("db3", 10):
        pass
    assert fake.n == 3 and fake.most_open == 2


async def test_aclose_closes_idle_now_and_in_use_when_their_call_ends() -> None:
    fake = Fake()
    pool = fake.pool(size=2)
    async with pool.connection(None, 10) as busy:
        async with pool.connection(None, 10) as idle:
            pass
        await pool.aclose()
        assert fake.closed == [idle] and busy in fake.open_now
    await asyncio.sleep(0.01)
    assert fake.open_now == set()
    async with pool.connection(None, 10) as late:  # a call still arriving is served, then closed
        pass
    await asyncio.sleep(0.01)
    assert late in fake.closed and fake.open_now == set()


async def test_idle_connections_are_closed_after_idle_seconds() -> None:
    fake = Fake()
    pool = fake.pool(size=2, idle_seconds=0.1)
    async with pool.connection(None, 10):
        pass
    await asyncio.sleep(0.3)
    assert fake.open_now == set() and pool.stats()["idle"] == 0


async def test_a_thread_still_using_its_connection_keeps_the_slot_until_it_ends() -> None:
    fake = Fake()
    pool = fake.pool(size=1, wait_seconds=5)
    with pytest.raises(TimeoutError):
        async with pool.connection(None, 10) as conn:
            await pool.run_sync(conn, lambda c: time.sleep(0.4), timeout=0.05)
    assert conn in fake.open_now and pool.stats()["in_use"] == 1  # the thread still has it
    started = time.monotonic()
    async with pool.connection(None, 10) as other:
        assert time.monotonic() - started > 0.2 and conn in fake.closed and other != conn
    await pool.aclose()


# --- PostgreSQL ---------------------------------------------------------------------

psycopg = pytest.importorskip("psycopg")

from connectors.postgres import PostgresConfig, PostgresConnector, PostgresPasswordMaterial  # noqa: E402
from tests.connectors.test_postgres import ADMIN, Target, admin_target, all_text, lease_id  # noqa: E402


@pytest.fixture(scope="module")
def pg_target() -> Iterator[Target]:
    with admin_target() as tgt:
        yield tgt


def pg_connector(target: Target, dsn: str | None = None, **limits: Any) -> PostgresConnector:
    return PostgresConnector(PostgresConfig(), "password", PostgresPasswordMaterial(dsn=dsn or target.admin_dsn()),
                             pool=PoolLimits(**limits) if limits else None)


def admin_backends(target: Target) -> list[tuple[int, str]]:
    """(pid, database) of every session of the connector's admin role."""
    with target.superuser() as su:
        return su.execute(
            "SELECT pid, datname FROM pg_stat_activity WHERE usename = %s AND application_name = 'credgate'", (ADMIN,)
        ).fetchall()


def request(conn: Any, resource: str, timeout: float = 10) -> IssueRequest:
    lid = lease_id()
    now = datetime.now(timezone.utc)
    return IssueRequest(lid, resource, timedelta(minutes=5), now + timedelta(minutes=5), conn.plan(lid, resource),
                        timeout_seconds=timeout)


async def test_postgres_burst_stays_within_the_pool_and_revocations_reuse_it(pg_target: Target) -> None:
    conn = pg_connector(pg_target, size=3)
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            seen.append(len(await asyncio.to_thread(admin_backends, pg_target)))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        reqs = [request(conn, "analytics/sales") for _ in range(40)]
        await asyncio.gather(*(conn.issue(r) for r in reqs))
        pids_after_issue = {pid for pid, _ in await asyncio.to_thread(admin_backends, pg_target)}
        await asyncio.gather(*(conn.revoke(r.revoke_state) for r in reqs))
    finally:
        stop.set()
        await watcher
    stats = conn.target_pool.stats()
    # 80 calls, 3 connections: every revocation ran on a connection the issuances had opened
    assert stats["opened"] == 3 and stats["reused"] == 77, stats
    assert {pid for pid, _ in await asyncio.to_thread(admin_backends, pg_target)} == pids_after_issue
    assert max(seen) <= 3 and len(seen) > 3, seen
    assert all(pg_target.role(r.revoke_state["role"]) is None for r in reqs)
    await conn.aclose()
    assert admin_backends(pg_target) == []


async def test_postgres_pooled_connection_terminated_is_replaced(pg_target: Target) -> None:
    conn = pg_connector(pg_target)
    first = request(conn, "analytics/sales")
    await conn.issue(first)
    [(pid, _)] = admin_backends(pg_target)
    with pg_target.superuser() as su:
        su.execute("SELECT pg_terminate_backend(%s)", (pid,))
    for _ in range(50):  # the backend exits
        if not admin_backends(pg_target):
            break
        time.sleep(0.01)
    req = request(conn, "analytics/sales")
    issued = await conn.issue(req)  # no error: the dead connection was replaced
    assert issued.credential["username"] == req.revoke_state["role"]
    assert conn.target_pool.stats()["replaced"] == 1
    await conn.revoke(req.revoke_state)
    await conn.revoke(first.revoke_state)
    await conn.aclose()


async def test_postgres_session_state_never_leaks_to_the_next_call(pg_target: Target) -> None:
    conn = pg_connector(pg_target)
    pool = conn.target_pool
    async with pool.connection(None, 10) as c:
        await c.execute("SET search_path = hr; SET work_mem = '7MB'; SET ROLE NONE")
        pid = c.info.backend_pid
    async with pool.connection(None, 4) as c:
        assert c.info.backend_pid == pid  # the same session, reset
        row = await (await c.execute(
            "SELECT current_setting('search_path'), current_setting('work_mem'), current_user, "
            "(SELECT setting::int FROM pg_settings WHERE name = 'statement_timeout')")).fetchone()
        assert row[:3] == ('"$user", public', "4MB", ADMIN)
        assert 3500 <= row[3] <= 4000  # this call's own deadline (4 s, less the time it took to get here)
        await c.execute("BEGIN")  # left open: never handed out again
    async with pool.connection(None, 10) as c:
        assert c.info.backend_pid != pid
    await conn.aclose()


async def test_postgres_connection_limit_is_reported_as_such_without_secrets(pg_target: Target) -> None:
    password = secrets.token_urlsafe(18)
    with pg_target.superuser() as su:
        su.execute(psycopg.sql.SQL("CREATE ROLE pool_limited LOGIN CONNECTION LIMIT 1 PASSWORD {}").format(password))
    try:
        dsn = pg_target.cluster.dsn(dbname="analytics", user="pool_limited", password=password)
        with psycopg.connect(dsn):  # takes the role's one connection
            conn = pg_connector(pg_target, dsn=dsn)
            with pytest.raises(TargetUnreachable) as caught:
                await conn.list_resources("database")
            verdict = await conn.verify()
            await conn.aclose()
        assert caught.value.code == "target_too_many_connections" and caught.value.retry_after
        assert "53300" in caught.value.message or "connection limit" in caught.value.message
        assert not verdict.ok and "connection limit" in verdict.message
        for text in (all_text(caught.value), verdict.message):  # the whole chain, traceback included
            assert password not in text and "pool_limited:" not in text
    finally:
        with pg_target.superuser() as su:
            su.execute("DROP ROLE pool_limited")


async def test_postgres_wait_that_runs_out_is_target_busy(pg_target: Target) -> None:
    conn = pg_connector(pg_target, size=1, wait_seconds=0.3)
    async with conn.target_pool.connection(None, 10):
        with pytest.raises(TargetUnreachable) as caught:
            await conn.issue(request(conn, "analytics/sales"))
    assert caught.value.code == "target_busy" and caught.value.retry_after
    assert pg_target.admin_password not in all_text(caught.value)
    await conn.aclose()


# --- MariaDB ------------------------------------------------------------------------

pymysql = pytest.importorskip("pymysql")


@pytest.fixture
def mysql_limited_user(mariadb_server: dict) -> Iterator[tuple[str, str]]:
    """A dedicated account allowed one connection (the server's global limits are not touched)."""
    user, password = "pool_lim_" + secrets.token_hex(3), secrets.token_urlsafe(18)
    with pymysql.connect(**mariadb_server, autocommit=True) as c, c.cursor() as cur:
        cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s WITH MAX_USER_CONNECTIONS 1", (password,))
    try:
        yield user, password
    finally:
        with pymysql.connect(**mariadb_server, autocommit=True) as c, c.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def mysql_connector(server: dict, user: str, password: str, **limits: Any) -> Any:
    from connectors.mysql import MySQLConfig, MySQLConnector, MySQLPasswordMaterial

    material = MySQLPasswordMaterial(host=server["host"], port=server["port"], username=user, password=password)
    return MySQLConnector(MySQLConfig(), "password", material, pool=PoolLimits(**limits) if limits else None)


async def test_mysql_connection_limit_is_reported_as_such(mariadb_server: dict, mysql_limited_user) -> None:
    user, password = mysql_limited_user
    with pymysql.connect(host=mariadb_server["host"], port=mariadb_server["port"], user=user, password=password):
        conn = mysql_connector(mariadb_server, user, password)
        with pytest.raises(TargetUnreachable) as caught:
            await conn.list_resources("database")
        await conn.aclose()
    assert caught.value.code == "target_too_many_connections" and caught.value.retry_after
    assert password not in all_text(caught.value)
    # its own one connection, pooled: every call after the first reuses it
    conn = mysql_connector(mariadb_server, user, password, size=1)
    for _ in range(5):
        await conn.list_resources("database")
    assert conn.target_pool.stats()["opened"] == 1
    await conn.aclose()


async def test_mysql_pool_bounds_a_burst_and_replaces_a_killed_connection(mariadb_server: dict) -> None:
    conn = mysql_connector(mariadb_server, mariadb_server["user"], mariadb_server["password"], size=2, wait_seconds=5)
    await asyncio.gather(*(conn.list_resources("database") for _ in range(20)))
    stats = conn.target_pool.stats()
    assert stats["opened"] == 2 and stats["reused"] == 18, stats
    async with conn.target_pool.connection(None, 5) as c:
        thread_id = c.thread_id()
    with pymysql.connect(**mariadb_server) as c, c.cursor() as cur:
        cur.execute(f"KILL CONNECTION {thread_id:d}")
    await asyncio.gather(*(conn.list_resources("database") for _ in range(4)))
    assert conn.target_pool.stats()["replaced"] >= 1
    async with conn.target_pool.connection(None, 5):
        async with conn.target_pool.connection(None, 5):
            conn.target_pool.limits = PoolLimits(size=2, wait_seconds=0.2)
            with pytest.raises(TargetUnreachable) as caught:
                await conn.list_resources("database")
    assert caught.value.code == "target_busy"
    await conn.aclose()


# --- Redis --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_redis() -> Iterator[str]:
    """A private redis-server allowing 2 clients (the shared one is left alone)."""
    from tests.services.redisserver import private_redis

    with private_redis("--maxclients", "2") as url:
        yield url


async def test_redis_maxclients_is_reported_as_such_and_the_pool_reuses(small_redis: str) -> None:
    import redis

    from connectors.redis import RedisConfig, RedisConnector, RedisPasswordMaterial

    conn = RedisConnector(RedisConfig(), "password", RedisPasswordMaterial(url=small_redis), pool=PoolLimits(size=1))
    lid = lease_id()
    state = conn.plan(lid, "pool")
    now = datetime.now(timezone.utc)
    issued = await asyncio.gather(*(
        conn.issue(IssueRequest(lid + str(i), "pool", timedelta(minutes=1), now + timedelta(minutes=1),
                                {"user": state["user"] + str(i)}, timeout_seconds=5))
        for i in range(10)
    ))
    assert conn.target_pool.stats()["opened"] == 1
    await asyncio.gather(*(conn.revoke({"user": state["user"] + str(i)}) for i in range(10)))
    assert conn.target_pool.stats()["opened"] == 1
    await conn.aclose()

    port = int(small_redis.rsplit(":", 1)[1].split("/")[0])
    hogs = [redis.Redis(port=port, socket_timeout=2) for _ in range(2)]
    for h in hogs:
        h.ping()  # the server's 2 clients
    try:
        conn = RedisConnector(RedisConfig(), "password", RedisPasswordMaterial(url=small_redis))
        with pytest.raises(TargetUnreachable) as caught:
            await conn.list_resources("keyspace")
        await conn.aclose()
    finally:
        for h in hogs:
            h.close()
    assert caught.value.code == "target_too_many_connections" and caught.value.retry_after
    assert all(i.credential["password"] not in all_text(caught.value) for i in issued)
