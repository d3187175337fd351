"""Bursts don't starve the target (issue 14, item 4): 200 concurrent PostgreSQL issuances
through the gateway against a cluster allowing 100 connections, with the default pool
(target_pool_size 4), while another client of that database keeps connecting.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.base import role_name
from tests.conftest import Gateway

pytestmark = pytest.mark.anyio

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """The store is not what is measured here: SQLite, once."""
    return f"sqlite:///{tmp_path / 'store.db'}"


class BurstTarget:
    def __init__(self, cluster: Any, admin: str, password: str, db: str) -> None:
        self.cluster, self.admin, self.password, self.db = cluster, admin, password, db

    def superuser(self) -> Any:
        return psycopg.connect(self.cluster.dsn(dbname=self.db), autocommit=True, connect_timeout=5)

    def admin_dsn(self) -> str:
        return self.cluster.dsn(dbname=self.db, user=self.admin, password=self.password)


@pytest.fixture
def burst_target(pg_cluster) -> Iterator[BurstTarget]:
    """A non-superuser admin with CREATEROLE owning a database of one table, in the session's
    scram cluster (max_connections 100)."""
    admin, password, db = "burst_" + secrets.token_hex(3), secrets.token_urlsafe(18), "burst_" + secrets.token_hex(3)
    ours = "SELECT rolname FROM pg_roles WHERE rolname LIKE 'cg\\_%'"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as su:
        # Other tests' lease roles in this session's cluster are theirs: only new ones are dropped.
        others = {r for (r,) in su.execute(ours).fetchall()}
        su.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
            psycopg.sql.Identifier(admin), password))
        su.execute(f'CREATE DATABASE "{db}" OWNER "{admin}"')
    tgt = BurstTarget(pg_cluster, admin, password, db)
    with psycopg.connect(tgt.admin_dsn(), autocommit=True) as c:
        c.execute("CREATE TABLE things (id int)")
    try:
        yield tgt
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as su:
            su.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for (role,) in su.execute(ours).fetchall():
                if role not in others:
                    su.execute(f'DROP ROLE IF EXISTS "{role}"')
            su.execute(f'DROP ROLE IF EXISTS "{admin}"')


class Watch:
    """In a thread: the admin role's sessions (sampled) and another client connecting throughout."""

    def __init__(self, tgt: BurstTarget) -> None:
        self.tgt = tgt
        self.admin_sessions: list[int] = []
        self.other_ok = 0
        self.other_refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.tgt.superuser() as watcher:
            while not self._stop.is_set():
                (n,) = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (self.tgt.admin,)
                ).fetchone()
                self.admin_sessions.append(n)
                try:  # the database's other client: a new connection every round
                    with self.tgt.superuser() as other:
                        other.execute("SELECT count(*) FROM things")
                    self.other_ok += 1
                except psycopg.OperationalError as exc:
                    self.other_refused.append(type(exc).__name__)
                time.sleep(0.005)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


BURST_SPEC = {"type": "postgres", "auth_method": "password", "secret": "local/t/burst"}


