"""The store goes away (issue 14, item 1): a PostgreSQL store behind a TCP proxy that starts
refusing (and resets every open connection) or black-holes every byte (a partition) answers
503 store_unavailable with Retry-After and a request id on every route it needs, serves what
its caches hold for the bounded staleness, and recovers by itself when the store is back.
A SQLite store on a read-only file answers 503 with a log line naming the cause."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.services.tcpproxy import TcpProxy

CANARY = "CANARY-outage-5d1e"

on_postgres = pytest.mark.parametrize("store_url", ["postgres"], indirect=True)


@pytest.fixture(autouse=True)
def fresh_outage_log(monkeypatch) -> None:
    """The store's throttled log line is per process: an earlier test's outage within its 10 s
    must not hold back this test's first line."""
    from gateway.store import database
    from gateway.throttle import LogThrottle

    monkeypatch.setattr(database, "_outage_log", LogThrottle(database.log, seconds=10.0))


@pytest.fixture
def proxied_store(postgres_url: str) -> tuple[str, TcpProxy]:
    url = make_url(postgres_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    finally:
        proxy.stop()


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


@pytest.fixture
async def served(proxied_store, settings_factory, request) -> AsyncIterator[tuple[httpx.AsyncClient, TcpProxy]]:
    url, proxy = proxied_store
    app = create_app(settings_factory(database_url=url, database_connect_timeout_seconds=1,
                                      audit_wait_seconds=0.2, **getattr(request, "param", {})))
    async with app.router.lifespan_context(app):
        async with _client(app) as c:
            yield c, proxy


ROUTES = [
    ("GET", "/v1/secrets/local/o/s", None),
    ("PUT", "/v1/secrets/local/o/t", {"data": {"v": CANARY}}),
    ("GET", "/v1/leases", None),
    ("GET", "/v1/connectors", None),
    ("GET", "/v1/auth/whoami", None),
    ("GET", "/v1/policies", None),
    ("POST", "/v1/credentials", {"connector": "nope", "resource": "x"}),
]


def _is_store_503(r: httpx.Response) -> bool:
    body = r.json()["error"]
    return (r.status_code, body["code"]) == (503, "store_unavailable") and bool(
        r.headers.get("retry-after") and body.get("request_id"))


@on_postgres
@pytest.mark.parametrize("served", [{"cache_stale_seconds": 0}], indirect=True)
@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_without_a_stale_window_every_route_is_a_bounded_503_and_recovers(served, mode, caplog) -> None:
    c, proxy = served
    assert (await c.put("/v1/secrets/local/o/s", json={"data": {"v": CANARY}})).status_code == 200
    assert (await c.get("/v1/auth/whoami")).status_code == 200  # the token is cached now
    proxy.set_mode(mode)
    try:
        # A partition costs seconds a request (its timeouts run out): a read and a write show it.
        for method, path, body in ROUTES if mode == "refuse" else (ROUTES[0], ROUTES[1]):
            started = time.monotonic()
            r = await c.request(method, path, json=body)
            took = time.monotonic() - started
            assert _is_store_503(r), (mode, method, path, r.status_code, r.headers, r.text)
            assert CANARY not in r.text
            # Bounded by database_connect_timeout_seconds (1 s here: the pool's wait, a new
            # connection, an unacknowledged send), a few of them per request, not the OS's minutes.
            assert took < 8, (mode, path, took)
    finally:
        proxy.set_mode("pass")
    for method, path, body in ROUTES[:-1]:
        r = await c.request(method, path, json=body)
        assert r.status_code == 200, (method, path, r.text)
    assert (await c.get("/v1/secrets/local/o/t", params={"reveal": "true"})).json()["data"]["v"] == CANARY
    # One throttled line per reason, not one per request; never a value.
    lines = [r for r in caplog.records if "the store is failing" in r.getMessage()]
    assert 1 <= len(lines) <= 4, [r.getMessage() for r in lines]
    assert "request failed: store_unavailable" not in caplog.text
    assert CANARY not in caplog.text


@on_postgres
@pytest.mark.parametrize("served", [{"cache_stale_seconds": 2}], indirect=True)
async def test_what_the_caches_hold_is_served_through_an_outage_for_the_stale_window(served) -> None:
    """An authenticated metadata read of a cached secret and a cached token keep answering
    while the store is away, for cache_stale_seconds after the change feed was lost and not
    longer; what needs the store (a write, an uncached read) is a 503 meanwhile."""
    c, proxy = served
    assert (await c.put("/v1/secrets/local/o/s", json={"data": {"v": CANARY}})).status_code == 200
    warm = await c.get("/v1/secrets/local/o/s")
    assert warm.status_code == 200 and (await c.get("/v1/auth/whoami")).status_code == 200
    proxy.set_mode("refuse")
    try:
        lost = time.monotonic()
        r = await c.get("/v1/secrets/local/o/s")
        assert r.status_code == 200 and r.json() == warm.json(), r.text
        assert (await c.get("/v1/auth/whoami")).status_code == 200
        assert _is_store_503(await c.put("/v1/secrets/local/o/t", json={"data": {"v": CANARY}}))
        assert _is_store_503(await c.get("/v1/leases"))
        # Past the window (the feed notices within its 2 s heartbeat, then 2 s of staleness).
        deadline = time.monotonic() + 15
        while (r := await c.get("/v1/secrets/local/o/s")).status_code == 200 and time.monotonic() < deadline:
            await _sleep(0.2)
        assert _is_store_503(r) and time.monotonic() - lost >= 2, (r.status_code, time.monotonic() - lost)
        assert _is_store_503(await c.get("/v1/auth/whoami"))
    finally:
        proxy.set_mode("pass")
    deadline = time.monotonic() + 15
    while (r := await c.get("/v1/secrets/local/o/s")).status_code != 200 and time.monotonic() < deadline:
        await _sleep(0.2)
    assert r.status_code == 200, r.text
    assert (await c.put("/v1/secrets/local/o/t", json={"data": {"v": "after"}})).status_code == 200


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def pragma_on_every_connection(store, pragma: str):
    """Every store connection opened inside the block runs ``PRAGMA <pragma>`` (both engines'
    pools are emptied on the way in and out, so the block's requests use such connections)."""
    from sqlalchemy import event

    def on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.cursor().execute(f"PRAGMA {pragma}")

    engines = (store.engine.sync_engine, store._group_engine)
    for engine in engines:
        event.listen(engine, "connect", on_connect)
    await store.engine.dispose()
    store._group_engine.dispose()
    try:
        yield
    finally:
        for engine in engines:
            event.remove(engine, "connect", on_connect)
        await store.engine.dispose()
        store._group_engine.dispose()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_full_or_read_only_sqlite_store_is_a_503_with_a_log_line_naming_the_cause(
    settings_factory, tmp_path, caplog
) -> None:
    """SQLite's own errors, made for real: a database at its page limit (SQLITE_FULL, what a
    full disk gives) and a read-only database (SQLITE_READONLY).
    Each is a 503 store_unavailable, logged with its cause, and writes work again once it is
    gone; the secret written before is intact."""
    from sqlalchemy import text

    db = tmp_path / "s" / "store.db"
    app = create_app(settings_factory(database_url=f"sqlite:///{db}"))
    async with app.router.lifespan_context(app):
        store = app.state.runtime.store
        async with _client(app) as c:
            assert (await c.put("/v1/secrets/local/o/s", json={"data": {"v": CANARY}})).status_code == 200
            async with store.engine.connect() as conn:
                pages = (await conn.execute(text("PRAGMA page_count"))).scalar()
            big = {k: CANARY + "x" * 60_000 for k in "abcd"}
            async with pragma_on_every_connection(store, f"max_page_count = {pages}"):
                r = await c.put("/v1/secrets/local/o/big", json={"data": big})
            assert _is_store_503(r), r.text
            assert "SQLITE_FULL" in caplog.text and "the disk is full" in caplog.text
            assert (await c.put("/v1/secrets/local/o/big", json={"data": big})).status_code == 200

            # Read-only (as on a read-only file or mount, which root here can't make): the same
            # SQLITE_READONLY from SQLite itself, through query_only on every new connection.
            async with pragma_on_every_connection(store, "query_only = ON"):
                r = await c.put("/v1/secrets/local/o/t", json={"data": {"v": CANARY}})
            assert _is_store_503(r), r.text
            assert "SQLITE_READONLY" in caplog.text and "read-only" in caplog.text
            assert (await c.put("/v1/secrets/local/o/t", json={"data": {"v": CANARY}})).status_code == 200
            r = await c.get("/v1/secrets/local/o/s", params={"reveal": "true"})
            assert r.json()["data"]["v"] == CANARY
    assert CANARY not in caplog.text


def test_a_served_replica_keeps_the_client_connection_through_an_outage(proxied_store, tmp_path) -> None:
    """Over real HTTP/1.1 keep-alive (one socket for every request): each 503 leaves the
    connection open (no reset, no "Connection: close"), the server logs no traceback, and
    the same connection gets a 200 once the store is back."""
    import http.client
    import json
    import subprocess
    import sys
    from pathlib import Path

    from gateway.crypto.keyring import new_key_file
    from tests.services.waiting import clean_env, free_port, wait_until_serving

    url, proxy = proxied_store
    kek = tmp_path / "kek"
    new_key_file(kek)
    port = free_port()
    log = tmp_path / "serve.log"
    env = clean_env(CREDGATE_DATABASE_URL=url, CREDGATE_KEK_FILE=str(kek), CREDGATE_BOOTSTRAP_TOKEN=ADMIN_TOKEN,
                    CREDGATE_CACHE_STALE_SECONDS="0", CREDGATE_DATABASE_CONNECT_TIMEOUT_SECONDS="1",
                    CREDGATE_AUDIT_WAIT_SECONDS="0.2")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "credgate"), "serve", "--data-dir",
                             str(tmp_path / "data"), "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/readyz", proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}

        def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"null")

        assert call("PUT", "/v1/secrets/local/o/s", {"data": {"v": CANARY}})[0] == 200
        sock = conn.sock
        proxy.set_mode("refuse")
        try:
            for method, path, body in ROUTES:
                status, hdrs, out = call(method, path, body)
                assert (status, out["error"]["code"]) == (503, "store_unavailable"), (path, status, out)
                assert hdrs.get("retry-after") and out["error"]["request_id"] and hdrs.get("connection") != "close"
                assert conn.sock is sock  # the same connection, never reset
        finally:
            proxy.set_mode("pass")
        deadline = time.monotonic() + 15
        while (status := call("GET", "/v1/secrets/local/o/s")[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200 and conn.sock is sock
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]
    assert CANARY not in text
