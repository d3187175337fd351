"""The SecretBackend contract: every backend type passes this suite.

Run over every type in the registry, one test module per type so that xdist (``--dist
loadfile``) runs them on different workers: ``test_secret_backend_<type>.py`` imports
this suite and names its kinds in a ``kind`` fixture (:func:`kinds`). The types: ``local`` (on SQLite and on PostgreSQL),
``vault`` (a real OpenBao server), ``aws`` (moto in server mode), ``gcp`` and ``azure``
(stand-ins under tests/standins/, driven through the vendors' own SDKs). Each remote
type's server is described by ``tests/contract/servers/<type>.py`` (a ``Server`` class)
and reached through a :class:`~tests.services.tcpproxy.TcpProxy`, which the down/slow
tests switch to refusing or black-holing connections.

Everything is driven through the mounts (``runtime.mounts.get``: the guarded backend the
API uses) or the HTTP API, so the gateway's own checks (capabilities, size limit,
deadline, error mapping) are part of what is tested. A new backend type adds its server
module its name to KINDS, and its ``test_secret_backend_<type>.py``; the first test fails if the
registry names a type with none.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from backends.base import SecretBackend, SecretValue
from gateway.errors import Conflict, NotFound
from gateway.plugins.backends import value_size
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.services.tcpproxy import TcpProxy

REMOTE = ["vault", "aws", "gcp", "azure"]
KINDS = ["local-sqlite", "local-postgres", *REMOTE]
TIMEOUT = 2.0  # CREDGATE_BACKEND_TIMEOUT_SECONDS for this suite: the slow tests wait this long
CANARY = "CANARY-contract-7f3a9c"


def kinds(*names: str):
    """The ``kind`` fixture a per-type module declares: ``kind = kinds("vault")``."""
    assert set(names) <= set(KINDS), names

    @pytest.fixture(params=list(names))
    def kind(request: pytest.FixtureRequest) -> str:
        return request.param

    return kind


@dataclass
class Remote:
    server: Any
    proxy: TcpProxy


@pytest.fixture(scope="module")
def remotes() -> Iterator[dict[str, Remote]]:
    """Each remote type's server, started on first use and kept for the module."""
    started: dict[str, Remote] = {}

    class Lazy(dict):
        def __missing__(self, kind: str) -> Remote:
            server = importlib.import_module(f"tests.contract.servers.{kind}").Server()
            server.start()
            started[kind] = Remote(server, TcpProxy(server.address))
            self[kind] = started[kind]
            return started[kind]

    yield Lazy()
    for remote in started.values():
        remote.proxy.stop()
        remote.server.stop()


@pytest.fixture
def store_url(kind: str, request: pytest.FixtureRequest, tmp_path) -> str:
    """The gateway's own store: PostgreSQL for ``local-postgres``, SQLite otherwise
    (a remote backend keeps nothing there)."""
    if kind == "local-postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'store.db'}"


@dataclass
class Mounted:
    kind: str
    backend: Any  # the guarded backend, as the API sees it
    client: httpx.AsyncClient  # the API, as an admin
    runtime: Any
    remote: Remote | None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def caps(self):
        return self.backend.capabilities

    def secret_url(self, path: str) -> str:
        return f"/v1/secrets/{self.name}/{path}"


@pytest.fixture
async def mounted(kind: str, remotes: dict[str, Remote], settings_factory) -> AsyncIterator[Mounted]:
    app = create_app(settings_factory(backend_timeout_seconds=TIMEOUT))
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        remote = None
        if kind.startswith("local"):
            name = "local"
        else:
            remote = remotes[kind]
            remote.proxy.set_mode("pass")
            name = f"m{kind}"
            prefix = f"c{uuid.uuid4().hex[:10]}"  # every test its own namespace on the shared server
            config = remote.server.mount_config(*remote.proxy.address, prefix)
            await runtime.mounts.put(name, kind, config)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as client:
            yield Mounted(kind, await runtime.mounts.get(name), client, runtime, remote)
        if remote is not None:
            remote.proxy.set_mode("pass")


@pytest.fixture
def backend(mounted: Mounted):
    return mounted.backend


def _code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# --- the protocol ----------------------------------------------------------------------


async def test_is_a_secret_backend(mounted: Mounted) -> None:
    backend = mounted.backend
    assert isinstance(backend, SecretBackend) and isinstance(backend.inner, SecretBackend)
    assert backend.type == mounted.kind.split("-")[0]
    assert backend.config_model.model_json_schema()["type"] == "object"
    if mounted.remote is not None:
        assert backend.capabilities.max_value_bytes == mounted.remote.server.max_value_bytes
        assert not backend.capabilities.cacheable  # others can write to a vendor's store


