"""Credentials made but never delivered (issue 14, item 5).

A revocable lease is activated *undelivered* (``delivery_due_at``); the marker is cleared
once the response carrying its credential has been handed to the server whole. The reaper
revokes an active lease whose marker passed. Here, on a PostgreSQL store and the scram
PostgreSQL target, with a 1 s deadline and the reaper ticked by hand:

- a response that never leaves (the server's send fails as an ASGI 2.4 server's does for a
  client that went away; or it is dropped, as uvicorn drops it, the client gone) leaves its
  lease undelivered: revoked after the deadline, the role gone, audited ``undelivered``;
  the same under a real uvicorn server with a client that gives up before the answer;
- a delivered lease outlives the deadline and its credential works; a delivery that can't be
  recorded leaves the answer a 200 and is logged with the lease id only;
- a retry with the same Idempotency-Key before the deadline delivers it (same lease, marker
  cleared, survives); after the revocation it is 410 ``lease_ended``, and the Python client
  then issues anew by itself;
- a lease activated without the marker (as the previous release activates them) is never
  revoked as undelivered;
- migration 0012 goes up and down on PostgreSQL with such a lease in the table.

The crash case (SIGKILL mid-stream, then the deadline) is in tests/gateway/test_crash.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from connectors.base import role_name
from gateway.store.database import sync_url
from gateway.store.migrate import downgrade, upgrade
from gateway.store.models import utcnow
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.gateway import test_revocation_races

pytestmark = pytest.mark.anyio

DEADLINE = 1.0
pg_db = test_revocation_races.pg_db  # the throwaway target database fixture


@pytest.fixture
def store_url(postgres_url: str) -> str:
    return postgres_url


@pytest.fixture
async def gw(settings_factory, pg_cluster, pg_db: str) -> AsyncIterator[Gateway]:
    app = create_app(settings_factory(delivery_deadline_seconds=DEADLINE))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            gateway = Gateway(app, client)
            for path, body in (
                ("/v1/secrets/local/t/pg", {"data": {"dsn": pg_cluster.dsn()}}),
                ("/v1/connectors/pg", {"type": "postgres", "auth_method": "password", "secret": "local/t/pg",
                                       "resources": [pg_db]}),
            ):
                r = await client.put(path, json=body)
                assert r.status_code in (200, 201), r.text
            try:
                yield gateway
            finally:
                rt = gateway.runtime
                await rt.credentials.revoke(await rt.leases.mark_revoking())


class LosingServer:
    """The app behind a server that can't deliver the response body: ``raises`` as an ASGI 2.4
    server's send does once the client has gone, or ``drops`` it silently as uvicorn's does
    (whose request cycle, the object its ``send`` and ``receive`` are methods of, then says
    ``disconnected``)."""

    def __init__(self, app, how: str) -> None:
        self.app, self.how = app, how

    async def __call__(self, scope, receive, send) -> None:
        how = self.how

        class Cycle:
            disconnected = False

            async def send(self, message) -> None:
                if message["type"] == "http.response.body":
                    if how == "raises":
                        raise OSError("the client went away")
                    self.disconnected = True
                    return
                await send(message)

            async def receive(self):
                return await receive()

        cycle = Cycle()
        await self.app(scope, cycle.receive, cycle.send)
        if self.how == "drops":  # what the client saw: a status line, then nothing
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def issue_body(db: str) -> dict:
    return {"connector": "pg", "resource": db, "ttl_seconds": 3600}


async def lose_response(gw: Gateway, db: str, how: str = "raises", key: str | None = None) -> str:
    """Issue with the response lost on the way out; the id of the lease it made."""
    headers = {"Idempotency-Key": key} if key else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=LosingServer(gw.app, how)),
                                 base_url="http://gateway", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        with contextlib.suppress(OSError):
            r = await c.post("/v1/credentials", json=issue_body(db), headers=headers)
            assert r.status_code == 200 and r.content == b""  # the status line left, the credential did not
    items = (await gw.client.get("/v1/leases", params={"state": "active"})).json()["items"]
    known = getattr(gw, "_seen", set())
    fresh = [i["lease_id"] for i in items if i["lease_id"] not in known]
    assert len(fresh) == 1, items
    gw._seen = known | set(fresh)
    return fresh[0]


def roles(cluster) -> set[str]:
    import psycopg

    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'cg\\_%'")}


async def state(gw: Gateway, lease_id: str) -> str:
    return (await gw.client.get(f"/v1/leases/{lease_id}")).json()["state"]


async def past_deadline() -> None:
    await asyncio.sleep(DEADLINE + 0.2)


async def works(dsn: str) -> bool:
    import psycopg

    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=5) as conn:
            return (await (await conn.execute("SELECT 1")).fetchone())[0] == 1
    except psycopg.OperationalError:
        return False


@pytest.mark.parametrize("how", ["raises", "drops"])
async def test_a_credential_whose_response_never_left_is_revoked_at_the_deadline(
    gw: Gateway, pg_cluster, pg_db: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    rt = gw.runtime
    lease_id = await lose_response(gw, pg_db, how)
    assert (await rt.leases.get(lease_id)).delivery_due_at is not None
    assert role_name(lease_id) in roles(pg_cluster)  # made at the target, held by nobody

    assert (await rt.reaper.tick())["undelivered"] == 0  # not before its deadline
    assert await state(gw, lease_id) == "active"
    await past_deadline()
    with caplog.at_level(logging.WARNING, logger="credgate.reaper"):
        done = await rt.reaper.tick()
    assert done["undelivered"] == 1 and done["revoked"] == 1, done
    assert await state(gw, lease_id) == "revoked"
    assert role_name(lease_id) not in roles(pg_cluster)
    assert any("revoking 1 lease(s) whose response was never confirmed sent" in r.getMessage() for r in caplog.records)
    events = (await gw.client.get("/v1/audit", params={"lease_id": lease_id, "action": "leases:revoke"})).json()
    assert [e["outcome"] for e in events["items"]] == ["undelivered: revoking", "revoked"]
    assert "credgate_leases_undelivered_revoked_total 1.0" in (await gw.client.get("/metrics")).text


async def test_a_client_gone_before_the_answer_under_uvicorn(gw: Gateway, pg_cluster, pg_db: str) -> None:
    """The real server: the client's timeout runs out while the target is slow; uvicorn then
    drops the answer (and says nothing), so the lease stays undelivered."""
    import uvicorn

    from tests.services.waiting import free_port

    rt = gw.runtime
    connector = await rt.catalog.instance(await rt.catalog.get("pg"))
    issue = connector.issue

    async def slow_issue(req):
        await asyncio.sleep(0.5)
        return await issue(req)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw.app, host="127.0.0.1", port=port, lifespan="off", log_config=None))
    serving = asyncio.create_task(server.serve())
    connector.issue = slow_issue
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=0.2,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/credentials", json=issue_body(pg_db))
        for _ in range(50):  # the gateway finishes the issuance after the client left
            items = (await gw.client.get("/v1/leases", params={"state": "active"})).json()["items"]
            if items:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # and tries to answer
        (lease_id,) = [i["lease_id"] for i in items]
        assert (await rt.leases.get(lease_id)).delivery_due_at is not None
        await past_deadline()
        assert (await rt.reaper.tick())["undelivered"] == 1
        assert role_name(lease_id) not in roles(pg_cluster)
    finally:
        del connector.issue
        server.should_exit = True
        await serving


async def test_a_delivered_credential_outlives_the_deadline(gw: Gateway, pg_db: str) -> None:
    rt = gw.runtime
    r = await gw.client.post("/v1/credentials", json=issue_body(pg_db))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (await rt.leases.get(out["lease_id"])).delivery_due_at is None  # confirmed once it left
    await past_deadline()
    assert (await rt.reaper.tick())["undelivered"] == 0
    assert await state(gw, out["lease_id"]) == "active"
    assert await works(out["credential"]["dsn"])


async def test_a_delivery_that_cannot_be_recorded_is_logged_and_changes_no_answer(
    gw: Gateway, pg_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    rt = gw.runtime
    calls = []

    async def failing(lease_ids: list[str]) -> None:
        calls.append(list(lease_ids))
        raise ConnectionError("the store went away")

    rt.credentials.delivered = failing
    try:
        with caplog.at_level(logging.WARNING, logger="credgate.delivery"):
            r = await gw.client.post("/v1/credentials", json=issue_body(pg_db))
    finally:
        del rt.credentials.delivered
    assert r.status_code == 200, r.text
    out = r.json()
    assert calls == [[out["lease_id"]]] * 3  # tried three times
    (line,) = [rec.getMessage() for rec in caplog.records if rec.name == "credgate.delivery"]
    assert out["lease_id"] in line and "ConnectionError" in line
    assert out["credential"]["password"] not in line and "went away" not in line
    assert (await rt.leases.get(out["lease_id"])).delivery_due_at is not None  # the reaper will take it


async def test_a_retry_with_the_idempotency_key_delivers_it_before_the_deadline(
    gw: Gateway, pg_cluster, pg_db: str
) -> None:
    rt = gw.runtime
    lease_id = await lose_response(gw, pg_db, key="retry-1")
    first_due = (await rt.leases.get(lease_id)).delivery_due_at
    await asyncio.sleep(DEADLINE * 0.6)
    r = await gw.client.post("/v1/credentials", json=issue_body(pg_db), headers={"Idempotency-Key": "retry-1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["lease_id"] == lease_id and out["replayed"] is True
    assert (await rt.leases.get(lease_id)).delivery_due_at is None
    await asyncio.sleep(DEADLINE * 0.6)  # past the first response's deadline
    assert utcnow() > first_due
    assert (await rt.reaper.tick())["undelivered"] == 0
    assert await state(gw, lease_id) == "active" and await works(out["credential"]["dsn"])

    # A retry that comes too late: the lease was revoked as undelivered; issue anew.
    late = await lose_response(gw, pg_db, key="retry-2")
    await past_deadline()
    assert (await rt.reaper.tick())["undelivered"] == 1
    r = await gw.client.post("/v1/credentials", json=issue_body(pg_db), headers={"Idempotency-Key": "retry-2"})
    assert r.status_code == 410 and r.json()["error"]["code"] == "lease_ended", r.text
    assert await state(gw, late) == "revoked" and role_name(late) not in roles(pg_cluster)


class LoseFirstIssue(httpx.AsyncBaseTransport):
    """The first issue request's answer never reaches the client (the gateway made the lease);
    the deadline passes and the reaper revokes it before the client's retry."""

    def __init__(self, gw: Gateway) -> None:
        self.gw, self.lost = gw, 0
        self.inner = httpx.ASGITransport(app=gw.app)
        self.losing = httpx.ASGITransport(app=LosingServer(gw.app, "raises"))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/credentials" and not self.lost:
            self.lost += 1
            with pytest.raises(OSError):
                await self.losing.handle_async_request(request)
            await past_deadline()
            assert (await self.gw.runtime.reaper.tick())["undelivered"] == 1
            raise httpx.ReadError("the connection was lost", request=request)
        return await self.inner.handle_async_request(request)


