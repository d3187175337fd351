"""Revocations agree: two revocations of one lease at the same moment.

Two gateways ("replicas", each its own app, runtime and reaper) share one PostgreSQL
store and revoke credentials on a scram PostgreSQL cluster, MariaDB and Redis:

- 100 leases (PostgreSQL, MariaDB, Redis) each revoked twice at once (API on A + API
  on B, a double-submitted request on one replica, API + reaper ticks): every answer
  is 200 ``revoked``, no failed attempt is logged or recorded, no lease is left
  revoking, nothing is left at the targets; the same for 100 expired PostgreSQL
  leases through two served replicas (`credgate serve`) and their reaper;
- a bulk revoke on A while both reapers tick over the same 100 expired leases:
  matched == revoked, nothing still revoking;
- a role or user dropped out of band before the revoke: the revoke answers revoked.

The reapers are ticked by hand (settings ``reaper_enabled=False``), both at once,
which is more contention than leadership would ever allow.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from connectors.base import role_name
from gateway.issuing.leases import REVOKED, REVOKING
from gateway.store.models import LeaseRow, utcnow
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN, Gateway

pytestmark = pytest.mark.anyio


@pytest.fixture
def store_url(postgres_url: str) -> str:
    """These races are about a shared store: PostgreSQL, as replicas use."""
    return postgres_url


@pytest.fixture
def pg_db(pg_cluster) -> Iterator[str]:
    import psycopg

    db = "races_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield db
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture
def failures(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Warnings and errors of credgate's loggers (attached to them directly: a served
    gateway's log set-up stops propagation)."""
    caplog.set_level(logging.INFO)
    root = logging.getLogger("credgate")
    root.addHandler(caplog.handler)
    try:
        yield caplog.records
    finally:
        root.removeHandler(caplog.handler)


def bad(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING and r.name.startswith("credgate")]


@asynccontextmanager
async def replica(settings: Any) -> AsyncIterator[Gateway]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120,
        ) as client:
            gw = Gateway(app, client)
            try:
                yield gw
            finally:
                rt = gw.runtime
                await rt.credentials.revoke(await rt.leases.mark_revoking())


@asynccontextmanager
async def two_replicas(settings_factory, tmp_path) -> AsyncIterator[tuple[Gateway, Gateway]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(replica(settings_factory(data_dir=tmp_path / "a")))
        b = await stack.enter_async_context(replica(settings_factory(data_dir=tmp_path / "b")))
        yield a, b


async def ok(r: httpx.Response, *codes: int) -> dict:
    assert r.status_code in (codes or (200, 201)), r.text
    return r.json()


async def connect_targets(gw: Gateway, pg_cluster, db: str, mariadb: dict | None = None, redis_url: str | None = None) -> None:
    c = gw.client
    await ok(await c.put("/v1/secrets/local/t/pg", json={"data": {"dsn": pg_cluster.dsn()}}))
    await ok(await c.put("/v1/connectors/pg", json={"type": "postgres", "auth_method": "password",
                                                    "secret": "local/t/pg", "resources": [db, f"{db}/*"]}))
    if mariadb is not None:
        import pymysql

        with pymysql.connect(**mariadb) as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS racedb")
        await ok(await c.put("/v1/secrets/local/t/maria", json={"data": {
            "host": mariadb["host"], "port": str(mariadb["port"]), "username": mariadb["user"], "password": mariadb["password"]}}))
        await ok(await c.put("/v1/connectors/maria", json={"type": "mysql", "auth_method": "password", "secret": "local/t/maria",
                                                           "resources": ["racedb"], "config": {"user_host": "127.0.0.1"}}))
    if redis_url is not None:
        await ok(await c.put("/v1/secrets/local/t/redis", json={"data": {"url": redis_url}}))
        await ok(await c.put("/v1/connectors/redis", json={"type": "redis", "auth_method": "password",
                                                           "secret": "local/t/redis", "resources": ["races"]}))


async def issue_many(gw: Gateway, connector: str, resource: str, n: int) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one() -> str:
        async with sem:
            body = await ok(await gw.client.post("/v1/credentials", json={"connector": connector, "resource": resource}))
            return body["lease_id"]

    return list(await asyncio.gather(*(one() for _ in range(n))))


def pg_roles(cluster, names: set[str]) -> set[str]:
    import psycopg

    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(names),)).fetchall()
    return {r[0] for r in rows}