async def test_put_get_versions(backend) -> None:
    m1 = await backend.put("c/one", {"a": "1"}, author="t")
    m2 = await backend.put("c/one", {"a": "2", "b": "x"}, author="t")
    assert (m1.current_version, m2.current_version) == (1, 2)
    assert m2.keys == ["a", "b"] and [v.version for v in m2.versions] == [1, 2]
    cur = await backend.get("c/one")
    assert isinstance(cur, SecretValue) and cur.version == 2 and cur.data == {"a": "2", "b": "x"}
    assert (await backend.get("c/one", 1)).data == {"a": "1"}
    meta = await backend.metadata("c/one")
    assert meta.current_version == 2 and meta.keys == ["a", "b"] and meta.deleted_at is None
    with pytest.raises(NotFound) as e:
        await backend.get("c/one", 3)
    assert e.value.code == "version_not_found"


async def test_the_api_reads_versions_and_reveals_only_on_request(mounted: Mounted) -> None:
    c = mounted.client
    assert (await c.put(mounted.secret_url("api/s"), json={"data": {"k": "v1"}})).status_code == 200
    assert (await c.put(mounted.secret_url("api/s"), json={"data": {"k": "v2"}})).json()["version"] == 2
    plain = (await c.get(mounted.secret_url("api/s"))).json()
    assert plain["data"] is None and plain["current_version"] == 2 and plain["keys"] == ["k"]
    old = (await c.get(mounted.secret_url("api/s"), params={"reveal": "true", "version": 1})).json()
    assert old["data"] == {"k": "v1"} and old["version"] == 1


async def test_value_repr_is_redacted(backend) -> None:
    await backend.put("c/r", {"token": CANARY}, author="t")
    value = await backend.get("c/r")
    assert CANARY not in repr(value) and CANARY not in str(value) and "token" in repr(value)


async def test_missing_secret(backend) -> None:
    for call in (backend.get("c/none"), backend.metadata("c/none"), backend.delete("c/none", author="t")):
        with pytest.raises(NotFound) as e:
            await call
        assert e.value.code == "secret_not_found"


async def test_unicode_keys_and_values_round_trip(backend) -> None:
    data = {"ключ": "значение", "emoji 🔑": "✓ ünïcödé 日本語 🚀", "quote\"and\\slash": "line\nbreak\ttab", "empty": ""}
    await backend.put("c/unicode", data, author="t")
    assert (await backend.get("c/unicode")).data == data
    assert sorted((await backend.metadata("c/unicode")).keys) == sorted(data)


async def test_many_segment_paths(backend) -> None:
    deep = "/".join(["seg", "a.b", "c_d", "e-f", "0", "Z9", "x.y-z_w", "g", "h", "i", "j", "leaf"])
    await backend.put(deep, {"k": "v"}, author="t")
    assert (await backend.get(deep)).data == {"k": "v"}
    assert (await backend.list("seg/")).items == [deep]
    assert (await backend.list("seg/a.b/c_d/")).items == [deep]


async def test_cas_or_refused_as_unsupported(mounted: Mounted) -> None:
    backend = mounted.backend
    if not mounted.caps.check_and_set:
        r = await mounted.client.put(mounted.secret_url("c/cas"), json={"data": {"a": "1"}, "cas": 0})
        assert _code(r) == (409, "not_supported")
        with pytest.raises(NotFound):
            await backend.metadata("c/cas")
        return
    await backend.put("c/cas", {"a": "1"}, author="t", cas=0)
    with pytest.raises(Conflict) as e:
        await backend.put("c/cas", {"a": "1"}, author="t", cas=0)
    assert e.value.code == "cas_mismatch"
    assert (await backend.put("c/cas", {"a": "2"}, author="t", cas=1)).current_version == 2
    r = await mounted.client.put(mounted.secret_url("c/cas"), json={"data": {"a": "3"}, "cas": 1})
    assert _code(r) == (409, "cas_mismatch")
    assert (await backend.get("c/cas")).data == {"a": "2"}