async def test_the_python_client_issues_anew_when_its_retry_finds_the_lease_revoked(
    gw: Gateway, pg_cluster, pg_db: str
) -> None:
    from gateway.client import AsyncClient

    async with AsyncClient("http://gateway", token=ADMIN_TOKEN, transport=LoseFirstIssue(gw)) as c:
        cred = await c.credentials("pg", pg_db, ttl=600)
        assert await state(gw, cred.lease_id) == "active" and await works(cred["dsn"])
    (lost,) = [i for i in (await gw.client.get("/v1/leases")).json()["items"] if i["lease_id"] != cred.lease_id]
    assert lost["state"] == "revoked" and role_name(lost["lease_id"]) not in roles(pg_cluster)


async def test_a_replay_whose_own_response_is_lost_restarts_the_deadline(gw: Gateway, pg_db: str) -> None:
    rt = gw.runtime
    lease_id = await lose_response(gw, pg_db, key="twice")
    first_due = (await rt.leases.get(lease_id)).delivery_due_at
    await asyncio.sleep(DEADLINE * 0.6)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=LosingServer(gw.app, "raises")),
                                 base_url="http://gateway", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        with pytest.raises(OSError):
            await c.post("/v1/credentials", json=issue_body(pg_db), headers={"Idempotency-Key": "twice"})
    assert (await rt.leases.get(lease_id)).delivery_due_at > first_due  # undelivered still, later
    await asyncio.sleep(DEADLINE * 0.6)
    assert (await rt.reaper.tick())["undelivered"] == 0  # the first deadline passed; the new one holds
    await asyncio.sleep(DEADLINE * 0.6)
    assert (await rt.reaper.tick())["undelivered"] == 1
    assert await state(gw, lease_id) == "revoked"