def maria_users(server: dict, names: set[str]) -> set[str]:
    import pymysql

    with pymysql.connect(**server) as conn, conn.cursor() as cur:
        cur.execute("SELECT user FROM mysql.user WHERE user LIKE 'cg\\_%%'")
        return {r[0] for r in cur.fetchall()} & names


def redis_users(url: str, names: set[str]) -> set[str]:
    import redis

    return set(redis.Redis.from_url(url, decode_responses=True).acl_users()) & names


async def lease_rows(gw: Gateway, ids: list[str]) -> list[LeaseRow]:
    return [await gw.runtime.leases.get(i) for i in ids]


async def test_every_lease_revoked_twice_at_once_answers_revoked_both_times(
    settings_factory, tmp_path, pg_cluster, pg_db, mariadb_server, redis_server, failures
) -> None:
    async with two_replicas(settings_factory, tmp_path) as (a, b):
        await connect_targets(a, pg_cluster, pg_db, mariadb_server, redis_server)
        pg = await issue_many(a, "pg", pg_db, 60)
        maria = await issue_many(b, "maria", "racedb", 20)
        red = await issue_many(a, "redis", "races", 20)
        leases = pg + maria + red
        names = {lease_id: role_name(lease_id) for lease_id in leases}
        assert pg_roles(pg_cluster, {names[i] for i in pg}) == {names[i] for i in pg}  # all there to revoke

        answers: list[tuple[str, int, str]] = []

        async def revoke(gw: Gateway, lease_id: str) -> None:
            r = await gw.client.post(f"/v1/leases/{lease_id}/revoke")
            answers.append((lease_id, r.status_code, r.json().get("state", r.text)))

        async def ticks(gw: Gateway, until: asyncio.Event) -> int:
            n = 0
            while not until.is_set():
                await gw.runtime.reaper.tick()
                n += 1
                await asyncio.sleep(0)
            return n

        # Three ways to race, a third of the leases each: API on A + API on B (the store's
        # claim decides), the same request twice on one replica (double submit), and API
        # on B + both reapers ticking over leases already marked revoking.
        third = len(leases) // 3
        across, double, vs_reaper = leases[:third], leases[third:2 * third], leases[2 * third:]
        await a.runtime.leases.mark_revoking(lease_ids=vs_reaper)
        stop = asyncio.Event()
        reapers = [asyncio.create_task(ticks(a, stop)), asyncio.create_task(ticks(b, stop))]
        calls = [revoke(a, i) for i in across] + [revoke(b, i) for i in across]
        calls += [revoke(a, i) for i in double] + [revoke(a, i) for i in double]
        calls += [revoke(b, i) for i in vs_reaper]
        await asyncio.gather(*calls)
        stop.set()
        assert all(n >= 1 for n in await asyncio.gather(*reapers))

        assert len(answers) == 2 * len(across) + 2 * len(double) + len(vs_reaper) == 166
        wrong = [x for x in answers if x[1:] != (200, REVOKED)]
        assert wrong == [], wrong[:5]
        rows = await lease_rows(a, leases)
        assert {r.state for r in rows} == {REVOKED}
        assert [r.id for r in rows if r.attempts or r.last_error or r.revoke_owner] == []  # no failed attempt recorded
        assert bad(failures) == []  # ... nor logged
        assert pg_roles(pg_cluster, {names[i] for i in pg}) == set()
        assert maria_users(mariadb_server, {names[i] for i in maria}) == set()
        assert redis_users(redis_server, {names[i] for i in red}) == set()


async def test_bulk_revoke_during_reaper_ticks_reports_every_lease_revoked(
    settings_factory, tmp_path, pg_cluster, pg_db, failures
) -> None:
    async with two_replicas(settings_factory, tmp_path) as (a, b):
        await connect_targets(a, pg_cluster, pg_db)
        leases = await issue_many(a, "pg", pg_db, 100)
        # All expired: both reapers want to revoke them while the bulk revoke does.
        async with a.runtime.store.write() as s:
            await s.execute(update(LeaseRow).where(LeaseRow.id.in_(leases)).values(expires_at=utcnow() - timedelta(seconds=1)))

        stop = asyncio.Event()
        reaped = {"revoked": 0, "failed": 0}

        async def ticks(gw: Gateway) -> None:
            while not stop.is_set():
                done = await gw.runtime.reaper.tick()
                reaped["revoked"] += done["revoked"]
                reaped["failed"] += done["failed"]
                await asyncio.sleep(0)

        reapers = [asyncio.create_task(ticks(a)), asyncio.create_task(ticks(b))]
        await asyncio.sleep(0.05)  # the reapers are under way
        bulk = await ok(await a.client.post("/v1/leases/revoke", json={"connector": "pg"}))
        stop.set()
        await asyncio.gather(*reapers)

        # Some leases were already revoked by a reaper before the bulk call matched (it matches
        # live leases only); every one it matched is revoked by the time it answers.
        assert bulk["still_revoking"] == []
        assert bulk["matched"] == bulk["revoked"] > 0
        assert reaped["failed"] == 0
        assert reaped["revoked"] + bulk["revoked"] >= len(leases)  # each revoked, by one of them or waited for
        rows = await lease_rows(a, leases)
        assert {r.state for r in rows} == {REVOKED}
        assert [r.id for r in rows if r.attempts or r.last_error] == []
        assert bad(failures) == []
        assert pg_roles(pg_cluster, {role_name(i) for i in leases}) == set()