async def test_soft_delete_restore_destroy(mounted: Mounted) -> None:
    backend = mounted.backend
    await backend.put("c/d", {"a": "1"}, author="t")
    if mounted.caps.soft_delete:
        await backend.delete("c/d", author="t")
        with pytest.raises(NotFound) as e:
            await backend.get("c/d")
        assert e.value.code == "secret_deleted"
        assert "c/d" not in (await backend.list("c/")).items
        assert "c/d" in (await backend.list("c/", include_deleted=True)).items
        assert (await backend.restore("c/d")).deleted_at is None
        assert (await backend.get("c/d")).data == {"a": "1"}
    else:
        assert _code(await mounted.client.delete(mounted.secret_url("c/d"))) == (409, "not_supported")
        assert _code(await mounted.client.post(mounted.secret_url("c/d") + ":restore")) == (409, "not_supported")
        assert (await backend.get("c/d")).data == {"a": "1"}  # nothing deleted
    await backend.delete("c/d", author="t", destroy=True)
    with pytest.raises(NotFound) as e:
        await backend.metadata("c/d")
    assert e.value.code == "secret_not_found"
    # The path is free again: a new secret starts at version 1.
    assert (await backend.put("c/d", {"a": "new"}, author="t")).current_version == 1


async def test_list_pages_in_order(backend) -> None:
    for name in ["b", "a", "c", "aa", "a_b", "d/e"]:
        await backend.put(f"l/{name}", {"k": "v"}, author="t")
    await backend.put("other/x", {"k": "v"}, author="t")
    page = await backend.list("l/", limit=4)
    assert page.items == ["l/a", "l/a_b", "l/aa", "l/b"] and page.next_after == "l/b"
    rest = await backend.list("l/", after=page.next_after, limit=4)
    assert rest.items == ["l/c", "l/d/e"] and rest.next_after is None
    assert (await backend.list("l/a_")).items == ["l/a_b"]
    assert (await backend.list("")).items == ["l/a", "l/a_b", "l/aa", "l/b", "l/c", "l/d/e", "other/x"]


async def test_api_pages_with_page_tokens(mounted: Mounted) -> None:
    for i in range(7):
        await mounted.backend.put(f"p/{i:02d}", {"k": "v"}, author="t")
    seen: list[str] = []
    params: dict[str, Any] = {"prefix": "p/", "limit": 3}
    while True:
        body = (await mounted.client.get(f"/v1/secrets/{mounted.name}", params=params)).json()
        seen += body["items"]
        if not body["next_page_token"]:
            break
        params["page_token"] = body["next_page_token"]
    assert seen == [f"p/{i:02d}" for i in range(7)]


# --- limits --------------------------------------------------------------------------


def _sized(size: int) -> dict[str, str]:
    """A map whose compact JSON is exactly ``size`` bytes (values of at most 60,000
    characters each: the API's own limit on one value is 65,536)."""
    data: dict[str, str] = {}
    i = 0
    while value_size(data) < size:
        key = f"blob{i:03d}"
        data[key] = ""
        data[key] = "x" * min(60_000, max(0, size - value_size(data)))
        i += 1
    assert value_size(data) == size
    return data


async def test_values_at_the_documented_limit_are_kept_and_past_it_refused(mounted: Mounted) -> None:
    limit = mounted.caps.max_value_bytes
    at = _sized(limit)
    r = await mounted.client.put(mounted.secret_url("big/at"), json={"data": at})
    assert r.status_code == 200, r.text
    assert (await mounted.backend.get("big/at")).data == at
    r = await mounted.client.put(mounted.secret_url("big/past"), json={"data": _sized(limit + 1)})
    assert _code(r) == (413, "value_too_large") and r.json()["error"]["limit"] == limit
    with pytest.raises(NotFound):  # nothing written
        await mounted.backend.metadata("big/past")
    r = await mounted.client.put(mounted.secret_url("big/at"), json={"data": _sized(limit + 1)})
    assert r.status_code == 413
    assert (await mounted.backend.metadata("big/at")).current_version == 1


async def test_concurrent_writers_lose_no_version(backend, monkeypatch) -> None:
    n = 24
    # The suite's 2 s deadline is for its slow-backend tests; 24 writes that each wait for the
    # one before (SQLite's write lock, an fsync each) took longer than that on a loaded machine.
    monkeypatch.setattr(backend, "_timeout", max(backend._timeout, 20.0))
    results = await asyncio.gather(*(backend.put("race/one", {"writer": str(i)}, author="t") for i in range(n)))
    versions = [m.current_version for m in results]
    assert sorted(versions) == list(range(1, n + 1))  # each put got its own version
    meta = await backend.metadata("race/one")
    assert meta.current_version == n
    writers = {(await backend.get("race/one", v)).data["writer"] for v in range(1, n + 1)}
    assert writers == {str(i) for i in range(n)}  # every write is readable, none overwritten


# --- faults --------------------------------------------------------------------------