@contextlib.asynccontextmanager
async def served_burst(tgt: BurstTarget, settings: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A gateway on ``settings`` with the ``burst`` connector on ``tgt``: (app, admin client)."""
    import httpx

    from gateway.web.app import create_app
    from tests.conftest import ADMIN_TOKEN

    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as c:
        await c.put("/v1/secrets/local/t/burst", json={"data": {"dsn": tgt.admin_dsn()}})
        await c.put("/v1/connectors/burst", json={**BURST_SPEC, "resources": [tgt.db]})
        yield app, c


async def test_200_concurrent_issuances_queue_for_four_admin_connections_and_the_target_stays_open(
    burst_target: BurstTarget, gateway: Gateway  # in this order: the gateway goes first, revoking what is left
) -> None:
    tgt, c = burst_target, gateway.client
    with tgt.superuser() as su:
        assert su.execute("SHOW max_connections").fetchone() == ("100",)
    assert (await c.put("/v1/secrets/local/t/burst", json={"data": {"dsn": tgt.admin_dsn()}})).status_code in (200, 201)
    r = await c.put("/v1/connectors/burst", json={"type": "postgres", "auth_method": "password",
                                                  "secret": "local/t/burst", "resources": [tgt.db]})
    assert r.status_code in (200, 201), r.text

    async def issue() -> Any:
        return await c.post("/v1/credentials", json={"connector": "burst", "resource": tgt.db})

    with Watch(tgt) as watch:
        started = time.monotonic()
        answers = await asyncio.gather(*(issue() for _ in range(200)))
        burst_seconds = time.monotonic() - started
        issued = [a.json()["lease_id"] for a in answers if a.status_code == 200]
        busy = [a for a in answers if a.status_code == 503 and a.json()["error"]["code"] == "target_busy"]
        other = [(a.status_code, a.text[:200]) for a in answers if a.status_code != 200 and a not in busy]
        assert other == []  # never target_unreachable, never "could not connect"
        assert all(a.headers.get("Retry-After") for a in busy)
        assert len(issued) + len(busy) == 200 and len(issued) >= 150, (len(issued), burst_seconds)

        revoked = await c.post("/v1/leases/revoke", json={"connector": "burst"})
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["still_revoking"] == [] and revoked.json()["revoked"] == len(issued)
        await asyncio.sleep(0.05)  # one more sample after the last revocation

    assert watch.other_refused == [] and watch.other_ok > 5, (watch.other_ok, watch.other_refused)
    assert max(watch.admin_sessions) <= 4 and len(watch.admin_sessions) > 5, watch.admin_sessions
    stats = dict(gateway.runtime.catalog.pools())["burst"].stats()
    assert stats["opened"] <= 4 + stats["replaced"] + stats["discarded"], stats  # issue and revoke shared them
    assert stats["reused"] >= 2 * len(issued) - 4, stats
    with tgt.superuser() as su:
        left = su.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)",
                          ([role_name(i) for i in issued],)).fetchone()
    assert left == (0,)
    print(f"burst: {len(issued)} issued, {len(busy)} target_busy in {burst_seconds:.1f} s; "
          f"admin sessions at most {max(watch.admin_sessions)}; other client connected {watch.other_ok} times; {stats}")


async def test_a_wait_for_an_admin_connection_that_runs_out_is_503_target_busy(
    burst_target: BurstTarget, settings_factory
) -> None:
    tgt = burst_target
    async with served_burst(tgt, settings_factory(target_pool_size=1, target_pool_wait_seconds=0.3)) as (app, c):
        first = await c.post("/v1/credentials", json={"connector": "burst", "resource": tgt.db})
        assert first.status_code == 200, first.text
        pool = dict(app.state.runtime.catalog.pools())["burst"]
        async with pool.connection(tgt.db, 10):  # the pool's one connection, taken
            started = time.monotonic()
            r = await c.post("/v1/credentials", json={"connector": "burst", "resource": tgt.db})
            waited = time.monotonic() - started
        assert r.status_code == 503 and r.json()["error"]["code"] == "target_busy", r.text
        assert r.headers["Retry-After"] == "2" and r.json()["error"]["request_id"]
        assert 0.3 <= waited < 3
        assert tgt.password not in r.text
        metrics = (await c.get("/metrics")).text
        # the issuance, and the revocation of its planned role that followed at once: both waited
        assert 'credgate_target_pool_events_total{connector="burst",event="busy"} 2.0' in metrics
        assert 'credgate_target_pool_connections{connector="burst",state="in_use"} 0.0' in metrics
        # the refused issuance's pending lease is cleaned up once the connection is free
        out = await c.post("/v1/leases/revoke", json={"connector": "burst"})
        assert out.status_code == 200 and out.json()["still_revoking"] == [], out.text
        await app.state.runtime.credentials.revoke(await app.state.runtime.leases.mark_revoking())


def admin_pids(tgt: BurstTarget) -> set[int]:
    with tgt.superuser() as su:
        return {pid for (pid,) in su.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", (tgt.admin,))}


async def until(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


async def test_a_replaced_connector_and_a_stopping_gateway_close_their_admin_connections(
    burst_target: BurstTarget, settings_factory
) -> None:
    tgt = burst_target
    async with served_burst(tgt, settings_factory()) as (app, c):
        leases = [(await c.post("/v1/credentials", json={"connector": "burst", "resource": tgt.db})).json()["lease_id"]
                  for _ in range(3)]
        old = admin_pids(tgt)
        assert 1 <= len(old) <= 4
        await c.put("/v1/connectors/burst", json={**BURST_SPEC, "resources": [tgt.db, "other"]})  # a config change
        # the next use builds a new instance; the old one's pool is closed
        r = await c.post(f"/v1/leases/{leases[0]}/revoke")
        assert r.status_code == 200, r.text
        assert await until(lambda: admin_pids(tgt).isdisjoint(old)), (old, admin_pids(tgt))
        assert len(admin_pids(tgt)) == 1 and len(app.state.runtime.catalog.pools()) == 1
        out = await c.post("/v1/leases/revoke", json={"connector": "burst"})
        assert out.status_code == 200 and out.json()["still_revoking"] == []
    assert await until(lambda: admin_pids(tgt) == set())  # shutdown closed the pool


async def test_material_read_again_unchanged_keeps_the_instance_and_its_pool(
    burst_target: BurstTarget, settings_factory
) -> None:
    """material_cache_seconds 0 reads the material for every use: equal values keep the
    connector (and its admin connections) instead of building a new one each time."""
    tgt = burst_target
    async with served_burst(tgt, settings_factory(material_cache_seconds=0)) as (app, c):
        for _ in range(5):
            r = await c.post("/v1/credentials", json={"connector": "burst", "resource": tgt.db})
            assert r.status_code == 200, r.text
        [(name, pool)] = app.state.runtime.catalog.pools()
        assert pool.stats()["opened"] == 1 and pool.stats()["reused"] == 4
        # a changed value (here the same DSN written with another application_name) builds a new one
        await c.put("/v1/secrets/local/t/burst", json={"data": {"dsn": tgt.admin_dsn() + "?application_name=x"}})
        r = await c.post("/v1/credentials", json={"connector": "burst", "resource": tgt.db})
        assert r.status_code == 200, r.text
        [(_, newer)] = app.state.runtime.catalog.pools()
        assert newer is not pool
        out = await c.post("/v1/leases/revoke", json={"connector": "burst"})
        assert out.status_code == 200 and out.json()["still_revoking"] == []