async def test_run_revoke_during_reaper_ticks(settings_factory, tmp_path, pg_cluster, pg_db, failures) -> None:
    async with two_replicas(settings_factory, tmp_path) as (a, b):
        await connect_targets(a, pg_cluster, pg_db)
        run = await ok(await a.client.post("/v1/runs/race-run/token", json={"connectors": ["pg"], "resources": [pg_db]}))
        async with a.as_token(run["token"]) as as_run:
            leases = await issue_many(Gateway(a.app, as_run), "pg", pg_db, 40)
        async with a.runtime.store.write() as s:  # all expired: the reapers' work too
            await s.execute(update(LeaseRow).where(LeaseRow.id.in_(leases)).values(expires_at=utcnow() - timedelta(seconds=1)))
        stop = asyncio.Event()

        async def ticks(gw: Gateway) -> None:
            while not stop.is_set():
                await gw.runtime.reaper.tick()
                await asyncio.sleep(0)

        reapers = [asyncio.create_task(ticks(a)), asyncio.create_task(ticks(b))]
        await asyncio.sleep(0.05)  # the reapers are under way
        out = await ok(await b.client.post("/v1/runs/race-run/revoke"))
        stop.set()
        await asyncio.gather(*reapers)
        assert out["leases_still_revoking"] == [] and out["leases_revoked"] > 0
        rows = await lease_rows(a, leases)
        assert {r.state for r in rows} == {REVOKED}
        assert bad(failures) == []
        assert pg_roles(pg_cluster, {role_name(i) for i in leases}) == set()


async def test_a_claimed_lease_is_waited_for_then_reported_as_its_holder_left_it_or_taken_over(
    settings_factory, tmp_path, pg_cluster, pg_db, failures
) -> None:
    """Another replica's claim is honoured: no second attempt while it holds (the reaper
    skips the lease, a request waits), and its outcome is what the waiter reports; a
    claim whose holder died lapses, and the waiter then revokes the lease itself."""
    async with two_replicas(settings_factory, tmp_path) as (a, b):
        await connect_targets(a, pg_cluster, pg_db)
        [lease_id] = await issue_many(a, "pg", pg_db, 1)
        await a.runtime.leases.mark_revoking(lease_ids=[lease_id])
        now = utcnow()
        assert await b.runtime.leases.claim(lease_id, "replica-b", now, now + timedelta(seconds=30))
        assert not await a.runtime.leases.claim(lease_id, "replica-a", now, now + timedelta(seconds=30))

        done = await a.runtime.reaper.tick()
        assert (done["revoked"], done["failed"]) == (0, 0)  # skipped: not its to try
        polled = asyncio.Event()  # set once the request is in its wait for the holder's outcome
        progress = a.runtime.leases.revoke_progress

        async def spied(lease: str):
            polled.set()
            return await progress(lease)

        a.runtime.leases.revoke_progress = spied  # type: ignore[method-assign]
        waiting = asyncio.create_task(a.client.post(f"/v1/leases/{lease_id}/revoke"))
        await asyncio.wait_for(polled.wait(), 20)
        await asyncio.sleep(0.3)
        assert not waiting.done()  # waiting for the holder, not revoking a second time
        assert pg_roles(pg_cluster, {role_name(lease_id)}) == {role_name(lease_id)}
        # The holder fails its attempt: the waiter reports the lease still revoking (202).
        assert await b.runtime.leases.revoke_failed(lease_id, "replica-b", attempts=1, last_error="x",
                                                    next_attempt_at=utcnow() + timedelta(seconds=60))
        r = await waiting
        assert (r.status_code, r.json()["state"], r.json()["attempts"]) == (202, REVOKING, 1)
        # Unclaimed now: the next request revokes it itself.
        r = await a.client.post(f"/v1/leases/{lease_id}/revoke")
        assert (r.status_code, r.json()["state"]) == (200, REVOKED)
        assert pg_roles(pg_cluster, {role_name(lease_id)}) == set()

        # A holder that died: its claim is never released, and lapses at its deadline; the
        # waiting request then claims the lease itself and revokes it.
        [orphan] = await issue_many(a, "pg", pg_db, 1)
        await a.runtime.leases.mark_revoking(lease_ids=[orphan])
        now = utcnow()
        assert await b.runtime.leases.claim(orphan, "dead-replica", now, now + timedelta(seconds=0.5))
        r = await a.client.post(f"/v1/leases/{orphan}/revoke")
        assert (r.status_code, r.json()["state"], r.json()["attempts"]) == (200, REVOKED, 0)
        assert utcnow() >= now + timedelta(seconds=0.5)  # not before the claim lapsed
        assert pg_roles(pg_cluster, {role_name(orphan)}) == set()