def _remote_only(mounted: Mounted) -> Remote:
    if mounted.remote is None:
        pytest.skip("the local backend is the gateway's own store: its faults are the store's (tests/gateway/test_crash.py)")
    return mounted.remote


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_a_backend_down_or_hanging_is_a_503_and_recovers_by_itself(mounted: Mounted, mode: str, caplog) -> None:
    remote = _remote_only(mounted)
    c = mounted.client
    caplog.set_level(logging.DEBUG)
    assert (await c.put(mounted.secret_url("f/s"), json={"data": {"k": CANARY}})).status_code == 200
    with remote.proxy.failing(mode):
        for call in (
            c.get(mounted.secret_url("f/s"), params={"reveal": "true"}),
            c.put(mounted.secret_url("f/s"), json={"data": {"k": CANARY + "-2"}}),
            c.put(mounted.secret_url("f/new"), json={"data": {"k": CANARY}}),
            c.get(f"/v1/secrets/{mounted.name}"),
        ):
            started = time.monotonic()
            r = await call
            elapsed = time.monotonic() - started
            assert _code(r) == (503, "backend_unavailable"), r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert elapsed < TIMEOUT + 3  # bounded by the gateway's deadline, not the SDK's
            assert CANARY not in r.text
        health = await mounted.runtime.mounts.check(mounted.name)
        assert health.ok is False and health.problem == "unreachable"
        assert (await c.get("/healthz")).status_code == 200  # the gateway itself is fine
        assert (await c.get("/v1/secrets/local")).status_code == 200  # and so are other backends
    # Back by itself: no restart, no reconfiguration.
    for _ in range(20):
        r = await c.get(mounted.secret_url("f/s"), params={"reveal": "true"})
        if r.status_code == 200:
            break
        await asyncio.sleep(0.25)
    assert r.status_code == 200 and r.json()["data"] == {"k": CANARY}
    assert r.json()["current_version"] == 1  # the refused write left nothing (refuse) or at most what it acknowledged
    assert _code(await c.get(mounted.secret_url("f/new"))) == (404, "secret_not_found")  # nothing reached the store
    assert (await mounted.runtime.mounts.check(mounted.name)).ok
    assert CANARY not in caplog.text


async def test_errors_carry_no_value(mounted: Mounted, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    c = mounted.client
    await c.put(mounted.secret_url("e/s"), json={"data": {"k": CANARY}})
    bodies = [
        await c.get(mounted.secret_url("e/s"), params={"reveal": "true", "version": 9}),
        await c.get(mounted.secret_url("e/none")),
        await c.put(mounted.secret_url("e/s"), json={"data": _sized(mounted.caps.max_value_bytes + 1) | {"k": CANARY}}),
        await c.put(mounted.secret_url("e/s"), json={"data": {"k": CANARY}, "cas": 99}),
    ]
    for r in bodies:
        assert r.status_code >= 400 and CANARY not in r.text
    assert CANARY not in caplog.text


async def test_check_reports_health(mounted: Mounted) -> None:
    health = await mounted.runtime.mounts.check(mounted.name)
    assert health.ok is True and health.message and health.problem is None
    assert mounted.backend.status().ok


# --- a connector draws its material from any backend ----------------------------------


async def test_a_postgres_connector_with_its_admin_secret_here_issues_a_working_credential(mounted: Mounted, pg_cluster) -> None:
    """The admin DSN lives in this backend; the connector names it; the credential it issues
    logs in (scram-sha-256 on a throwaway cluster) and is revoked for real."""
    import secrets as pysecrets

    import psycopg

    c = mounted.client
    db = "cg_" + pysecrets.token_hex(4)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        assert (await c.put(mounted.secret_url("targets/pg"), json={"data": {"dsn": pg_cluster.dsn()}})).status_code == 200
        body = {"type": "postgres", "auth_method": "password", "secret": f"{mounted.name}/targets/pg", "resources": [db]}
        r = await c.put("/v1/connectors/pg", json=body)
        assert r.status_code == 201, r.text
        r = await c.post("/v1/credentials", json={"connector": "pg", "resource": db, "ttl_seconds": 60})
        assert r.status_code == 200, r.text
        issued = r.json()
        cred = issued["credential"]
        with psycopg.connect(pg_cluster.dsn(dbname=db, user=cred["username"], password=cred["password"])) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == cred["username"]
        assert (await c.post(f"/v1/leases/{issued['lease_id']}/revoke")).status_code in (200, 204)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg_cluster.dsn(dbname=db, user=cred["username"], password=cred["password"]), connect_timeout=5)
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