async def test_a_lease_activated_without_the_marker_is_never_undelivered(gw: Gateway, pg_db: str) -> None:
    """As the previous release activates leases during a rolling update: no marker."""
    rt = gw.runtime
    rt.credentials.delivery_deadline = None  # this issuance is made as the previous release makes it
    try:
        lease_id = await lose_response(gw, pg_db)
    finally:
        rt.credentials.delivery_deadline = timedelta(seconds=DEADLINE)
    assert (await rt.leases.get(lease_id)).delivery_due_at is None
    await past_deadline()
    assert (await rt.reaper.tick())["undelivered"] == 0
    assert await state(gw, lease_id) == "active"


def test_migration_0012_up_and_down_on_postgresql(postgres_url: str) -> None:
    url = sync_url(postgres_url)
    upgrade(url, "0011")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:  # a lease the previous release activated
            conn.execute(text(
                "INSERT INTO leases (id, connector, connector_type, resource, principal, state, revocability, "
                "renewable, wrapped, issued_at, expires_at, max_expires_at, revoke_state, attempts, updated_at) "
                "VALUES ('lease_prev', 'pg', 'postgres', 'db', 'credgate/x', 'active', 'revocable', true, false, "
                "now(), now() + interval '1 hour', now() + interval '1 hour', '{}', 0, now())"))
        upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT delivery_due_at FROM leases WHERE id = 'lease_prev'")).scalar() is None
            indexes = {i["name"]: i for i in inspect(conn).get_indexes("leases")}
            assert indexes["ix_leases_delivery_due"]["dialect_options"]["postgresql_where"] is not None
        downgrade(url, "0011")
        with engine.connect() as conn:
            assert "delivery_due_at" not in {c["name"] for c in inspect(conn).get_columns("leases")}
            assert conn.execute(text("SELECT state FROM leases WHERE id = 'lease_prev'")).scalar() == "active"
        upgrade(url)
    finally:
        engine.dispose()