async def test_credentials_dropped_out_of_band_revoke_as_revoked(
    settings_factory, tmp_path, pg_cluster, pg_db, mariadb_server, redis_server, failures
) -> None:
    import psycopg
    import pymysql
    import redis

    async with replica(settings_factory(data_dir=tmp_path / "a")) as gw:
        await connect_targets(gw, pg_cluster, pg_db, mariadb_server, redis_server)
        [pg] = await issue_many(gw, "pg", pg_db, 1)
        [maria] = await issue_many(gw, "maria", "racedb", 1)
        [red] = await issue_many(gw, "redis", "races", 1)
        with psycopg.connect(pg_cluster.dsn(dbname=pg_db), autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role_name(pg)}"')
            conn.execute(f'DROP ROLE "{role_name(pg)}"')
        with pymysql.connect(**mariadb_server) as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER '{role_name(maria)}'@'127.0.0.1'")
        assert redis.Redis.from_url(redis_server).acl_deluser(role_name(red)) == 1
        for lease_id in (pg, maria, red):
            r = await gw.client.post(f"/v1/leases/{lease_id}/revoke")
            assert (r.status_code, r.json()["state"], r.json()["attempts"]) == (200, REVOKED, 0), r.text
        assert bad(failures) == []


async def test_on_sqlite_too_one_claim_at_a_time_and_double_revokes_agree(
    settings_factory, tmp_path, redis_server, failures
) -> None:
    """SQLite (one process): the claim is the same conditional UPDATE, and a request, its
    double and the reaper racing over 30 Redis leases all answer revoked."""
    settings = settings_factory(data_dir=tmp_path / "s", database_url=f"sqlite:///{tmp_path / 'store.db'}")
    async with replica(settings) as gw:
        assert gw.runtime.store.dialect == "sqlite"
        c = gw.client
        await ok(await c.put("/v1/secrets/local/t/redis", json={"data": {"url": redis_server}}))
        await ok(await c.put("/v1/connectors/redis", json={"type": "redis", "auth_method": "password",
                                                           "secret": "local/t/redis", "resources": ["races"]}))
        leases = await issue_many(gw, "redis", "races", 31)
        probe, leases = leases[0], leases[1:]
        await gw.runtime.leases.mark_revoking(lease_ids=[probe])
        now = utcnow()
        assert await gw.runtime.leases.claim(probe, "one", now, now + timedelta(seconds=30))
        assert not await gw.runtime.leases.claim(probe, "two", now, now + timedelta(seconds=30))
        assert await gw.runtime.leases.claim(probe, "two", now + timedelta(seconds=31), now + timedelta(seconds=60))
        assert await gw.runtime.leases.revoke_failed(probe, "two", last_error=None)  # released by its holder
        assert not await gw.runtime.leases.revoke_failed(probe, "one", last_error=None)  # not "one"'s any more

        await gw.runtime.leases.mark_revoking(lease_ids=leases[::2])
        stop = asyncio.Event()

        async def ticks() -> None:
            while not stop.is_set():
                await gw.runtime.reaper.tick()
                await asyncio.sleep(0)

        reaper = asyncio.create_task(ticks())
        answers = await asyncio.gather(*(c.post(f"/v1/leases/{i}/revoke") for i in leases + leases))
        stop.set()
        await reaper
        assert [(r.status_code, r.json()["state"]) for r in answers] == [(200, REVOKED)] * 60
        assert bad(failures) == []
        assert redis_users(redis_server, {role_name(i) for i in leases}) == set()


def test_two_served_replicas_and_their_reaper_revoke_100_expired_leases_twice(
    tmp_path, postgres_url: str, pg_cluster, pg_db
) -> None:
    """As an operator meets it: two `credgate serve` processes on one PostgreSQL store (one
    runs the reaper every 0.1 s), 100 leases just expired, each revoked through both at once
    while the reaper revokes them too. Every answer is 200 revoked; neither log has a failed
    revocation; no role is left."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import psycopg

    from gateway.crypto.keyring import new_key_file
    from tests.services.waiting import clean_env, free_port, wait_until_serving

    kek = tmp_path / "kek"
    new_key_file(kek)
    procs, addrs, logs = [], [], []
    try:
        for name in ("a", "b"):
            port = free_port()
            log = tmp_path / f"{name}.log"
            env = clean_env(CREDGATE_DATABASE_URL=postgres_url, CREDGATE_KEK_FILE=str(kek),
                            CREDGATE_BOOTSTRAP_TOKEN=ADMIN_TOKEN, CREDGATE_REAPER_INTERVAL_SECONDS="0.1",
                            CREDGATE_PUBLIC_URL="http://credgate.test")
            procs.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "credgate"), "serve", "--data-dir", str(tmp_path / name), "--port", str(port)],
                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
            ))
            addrs.append(f"http://127.0.0.1:{port}")
            logs.append(log)
            wait_until_serving(f"{addrs[-1]}/readyz", procs[-1])

        async def run() -> list[tuple[int, str]]:
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with httpx.AsyncClient(base_url=addrs[0], headers=headers, timeout=60) as a, \
                    httpx.AsyncClient(base_url=addrs[1], headers=headers, timeout=60) as b:
                gw = Gateway(None, a)
                await connect_targets(gw, pg_cluster, pg_db)
                leases = await issue_many(gw, "pg", pg_db, 100)
                with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as store:
                    store.execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE id = ANY(%s)", (leases,))
                sem = asyncio.Semaphore(32)

                async def revoke(c: httpx.AsyncClient, lease_id: str) -> tuple[int, str]:
                    async with sem:
                        r = await c.post(f"/v1/leases/{lease_id}/revoke")
                    return r.status_code, r.json().get("state", r.text)

                answers = await asyncio.gather(*(revoke(c, i) for i in leases for c in (a, b)))
                assert pg_roles(pg_cluster, {role_name(i) for i in leases}) == set()
                return list(answers)

        answers = asyncio.run(run())
        assert len(answers) == 200
        assert [x for x in answers if x != (200, REVOKED)] == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
    text = "\n".join(log.read_text() for log in logs)
    assert "failed" not in text and "Traceback" not in text, text[-2000:]


async def test_an_issuance_the_reaper_took_over_leaves_no_role_behind(settings_factory, tmp_path, pg_cluster, pg_db) -> None:
    """pending_timeout_seconds shorter than one issuance: the reaper moves the still-pending
    lease to revoking and revokes it before the role exists; the issuance then creates the
    role, finds its lease taken, answers 503 issue_rolled_back, and revokes the role itself."""
    settings = settings_factory(data_dir=tmp_path / "a", pending_timeout_seconds=0.2)
    async with replica(settings) as gw:
        await connect_targets(gw, pg_cluster, pg_db)
        rt = gw.runtime
        connector = await rt.catalog.instance(await rt.catalog.get("pg"))
        real_issue = connector.issue
        reaped = asyncio.Event()

        async def slow_issue(req):
            await reaped.wait()  # the reaper has judged the issuance dead and revoked "it"
            return await real_issue(req)

        connector.issue = slow_issue  # type: ignore[method-assign]
        request = asyncio.create_task(gw.client.post("/v1/credentials", json={"connector": "pg", "resource": pg_db}))
        await asyncio.sleep(0.4)
        done = await rt.reaper.tick()
        assert done["stale_pending"] == 1 and done["revoked"] == 1, done
        reaped.set()
        r = await request
        assert (r.status_code, r.json()["error"]["code"]) == (503, "issue_rolled_back"), r.text
        async with rt.store.read() as s:
            rows = list((await s.execute(select(LeaseRow))).scalars())
        assert len(rows) == 1 and rows[0].state == REVOKED, [(x.id, x.state) for x in rows]
        assert pg_roles(pg_cluster, {role_name(rows[0].id)}) == set()  # what the issuance made is gone
